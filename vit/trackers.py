"""What differs between the trackers (TensorBoard, CSV, MLflow, W&B) and what every run gives them at its end.

Each tracker names a run its own way, and W&B keeps one run per process until it is finished: a sweep re-tested in
one process must name and finish one run per job. What a run ends with: the settings people compare, with the run's
metrics, under names of their own (``HPARAMS``, ``HPARAMS_METRICS``).
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from vit.errors import ConfigError

# The argument that gives a logger's run its name: its own sub-dir for TensorBoard and CSV (``tensorboard/job0``),
# the run name shown for MLflow and W&B (a W&B ``version`` is the run's id: a second re-test would resume the first).
RUN_NAME_ARGUMENT = {"TensorBoardLogger": "version", "CSVLogger": "version", "MLFlowLogger": "run_name", "WandbLogger": "name"}

# The settings of a run, as the trackers show them: name -> config key (a ``_target_`` shows as its class name).
HPARAMS = {
    "max_epochs": "trainer.max_epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "optimizer": "optim._target_",
    "weight_decay": "optim.weight_decay",
    "scheduler": "scheduler._target_",
    "model": "model.name",
    "data": "data._target_",
    "augment": "data.augment",
    "trivial_augment": "data.trivial_augment",
    "val_size": "data.val_size",
}
HPARAMS_DEFAULTS = {"weight_decay": 0.0, "scheduler": "none", "augment": False, "trivial_augment": False}
MODEL_HPARAMS = ("patch_size", "emb_size", "depth", "num_heads", "seed_attention", "pretrained")  # as model/<key>, where set

# The run's metrics as HPARAMS shows them, under tags of their own: written at step 0 under the curves' own tags,
# TensorBoard would take the step going back as a restart and drop the curves' earlier points.
HPARAMS_METRICS = {"val/acc": "hparams/best_val_acc", "test/acc": "hparams/test_acc", "test/loss": "hparams/test_loss"}


def naming(node: Any, name: str, run_name: str | None) -> dict[str, str]:
    """The constructor argument that gives logger ``name`` (config ``node``) a run called ``run_name``; {} for None."""
    if run_name is None:
        return {}
    argument = RUN_NAME_ARGUMENT.get(str(node.get("_target_", "")).rsplit(".", 1)[-1])
    if argument is None:
        raise ConfigError(f"logger={name} cannot keep the jobs of a sweep apart: test one job at a time (ckpt=SWEEP_DIR/<job>)")
    return {argument: run_name}


def hparams(cfg: DictConfig, params: int) -> dict[str, Any]:
    values = {}
    for name, key in HPARAMS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if name == "model" and not value:  # the manual's ViT has no name: its class
            key, value = "model._target_", cfg.model._target_
        if key.endswith("._target_") and value is not None:
            value = str(value).rsplit(".", 1)[-1]
        values[name] = HPARAMS_DEFAULTS.get(name) if value is None else value
    values["params"] = params
    values.update({f"model/{k}": cfg.model[k] for k in MODEL_HPARAMS if cfg.model.get(k) is not None})
    values["seed"] = cfg.get("seed")
    return values


def log_run_end(trainer: L.Trainer, cfg: DictConfig, params: int, metrics: dict[str, Any]) -> None:
    """The settings people compare, with the run's real metrics (the best epoch's val/acc), to every logger:
    TensorBoard's HPARAMS tab takes them together, under tags of their own (``HPARAMS_METRICS``); the others
    (CSV, MLflow, W&B) get the settings as hyperparameters and the metrics as ``final/val/acc``,
    ``final/test/acc``, ``final/test/loss``. Then each logger's run is closed."""
    settings = hparams(cfg, params)
    final = {k: v for k, v in metrics.items() if k in HPARAMS_METRICS and v is not None}
    for logger in trainer.loggers:
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(settings, metrics={HPARAMS_METRICS[k]: v for k, v in final.items()})
        else:
            logger.log_hyperparams(settings)
            logger.log_metrics({f"final/{k}": v for k, v in final.items()}, step=trainer.global_step)
    close(trainer)


def close(trainer: L.Trainer, failed: bool = False) -> None:
    """Ends every logger's run, so the next run in this process (a sweep's next job) gets a run of its own; ``failed``:
    after an error, which Lightning has already told the loggers of."""
    for logger in trainer.loggers:
        if not failed:
            logger.finalize("success")
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=1 if failed else 0)  # W&B's current run, which a new WandbLogger would join
