"""A sweep trains no epoch twice (vit/sharing.py): a job that is another trained for more epochs starts where that one
ended, and ends exactly as it would alone; a sweep run again into its dir trains nothing twice."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY, run_script
from tests.faults import kill_at
from vit import sharing
from vit.errors import ConfigError

SWEEP = [*TINY, "data.train_size=192", "trainer.max_epochs=1,2"]


def sweep(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    sweep_dir = tmp_path / name
    result = run_script("train.py", "-m", *SWEEP, *extra, f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result.stdout + result.stderr


def results(job: Path) -> tuple[dict, list, dict]:
    """metrics.json, the per-epoch curve and the final weights of a job: everything it gives but its timings."""
    history = [{k: v for k, v in epoch.items()} for epoch in json.loads((job / "run.json").read_text())["history"]]
    weights = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return json.loads((job / "metrics.json").read_text()), history, weights


def scalar_steps(job: Path, tag: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(job / "tensorboard"))
    accumulator.Reload()
    return len(accumulator.Scalars(tag))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The same 2-job sweep twice: sharing (the default) and every job on its own (share_epochs=false)."""
    tmp = tmp_path_factory.mktemp("sharing")
    return sweep(tmp, "shared"), sweep(tmp, "alone", "share_epochs=false"), tmp


@pytest.mark.slow
def test_the_longer_job_starts_from_the_shorter_and_ends_as_it_would_alone(swept):
    (shared, out), (alone, out_alone), _ = swept
    assert "job 1 (2 epochs) starts from job 0's 1" in out
    assert "share_epochs=false" in out_alone and "every job trains on its own" in out_alone
    summary = json.loads((shared / "1" / "run.json").read_text())
    assert summary["shared_from"] == str(shared / "0") and summary["shared_epochs"] == 1
    assert "shared_from" not in json.loads((alone / "1" / "run.json").read_text())
    for job in ("0", "1"):
        metrics, history, weights = results(shared / job)
        metrics_alone, history_alone, weights_alone = results(alone / job)
        assert metrics == metrics_alone and history == history_alone
        assert weights.keys() == weights_alone.keys() and all(torch.equal(weights[k], weights_alone[k]) for k in weights)


