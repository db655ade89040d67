"""train(cfg) / test(cfg) end to end on small generated data, and the command line as a user runs it."""

import json
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from tests.conftest import make_image_folder, run_script
from vit import callbacks, run
from vit.cli import run_reporting_errors
from vit.errors import ConfigError
from vit.run import train


def run_files(run: Path) -> dict:
    return {
        "metrics": json.loads((run / "metrics.json").read_text()),
        "ckpts": sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")),
        "events": list(run.rglob("events.out.tfevents.*")),
    }


def test_training_learns_two_easy_classes(make_cfg):
    cfg = make_cfg(["data.num_classes=2", "trainer.max_epochs=3", "optim.lr=3e-3"])
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.9, metrics  # chance is 0.5
    assert metrics["val/acc"] > 0.9


def test_train_then_test_gives_the_same_accuracy(make_cfg, capsys):
    cfg = make_cfg(["trainer.max_epochs=2"])
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    files = run_files(run_dir)
    assert files["metrics"] == metrics
    assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["val/acc"] <= 1 and metrics["test/loss"] > 0
    assert "last.ckpt" in files["ckpts"] and any(c.startswith("epoch") and "val_acc" in c for c in files["ckpts"])
    assert not any("=" in c for c in files["ckpts"])
    assert files["events"]
    assert f"Accuracy on test set: {100 * metrics['test/acc']:.2f}%" in capsys.readouterr().out

    tested = run.test(make_cfg([f"ckpt={run_dir}"], name="test", run="test"))
    assert tested["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert tested["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert json.loads((Path(cfg.paths.output_dir).parent / "test" / "metrics.json").read_text()) == tested


def test_the_average_of_the_weights_forgets_the_initial_ones():
    """A parameter at 1.0 that jumps to 0.0 and stays there: the init's share of the average after 300 updates is
    what the warmup recursion gives, and nothing like the 0.999^300 = 74% a fixed decay keeps."""
    p = torch.nn.Parameter(torch.ones(1))
    averaged = torch.optim.swa_utils.AveragedModel(torch.nn.ParameterList([p]), avg_fn=callbacks.ema_with_warmup(0.999))
    averaged.update_parameters(torch.nn.ParameterList([p]))  # the first update copies the init
    share = 1.0
    with torch.no_grad():
        p.zero_()
    for n in range(1, 301):
        averaged.update_parameters(torch.nn.ParameterList([p]))
        share *= min(0.999, (1 + n) / (10 + n))
    assert averaged.module[0].item() == pytest.approx(share, rel=1e-4)
    assert share < 0.05


def test_an_average_of_the_weights_is_what_the_run_validates_saves_tests_and_resumes(make_cfg):
    ema = ["callbacks=ema", "callbacks.ema.decay=0.9"]
    full = make_cfg([*ema, "trainer.max_epochs=2"], run="full")
    metrics = train(full)
    saved = torch.load(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(not torch.equal(saved["state_dict"][k], saved["current_model_state"][k]) for k in saved["state_dict"])
    tested = run.test(make_cfg([f"ckpt={full.paths.output_dir}"], name="test", run="test"))  # reads the averaged state_dict
    assert tested["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    first = make_cfg([*ema, "trainer.max_epochs=1"], run="first")
    train(first)
    resumed = make_cfg([*ema, "trainer.max_epochs=2", f"ckpt_path={first.paths.output_dir}"], run="resumed")
    assert train(resumed) == metrics
    with pytest.raises(ConfigError, match="callbacks.ema.decay must be between 0 and 1"):
        train(make_cfg(["callbacks=ema", "callbacks.ema.decay=1"], run="bad"))


def test_val_size_zero_keeps_the_last_epoch(make_cfg):
    cfg = make_cfg(["data.val_size=0", "trainer.max_epochs=2"])
    metrics = train(cfg)
    files = run_files(Path(cfg.paths.output_dir))
    assert files["metrics"]["val/acc"] is None and metrics["test/acc"] is not None
    assert files["ckpts"] == ["epoch001.ckpt", "last.ckpt"]


def test_folder_data_trains(make_cfg, tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=8)
    cfg = make_cfg(["data=folder", f"data.root={root}", "data.val_size=4", "data.batch_size=4", "trainer.max_epochs=1"], tiny=False)
    metrics = train(cfg)
    assert metrics["test/acc"] is not None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1"),
        ("data.val_size=256", "data.val_size=256 must be smaller"),
        ("model.n_classes=100", "model.n_classes=100 but the data has 10 classes"),
        ("model.num_heads=3", "emb_size=16 is not divisible by num_heads=3"),
        ("model.img_size=30", "img_size=30 is not divisible by patch_size=8"),
        ("model.img_size=64", "data gives 3x32x32 images but the model expects 3x64x64"),
    ],
)
def test_bad_values_fail_before_training(make_cfg, override, message):
    cfg = make_cfg([override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("+", r"\+")):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_default_data_offline_is_one_line_naming_the_fix(make_cfg, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    cfg = make_cfg(tiny=False)
    with pytest.raises(SystemExit) as info:
        run_reporting_errors(train, cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data=folder data.root=" in err[0] and "data=fake" in err[0]


@pytest.mark.parametrize(
    ("ckpt", "message"), [(None, "no checkpoint given"), ("does/not/exist", "does/not/exist does not exist"), ("empty", "is empty")]
)
def test_a_checkpoint_that_is_not_there_is_named_in_one_line(make_cfg, tmp_path, ckpt, message):
    (tmp_path / "empty").mkdir()
    given = [] if ckpt is None else [f"ckpt={tmp_path / ckpt if ckpt == 'empty' else ckpt}"]
    with pytest.raises(ConfigError, match=message) as info:
        run.test(make_cfg(given, name="test"))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_test_script_errors_are_one_line(tmp_path):
    """From the script: the line alone on stderr, exit code 1, no traceback (the messages: the test above)."""
    result = run_script("test.py", "ckpt=does/not/exist", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "does/not/exist does not exist" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_train_script_bad_value_is_one_line(tmp_path):
    result = run_script("train.py", "data=fake", "optim.lr=-1", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: optim.lr must be > 0, got -1"]


@pytest.mark.slow
def test_compiled_model_checkpoint_loads_with_test_py(make_cfg, tmp_path, monkeypatch):
    compile_in_place = torch.nn.Module.compile  # dynamo's graph capture alone: what wraps the net; inductor's code is not the point
    monkeypatch.setattr(torch.nn.Module, "compile", lambda net, **kw: compile_in_place(net, **{**kw, "backend": "eager"}))
    cfg = make_cfg(["model.compile=true", "trainer.max_epochs=1", "data.train_size=128"])
    metrics = train(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    result = run_script("test.py", f"ckpt={cfg.paths.output_dir}", f"hydra.run.dir={tmp_path / 'test'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Accuracy on test set: {100 * metrics['test/acc']:.2f}%" in result.stdout
    assert "Tip:" not in result.stderr and "limit_train_batches=1.0" not in result.stderr  # Lightning's known noise
    assert "GPU available" in result.stderr  # and its real messages stay
