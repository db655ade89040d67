"""The command line as a person meets it: a mistyped key or option, a value of the wrong type, the noise Lightning prints."""

import logging
import subprocess
import sys
import warnings

import pytest

from tests.conftest import CONF, ROOT, TINY, run_script
from vit import cli, run
from vit.errors import ConfigError


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.learning_rate=1e-3"], "optim.learning_rate is not a config key: did you mean optim.lr?"),
        (["trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
        (["batch_size=64"], "did you mean data.batch_size?"),
        (["optm.lr=1e-3"], "did you mean optim.lr?"),
        (
            ["experiment=sed"],
            f"experiment=sed is not an option: use one of {', '.join(sorted(p.stem for p in (CONF / 'experiment').glob('*.yaml')))} (did you mean seed?)",
        ),
        (
            ["-m", "data=fake,fakes"],
            f"data=fakes is not an option: use one of {', '.join(sorted(p.stem for p in (CONF / 'data').glob('*.yaml')))}",
        ),
        (["data=fake", "data.num_clases=3"], "did you mean data.num_classes?"),
        (["scheduler.warmup_fraction=0.1"], "scheduler is null here; choose it first (scheduler=<one of cosine, none>)"),
    ],
)
def test_unknown_keys_and_options_name_the_closest(args, message):
    with pytest.raises(ConfigError) as info:
        cli.check_overrides(CONF, "train", args)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        [*TINY, "trainer.max_epochs=2", "optim.lr=1e-3"],
        ["-m", "optim.lr=1e-3,1e-4", "data.batch_size=32,64", "hydra.run.dir=x"],
        ["experiment=small_strong", "module.mixup_alpha=0.4", "+callbacks.extra._target_=tests.faults.PoisonAtEpoch"],
        ["--cfg", "job", "hparams_search=optuna", "hydra.sweeper.n_trials=3"],
        ["data=fake", "data.num_classes=3", "scheduler=cosine", "scheduler.warmup_fraction=0.2"],
    ],
)
def test_good_command_lines_pass_the_check(args):
    cli.check_overrides(CONF, "train", args)


def test_test_and_predict_configs_are_checked_too():
    cli.check_overrides(CONF, "test", ["ckpt=some/dir", "data=fake", "data.num_classes=3"])
    with pytest.raises(ConfigError, match="did you mean ckpt?"):
        cli.check_overrides(CONF, "test", ["ckp=some/dir"])
    with pytest.raises(ConfigError, match="did you mean top_k?"):
        cli.check_overrides(CONF, "predict", ["topk=3"])


@pytest.mark.slow
def test_unknown_key_and_option_are_one_line_from_the_scripts(tmp_path):
    for args, message in [
        (["optim.learning_rate=1e-3"], "Error: optim.learning_rate is not a config key: did you mean optim.lr?"),
        (["experiment=sed"], "Error: experiment=sed is not an option: use one of"),
    ]:
        result = run_script("train.py", *args, f"hydra.run.dir={tmp_path / 'out'}")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=abc"], "optim.lr must be a number, got 'abc'"),
        (["optim.weight_decay=none"], "optim.weight_decay must be a number, got 'none'"),
        (["module.label_smoothing=abc"], "module.label_smoothing must be a number, got 'abc'"),
        (["model.depth=abc"], "model.depth must be an integer, got 'abc'"),
        (["model.depth=2.5"], "model.depth must be an integer, got 2.5"),
        (["scheduler=cosine", "scheduler.warmup_fraction=abc"], "scheduler.warmup_fraction must be a number, got 'abc'"),
        (["data.augment=maybe"], "data.augment must be true or false, got 'maybe'"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer"),
        (["trainer.log_every_n_steps=often"], "trainer.log_every_n_steps must be an integer or null, got 'often'"),
        (["callbacks.model_checkpoint.save_top_k=all"], "callbacks.model_checkpoint.save_top_k must be an integer, got 'all'"),
    ],
)
def test_values_of_the_wrong_type_name_the_key(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as info:
        run.train(make_cfg(overrides))
    assert message in str(info.value), str(info.value)


@pytest.mark.slow
def test_wrong_type_is_one_line_from_the_script(tmp_path):
    result = run_script("train.py", "data=fake", "optim.lr=abc", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: optim.lr must be a number, got 'abc'"]
    assert "optim.lr must be a number" in (tmp_path / "out" / "train.log").read_text()  # the run dir says why it failed


def test_failed_run_logs_its_error_into_the_run_log(make_cfg, tmp_path, capsys):
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit):
            cli.run_reporting_errors(run.train, make_cfg(["optim.lr=-1"]))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert "optim.lr must be > 0, got -1" in log_file.read_text()
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["Error: optim.lr must be > 0, got -1"] and "optim.lr" not in captured.out


def test_known_noise_is_filtered_and_real_messages_stay(caplog):
    cli.quiet_known_noise()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero.info("`Trainer(limit_train_batches=1.0)` was configured so 100% of the batches per epoch will be used..")
        rank_zero.info("`Trainer(limit_train_batches=10)` was configured so 10 batches per epoch will be used.")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == [
        "`Trainer(limit_train_batches=10)` was configured so 10 batches per epoch will be used.",
        "GPU available: False, used: False",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.quiet_known_noise()
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead.", FutureWarning
        )
        warnings.warn("The number of training batches (6) is smaller than the logging interval Trainer(log_every_n_steps=50).", UserWarning)
        warnings.warn("a real warning", UserWarning)
    assert [str(w.message) for w in caught] == ["a real warning"]


def test_a_wrong_command_line_is_answered_before_torch_loads():
    """A typo is answered in under a second: the scripts check their command line before torch and Lightning load
    (Hydra imports the launcher plugin on every start, so it imports them only where used)."""
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', 'nokey=1']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:2] == ["exit 1", "torch not loaded"], done.stdout + done.stderr[-2000:]
    assert "nokey is not a config key" in done.stderr