@pytest.mark.slow
def test_the_longer_job_has_a_complete_dir_of_its_own(swept):
    (shared, _), _, _ = swept
    job = shared / "1"
    best = json.loads((job / "run.json").read_text())["ckpt"]
    assert Path(best).parent == job / "checkpoints" and Path(best).is_file()  # its best, among its own files
    assert scalar_steps(job, "val/acc") == 2 and scalar_steps(shared / "0", "val/acc") == 1  # curves end at each job's last epoch
    assert scalar_steps(job, "test/acc") == 1  # its own test, not also the shorter job's
    log = (job / "train.log").read_text()
    assert "starts from that job's epoch 1" in log and "python train.py" in log and "share_epochs=false" in log


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_and_run_again_trains_nothing_twice(swept):
    """Ctrl-C in the longer job's second epoch (after job 0 finished), then the same command into the same dir: job 0 is
    read back, not trained or tested again; job 1 resumes where it stopped and ends as the sweep never stopped."""
    (shared, _), _, tmp = swept
    again = tmp / "again"
    steps_per_epoch = (192 - 64) // 32
    kill = kill_at(steps_per_epoch + 2, "SIGINT")
    common = [f"hydra.sweep.dir={again}", f"paths.data_dir={tmp / 'data'}"]
    stopped = run_script("train.py", "-m", *SWEEP, *kill, *common)
    assert stopped.returncode != 0 and (again / "1" / "checkpoints" / "interrupted.ckpt").is_file(), stopped.stderr[-3000:]
    assert not (again / "1" / "metrics.json").exists()
    finished_at = (again / "0" / "metrics.json").stat().st_mtime_ns
    result = run_script("train.py", "-m", *SWEEP, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (again / "0" / "metrics.json").stat().st_mtime_ns == finished_at
    assert "finished in an earlier run of this sweep" in (again / "0" / "train.log").read_text()
    assert "stopped in an earlier run of this sweep" in (again / "1" / "train.log").read_text()
    before, after = results(shared / "1"), results(again / "1")
    assert after[0] == before[0] and after[1] == before[1] and all(torch.equal(after[2][k], before[2][k]) for k in before[2])


@pytest.mark.parametrize(
    ("override", "reason"),
    [("scheduler=cosine", "schedule"), ("data.train_sizes=[16,32]", "train_sizes"), ("trainer.max_epochs=-1", "epoch limit")],
)
def test_what_depends_on_the_epoch_count_blocks_sharing(make_cfg, override, reason):
    cfg = make_cfg([override])
    assert sharing.blockers(make_cfg([])) == []
    assert any(reason in r for r in sharing.blockers(cfg))


def test_the_first_lines_say_which_jobs_share_and_why_others_dont(make_cfg):
    cfg = make_cfg([])
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    card = ["trainer.max_epochs=10,20", "data.batch_size=32,64", "optim.lr=1e-3,1e-4"]
    (line,) = sharing.sharing_lines(card, cfg, basic)
    assert line.count("starts from") == 4 and "job 4 (20 epochs) starts from job 0's 10" in line
    backwards = sharing.sharing_lines(["trainer.max_epochs=20,10", "optim.lr=1e-3,1e-4"], cfg, basic)
    assert "increasing order" in backwards[-1] and "jobs 2, 3" in backwards[-1].lower()
    assert "scheduler" in sharing.sharing_lines(card, make_cfg(["scheduler=cosine"]), basic)[0]
    assert "side by side" in sharing.sharing_lines(card, cfg, "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")[0]
    assert "off" in sharing.sharing_lines(card, make_cfg(["share_epochs=false"]), basic)[0]


def test_only_jobs_of_the_same_config_share(make_cfg, tmp_path):
    """A finished sibling with another lr (or more epochs, or run the other way of compiled and eager) is no prefix; one with
    the same config and fewer epochs is."""
    sweep_dir = tmp_path / "sweep"
    own = make_cfg(["trainer.max_epochs=3"], run="sweep/9")
    for number, overrides in enumerate([["optim.lr=0.01", "trainer.max_epochs=1"], ["trainer.max_epochs=2"], ["trainer.max_epochs=4"]]):
        job = sweep_dir / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "last.ckpt").write_bytes(b"")
        (job / "metrics.json").write_text("{}")
        epochs = int(overrides[-1].split("=")[1])
        (job / "run.json").write_text(json.dumps({"history": [{}] * epochs}))
        OmegaConf.save(make_cfg(overrides, run=f"sweep/{number}"), job / ".hydra" / "config.yaml")
    assert sharing.longest_prefix(own, sweep_dir / "9") == (sweep_dir / "1", 2)
    assert sharing.longest_prefix(own, sweep_dir / "9", compiled=True) is None  # compiled and eager round differently
    (sweep_dir / "1" / "metrics.json").unlink()  # unfinished (or failed): trained alone
    assert sharing.longest_prefix(own, sweep_dir / "9") is None


def test_a_sweep_run_again_with_other_settings_into_its_dir_is_refused(make_cfg, tmp_path, monkeypatch):
    """A finished job of the dir keeps its results only for the settings it finished with; others are refused in one line."""
    from vit import checkpoints

    monkeypatch.setattr(sharing, "in_sweep", lambda: True)
    finished = make_cfg(["trainer.max_epochs=1", "optim.lr=0.001"], run="sweep/0")
    job = Path(finished.paths.output_dir)
    (job / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"config": checkpoints.stored_config(finished, ["a", "b"])}}, job / "checkpoints" / "last.ckpt")
    (job / "metrics.json").write_text('{"test/acc": 0.5}')
    (job / "run.json").write_text(json.dumps({"history": [{}]}))
    again = make_cfg(["trainer.max_epochs=1", "optim.lr=0.001"], run="sweep/0")
    assert sharing.plan(again, checkpoints.stored_config(again, ["a", "b"])) == {"done": {"test/acc": 0.5}}
    changed = make_cfg(["trainer.max_epochs=1", "optim.lr=0.01"], run="sweep/0")
    with pytest.raises(ConfigError, match=r"job 0 of this sweep dir finished with optim.lr=0.001: run the changed sweep into a new dir"):
        sharing.plan(changed, checkpoints.stored_config(changed, ["a", "b"]))


def test_a_sibling_whose_config_is_still_being_written_is_passed_over(make_cfg, tmp_path, monkeypatch):
    """Side by side (vit.launcher, joblib) a job may look at a sibling whose .hydra/config.yaml is half written."""
    monkeypatch.setattr(sharing, "in_sweep", lambda: True)
    cfg = make_cfg(["trainer.max_epochs=2"])
    job = tmp_path / "sweep" / "1"
    (tmp_path / "sweep" / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / ".hydra" / "config.yaml").write_text("seed: 42\n")  # cut before its trainer section
    job.mkdir(parents=True)
    assert sharing.longest_prefix(cfg, job) is None
