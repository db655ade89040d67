"""Bad input gets one line naming the fix; crashes, Ctrl-C and NaNs lose nothing; resumed runs end as uninterrupted ones."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, TINY, make_image_folder, run_script
from tests.faults import kill_at
from vit import checkpoints, run
from vit.cli import run_reporting_errors
from vit.model import ViT


def one_line_error(task, cfg, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_reporting_errors(task, cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), err
    return err[0]


def broken_folder(tmp_path: Path, kind: str) -> Path:
    root = make_image_folder(tmp_path / "images")
    if kind == "no_test":
        for f in sorted((root / "test").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (root / "test").rmdir()
    elif kind == "classes_differ":
        (root / "test" / "dog").rename(root / "test" / "wolf")
    elif kind == "unreadable":
        (root / "train" / "dog" / "0002.png").write_bytes(b"\x89PNG broken")
    return root


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("no_test", "has no test/ folder"),
        ("classes_differ", "class folders differ"),
        ("unreadable", "cannot read image"),
    ],
)
def test_folder_data_errors(make_cfg, tmp_path, capsys, kind, message):
    root = tmp_path / "nowhere" if kind == "missing" else broken_folder(tmp_path, kind)
    cfg = make_cfg(["data=folder", f"data.root={root}", "data.val_size=1"], tiny=False)
    line = one_line_error(run.train, cfg, capsys)
    assert message in line and str(root) in line


def test_bad_values_exit_1_with_the_key(make_cfg, capsys):
    for override, key in [("optim.lr=0", "optim.lr"), ("data.batch_size=0", "data.batch_size"), ("trainer.max_epochs=0", "trainer.max_epochs")]:
        assert key in one_line_error(run.train, make_cfg([override]), capsys)


@pytest.fixture
def bad_checkpoints(tmp_path, trained_run) -> dict[str, Path]:
    good = next((trained_run / "checkpoints").glob("epoch*.ckpt"))
    files = {"empty_dir": tmp_path / "empty", "no_ckpts": tmp_path / "notes"}
    files["empty_dir"].mkdir()
    files["no_ckpts"].mkdir()
    (files["no_ckpts"] / "notes.txt").write_text("no checkpoints here")
    files["truncated"] = tmp_path / "truncated.ckpt"
    files["truncated"].write_bytes(good.read_bytes()[:5000])
    files["random"] = tmp_path / "random.ckpt"
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["state_dict"] = tmp_path / "weights.pt"
    torch.save(ViT(patch_size=4, emb_size=16, img_size=32, depth=1, n_classes=10).state_dict(), files["state_dict"])
    files["other_model"] = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"lr": 0.1}}, files["other_model"])
    files["missing"] = tmp_path / "missing.ckpt"
    return files


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty_dir", "is empty"),
        ("no_ckpts", "no checkpoints (*.ckpt)"),
        ("truncated", "truncated or corrupt"),
        ("random", "corrupt or random bytes"),
        ("state_dict", "plain state_dict"),
        ("other_model", "checkpoint of another model"),
    ],
)
def test_bad_checkpoints_say_what_they_are(make_cfg, capsys, bad_checkpoints, kind, message):
    cfg = make_cfg([f"ckpt={bad_checkpoints[kind]}"], name="test")
    line = one_line_error(run.test, cfg, capsys)
    assert message in line and str(bad_checkpoints[kind]) in line


def test_checkpoint_on_data_with_other_classes_is_an_error(make_cfg, capsys, trained_run):
    cfg = make_cfg([f"ckpt={trained_run}", "data=fake", "data.num_classes=3"], name="test")
    assert "10 classes but the data has 3" in one_line_error(run.test, cfg, capsys)


class WritesAFile:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_checkpoint_runs_no_code(make_cfg, capsys, tmp_path):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": WritesAFile(target)}, evil)
    assert not target.exists()
    line = one_line_error(run.test, make_cfg([f"ckpt={evil}"], name="test"), capsys)
    assert "refused" in line and not target.exists()


@pytest.mark.parametrize("every_step", [None, False])  # False: the sync-free check a GPU gets, read every few steps
def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(make_cfg, capsys, every_step):
    cfg = make_cfg(
        [
            "trainer.max_epochs=3",
            "trainer.log_every_n_steps=4",
            f"callbacks.stop_on_non_finite_loss.every_step={'null' if every_step is None else every_step}",
            "+callbacks.poison._target_=tests.faults.PoisonAtEpoch",
            "+callbacks.poison.epoch=1",
        ]
    )
    line = one_line_error(run.train, cfg, capsys)
    steps_per_epoch = (256 - 64) // 32
    assert f"loss became nan at step {steps_per_epoch}" in line and "lower optim.lr" in line
    ckpts = sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert ckpts[0].startswith("epoch000-") and "last.ckpt" in ckpts
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


RESUMABLE = [*TINY, "data.train_size=512", "trainer.max_epochs=4", "data.augment=true", "model.drop_p=0.1"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(make_cfg, tmp_path):
    """kill -9 in the middle of epoch 2, resume from last.ckpt: the same metrics.json as a run never killed."""
    uninterrupted = run.train(make_cfg(RESUMABLE[len(TINY) :], run="full"))
    killed = tmp_path / "killed"
    steps_per_epoch = (512 - 64) // 32
    result = run_script(
        "train.py",
        *RESUMABLE,
        "+callbacks.kill._target_=tests.faults.KillAtStep",
        f"+callbacks.kill.step={2 * steps_per_epoch + 3}",
        f"hydra.run.dir={killed}",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (killed / "metrics.json").exists()
    resumed = tmp_path / "resumed"
    result = run_script(
        "train.py", *RESUMABLE, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={resumed}", f"paths.data_dir={tmp_path / 'data'}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((resumed / "metrics.json").read_text()) == uninterrupted
    assert result.stdout.strip().splitlines()[-2:] == [f"Test it again: python test.py ckpt={resumed}", f"Run dir: {resumed}"]
    curve = lambda run_dir: json.loads((run_dir / "run.json").read_text())["history"]  # noqa: E731
    assert curve(resumed) == curve(tmp_path / "full")  # every epoch once, the one of last.ckpt too (the sweep plot's points)
    assert list((killed / "checkpoints").glob("epoch*.ckpt")), "the killed run's best checkpoint is kept"


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    steps_per_epoch = (256 - 64) // 32
    result = run_script(
        "train.py",
        *TINY,
        "trainer.max_epochs=3",
        *kill_at(steps_per_epoch + 2, "SIGINT"),
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    assert result.returncode != 0
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    assert interrupted.exists() and "resume with ckpt_path=" in result.stdout
    assert torch.load(interrupted, weights_only=True)["global_step"] == steps_per_epoch + 2


def test_ckpt_path_last_finds_the_newest_run_with_this_config(make_cfg):
    first = make_cfg(["trainer.max_epochs=1"], run="first")
    run.train(first)
    (Path(first.paths.output_dir) / ".hydra").mkdir()
    (Path(first.paths.output_dir) / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(first))
    assert (
        checkpoints.latest_resume_point(make_cfg(["trainer.max_epochs=1", "ckpt_path=last"], run="second"))
        == Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    )
    with pytest.raises(run.ConfigError, match="ckpt_path=last: no earlier run"):
        checkpoints.latest_resume_point(make_cfg(["trainer.max_epochs=1", "optim.lr=0.01", "ckpt_path=last"], run="third"))


def test_resuming_another_model_is_an_error(make_cfg, capsys, trained_run):
    cfg = make_cfg([f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "model.depth=2"])
    assert "was trained with model.depth=1" in one_line_error(run.train, cfg, capsys)


def test_deterministic_runs_are_identical(make_cfg):
    overrides = ["trainer.deterministic=true", "trainer.max_epochs=2", "data.augment=true", "model.drop_p=0.1"]
    assert run.train(make_cfg(overrides, run="a")) == run.train(make_cfg(overrides, run="b"))


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_their_own_dirs(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_epochs=1"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 2 and all((r / "metrics.json").exists() for r in runs)
    assert all(list(r.rglob("events.out.tfevents.*")) for r in runs)
