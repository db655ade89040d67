"""logger=csv, mlflow, wandb and several at once: each holds the run's curves, settings and final metrics."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig

from tests.conftest import wandb_records
from vit.errors import ConfigError
from vit.run import train


def tiny_run(make_cfg, logger: str) -> tuple[DictConfig, Path, dict]:
    cfg = make_cfg([f"logger={logger}", "trainer.max_epochs=2", "data.train_size=128"])
    return cfg, Path(cfg.paths.output_dir), train(cfg)


@pytest.mark.slow
def test_csv_and_mlflow_hold_curves_settings_and_final_metrics(make_cfg):
    mlflow = pytest.importorskip("mlflow")
    cfg, run_dir, metrics = tiny_run(make_cfg, "[csv,mlflow]")  # a list of loggers

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val) == 2 and max(val) == pytest.approx(metrics["val/acc"])
    assert sum(1 for r in rows if r.get("train/loss_step")) == 4  # 2 epochs x 2 batches, one row each (log_every_n_steps=1)
    assert [float(r["test/acc"]) for r in rows if r.get("test/acc")] == [pytest.approx(metrics["test/acc"])]
    (final,) = [r for r in rows if r.get("final/test/acc")]
    assert float(final["final/val/acc"]) == pytest.approx(metrics["val/acc"])
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["lr"] == cfg.optim.lr and hparams["max_epochs"] == 2 and hparams["model"] == "ViT" and hparams["params"] > 0

    client = mlflow.tracking.MlflowClient(cfg.logger.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vit").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(run_dir)
    assert run.data.params["lr"] == str(cfg.optim.lr) and run.data.params["optimizer"] == "Adam"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")] == list(range(4))
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run.data.metrics["final/val/acc"] == pytest.approx(metrics["val/acc"])
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics


def test_wandb_offline_keeps_the_run_in_the_run_dir(make_cfg, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, run_dir, metrics = tiny_run(make_cfg, "wandb")
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    data = wandb_records(offline, b"final/test/acc")  # protobuf records, values as JSON text
    for name in (b"train/loss_step", b"val/acc", b"max_epochs", b"final/test/acc"):
        assert name in data, name
    assert json.dumps(metrics["test/acc"]).encode() in data


def test_many_is_tensorboard_csv_and_mlflow(make_cfg):
    cfg = make_cfg(["logger=many"])
    assert list(cfg.logger) == ["tensorboard", "csv", "mlflow"]
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{cfg.paths.log_dir}/mlflow.db"


def test_a_tracker_not_installed_is_one_line_naming_the_extra(make_cfg, monkeypatch):
    monkeypatch.setattr("lightning.pytorch.loggers.mlflow._MLFLOW_AVAILABLE", False)
    with pytest.raises(ConfigError, match=r'^logger=mlflow needs its tracker \(.*\): pip install -e "\.\[trackers\]"$'):
        train(make_cfg(["logger=mlflow"]))
