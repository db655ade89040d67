"""The default sweep launcher (vit/launcher.py): a CPU sweep's chains of jobs (jobs that differ only in
trainer.max_epochs) side by side in forked workers, each chain in order so that it still trains no epoch twice, each
job ending as it would alone with the same thread count; a failed job fails alone."""

import json
import re
import shlex

import pytest
import torch

from tests.conftest import TINY, run_script
from tests.faults import kill_at
from tests.test_sharing import results
from vit import launcher
from vit.errors import ConfigError


def test_a_sweep_falls_into_chains_of_jobs_that_differ_only_in_their_epoch_count():
    card = [[f"trainer.max_epochs={e}", f"data.batch_size={b}", f"optim.lr={lr}"] for e in (10, 20) for b in (32, 64) for lr in ("1e-3", "1e-4")]
    assert launcher.chains(card) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert launcher.chains([["trainer.max_epochs=20", "optim.lr=1"], ["trainer.max_epochs=10", "optim.lr=1"]]) == [[1, 0]]
    assert launcher.chains([["optim.lr=1"], ["optim.lr=2"], ["optim.lr=1", "trainer.max_epochs=3"]]) == [[0, 2], [1]]


def test_each_job_gets_its_share_of_the_threads_unless_the_sweep_sets_them():
    assert launcher.with_threads(["optim.lr=1"], 2) == ["optim.lr=1", "torch_threads=2"]
    assert launcher.with_threads(["torch_threads=1", "optim.lr=1"], 2) == ["torch_threads=1", "optim.lr=1"]


def test_one_worker_per_torch_thread_on_a_cpu_and_one_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [launcher.workers_for(chains, None) for chains in (1, 2, 4, 8)] == [1, 2, 4, 4]
    assert launcher.workers_for(8, 2) == 2 and launcher.workers_for(8, 1) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launcher.workers_for(8, None) == 1
    with pytest.raises(ConfigError, match=r"hydra.launcher.n_jobs must be null .* or an integer >= 1, got 0"):
        launcher.workers_for(8, 0)


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """Two chains on two workers: lr 1e-3 (jobs 0 and 2) trains; lr -1 (jobs 1 and 3) fails."""
    tmp = tmp_path_factory.mktemp("chains")
    sweep = tmp / "sweep"
    overrides = [*TINY, "data.train_size=192", "trainer.max_epochs=1,2", "optim.lr=1e-3,-1", f"paths.data_dir={tmp / 'data'}"]
    result = run_script("train.py", "-m", *overrides, "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    return sweep, result, tmp


@pytest.mark.slow
def test_chains_run_side_by_side_and_a_failed_job_fails_alone(side_by_side):
    sweep, result, _ = side_by_side
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Launching 4 jobs in 2 chains, 2 at a time, 1 torch thread each" in out
    for job in ("0", "2"):
        assert (sweep / job / "metrics.json").is_file() and json.loads((sweep / job / "run.json").read_text())["torch_threads"] == 1
    assert not (sweep / "1" / "metrics.json").exists() and not (sweep / "3" / "metrics.json").exists()
    assert "Job 2 is job 0 trained on" in (sweep / "2" / "train.log").read_text()
    rows = {line.split("|")[1].strip().split(" ")[0]: line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| ")}
    assert "| ok |" in rows["2"] and "| failed: optim.lr must be > 0, got -1 |" in rows["3"]


@pytest.mark.slow
def test_a_job_of_a_chain_ends_as_it_would_alone(side_by_side):
    sweep, _, tmp = side_by_side
    alone = re.search(r"Alone: python train.py (.*)$", (sweep / "2" / "train.log").read_text(), re.M).group(1)
    assert "torch_threads=1" in alone
    result = run_script("train.py", *shlex.split(alone), f"hydra.run.dir={tmp / 'alone'}")
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics, history, weights), (metrics_alone, history_alone, weights_alone) = results(sweep / "2"), results(tmp / "alone")
    assert metrics == metrics_alone and history == history_alone
    assert all(torch.equal(weights[k], weights_alone[k]) for k in weights)


def test_only_the_first_worker_shows_a_progress_bar(make_cfg, monkeypatch):
    """Two bars redrawn by two processes garble one terminal: the other workers' trainers show none, nor a model summary."""
    from vit.builders import build_trainer

    cfg = make_cfg(["trainer.enable_progress_bar=true", "trainer.enable_model_summary=true"])
    assert build_trainer(cfg, []).progress_bar_callback is not None
    monkeypatch.setenv(launcher.QUIET, "1")
    trainer = build_trainer(cfg, [])
    assert trainer.progress_bar_callback is None and not any(type(c).__name__ == "ModelSummary" for c in trainer.callbacks)


@pytest.mark.slow
def test_a_side_by_side_sweep_stopped_by_ctrl_c_goes_on_with_nothing_lost(side_by_side):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while both workers train: one line says how
    to go on, no traceback; the same command into the same dir finishes every job, and a stopped job ends as the
    uninterrupted sweep's."""
    sweep, _, tmp = side_by_side
    again = tmp / "again"
    steps_per_epoch = (192 - 64) // 32
    kill = kill_at(steps_per_epoch + 2, "SIGINT", group=True)
    command = [*TINY, "data.train_size=192", "trainer.max_epochs=1,2", "optim.lr=1e-3,3e-3", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={again}"]
    stopped = run_script("train.py", "-m", *command, *kill, f"paths.data_dir={tmp / 'data'}", own_session=True)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert f"to go on, run the same command with hydra.sweep.dir={again}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not all((again / job / "metrics.json").is_file() for job in "0123")
    result = run_script("train.py", "-m", *command, f"paths.data_dir={tmp / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((again / job / "metrics.json").is_file() for job in "0123")
    logs = "".join((again / job / "train.log").read_text() for job in "0123")
    assert "stopped in an earlier run of this sweep" in logs
    (metrics, history, weights), (metrics_again, history_again, weights_again) = results(sweep / "2"), results(again / "2")
    assert metrics == metrics_again and history == history_again
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
