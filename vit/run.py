"""``train(cfg)`` and ``test(cfg)``: what ``train.py`` and ``test.py`` call, and what the tests call.

The objects come from ``vit.builders``, which checkpoint to resume from or to test from ``vit.checkpoints``, what the
trackers get at a run's end from ``vit.trackers``; here is the order in which a run uses them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from vit import checkpoints, report, sharing, trackers
from vit.builders import (
    build_callbacks,
    build_net,
    build_trainer,
    check_input_shape,
    check_train_sizes,
    compile_if_it_pays,
    evaluation_module,
    instantiate,
    module_factory,
)
from vit.callbacks import RunStats
from vit.data import ImageDataModule
from vit.errors import ConfigError
from vit.module import ClassifierModule
from vit.precision import on_cuda, settle_for_net

log = logging.getLogger(__name__)

Metrics = dict[str, Any]


def check_run_settings(cfg: DictConfig) -> None:
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and not (isinstance(max_epochs, int) and (max_epochs >= 1 or max_epochs == -1)):
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1 (or -1 for no limit), got {max_epochs!r}")
    if cfg.get("seed") is not None and not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer or null, got {cfg.seed!r}")
    threads = cfg.get("torch_threads")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"torch_threads must be null (torch's default) or an integer >= 1, got {threads!r}")


def build_for_fit(cfg: DictConfig) -> tuple[ImageDataModule, torch.nn.Module, ClassifierModule]:
    """The DataModule (set up for fitting), the net and the LightningModule, as a training run builds them.

    The module carries the run's stored config (``checkpoints.stored_config``), which every checkpoint stores.
    The benchmarks build their runs here too.
    """
    datamodule: ImageDataModule = instantiate(cfg.data, "data")
    net = build_net(cfg.model, datamodule.num_classes)
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_input_shape(datamodule, net)
    check_train_sizes(datamodule, net, cfg.model)
    channels, *side = datamodule.image_shape()
    why_fp32 = settle_for_net(cfg.trainer, net, [(channels, s, s) for s in datamodule.train_sizes or []] or [(channels, *side)])
    if why_fp32:
        log.info("Training in 32-true precision, not this CPU's bf16 (%s; set trainer.precision=32-true to say so)", why_fp32)
        with open_dict(cfg):
            cfg.trainer.precision = "32-true"
    module = module_factory(cfg.get("module"))(
        net=net,
        optimizer=instantiate(cfg.optim, "optim"),
        scheduler=instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        config=checkpoints.stored_config(cfg, datamodule.classes),
    )
    if cfg.model.get("compile") == "auto":
        compile_if_it_pays(net, cfg.trainer, training_steps(cfg, datamodule))
    return datamodule, net, module


def training_steps(cfg: DictConfig, datamodule: ImageDataModule) -> int:
    """About how many optimizer steps the run takes: batches per epoch (``trainer.limit_train_batches`` applied) times epochs."""
    batches = len(datamodule.train_set) // datamodule.batch_size
    limit = cfg.trainer.get("limit_train_batches", 1.0)
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    return batches * max(cfg.trainer.get("max_epochs") or 1, 1)


def train(cfg: DictConfig) -> Metrics:
    """Fits the model, tests the best checkpoint (``test: true``) and returns the metrics also written to metrics.json."""
    check_run_settings(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        log.info("Seed: %d", cfg.seed)
    if on_cuda(cfg.trainer):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    datamodule, net, module = build_for_fit(cfg)

    trainer = build_trainer(cfg, build_callbacks(cfg), **({} if datamodule.has_val else {"limit_val_batches": 0}))
    if trainer.world_size > 1:
        accumulate = trainer.accumulate_grad_batches
        log.info(
            "%d processes: effective batch size %d (data.batch_size %d x %d processes x trainer.accumulate_grad_batches %d)",
            trainer.world_size,
            datamodule.batch_size * trainer.world_size * accumulate,
            datamodule.batch_size,
            trainer.world_size,
            accumulate,
        )
    start = sharing.plan(
        cfg, module.hparams["config"], sharing.is_compiled(net)
    )  # a job of a sweep: done already, stopped, or another job trained for fewer epochs
    if start and "done" in start:
        return start["done"]
    ckpt_path = checkpoints.resume_from(cfg, module.hparams["config"], path=start["resume"] if start else None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # Ctrl-C exits inside (interrupted.ckpt)
    except BaseException:
        trackers.close(trainer, failed=True)
        raise

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else None
    best_score = checkpoint.best_model_score if best_path else None
    metrics: Metrics = {
        "val/acc": float(best_score) if datamodule.has_val and best_score is not None else None,
        "epochs": trainer.current_epoch,
    }
    summary = run_summary(trainer, net, best_path, start)  # before testing, which restores the callbacks' state of the best epoch
    summary.update({"resumed": module.hparams["config"]["resumed"]} if module.hparams["config"].get("resumed") else {})
    if cfg.get("test"):
        tested = "best" if datamodule.has_val and best_path else None
        log.info("Testing %s", best_path if tested else "the final weights")
        metrics.update(as_metrics(trainer.test(module, datamodule=datamodule, ckpt_path=tested, weights_only=True)))
    if trainer.is_global_zero:  # under DDP every rank has the same (synced) metrics; one writes them
        report_metrics(metrics, cfg.paths.output_dir)
        (Path(cfg.paths.output_dir) / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        trackers.log_run_end(trainer, cfg, summary["params"], metrics)
    return metrics


def run_summary(trainer: L.Trainer, net: torch.nn.Module, best_path: str | None, start: dict | None = None) -> dict[str, Any]:
    """``run.json``: what the sweep report shows beside the metrics, kept out of metrics.json (which must not vary with timing)."""
    stats = next((c for c in trainer.callbacks if isinstance(c, RunStats)), None)
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "precision": str(trainer.precision),  # what it trained in (trainer.precision=null: chosen for the device, vit.precision)
        "torch_threads": torch.get_num_threads(),  # the rounding of a CPU run depends on it (torch_threads)
        "compiled": sharing.is_compiled(net),  # model.compile=auto: whether it paid here (vit.builders.compile_pays)
        "ckpt": best_path or None,
        "train_time_s": round(stats.train_time_s, 3) if stats else None,
        "images_per_s": round(stats.images_per_s, 1) if stats and stats.images_per_s else None,
        "images": stats.images if stats else None,  # every training image of the run, a resumed run's earlier epochs included
        "history": list(stats.history) if stats else [],
        **({"shared_from": start["from"], "shared_epochs": start["epochs"]} if start and "from" in start else {}),
    }


def as_metrics(results: list[dict[str, float]]) -> Metrics:
    """``trainer.test``'s results as this project's metrics."""
    return {"test/acc": float(results[0]["test/acc"]), "test/loss": float(results[0]["test/loss"])}


def report_metrics(metrics: Metrics, output_dir: str | Path) -> None:
    """Prints the manual's closing line and writes ``metrics.json`` into the run dir."""
    if metrics.get("test/acc") is not None:
        print(f"Accuracy on test set: {100 * metrics['test/acc']:.2f}%")
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("Metrics written to %s", path)


def test(cfg: DictConfig) -> Metrics:
    """Evaluates a checkpoint (or every job of a sweep dir) on the test split of the data it was trained on (or ``data=...``)."""
    if cfg.get("ckpt") and report.is_sweep_dir(cfg.ckpt):
        return evaluate_sweep(cfg, Path(cfg.ckpt))
    metrics = evaluate_checkpoint(cfg, checkpoints.resolve(cfg.get("ckpt")))
    if rank_zero_only.rank == 0:  # under DDP every rank has the same (synced) metrics; one writes them
        report_metrics(metrics, cfg.paths.output_dir)
    return metrics


# What the model was trained to see: kept from the checkpoint when testing on other data.
PREPROCESSING = ("mean", "std", "image_size")


def evaluation_data(cfg: DictConfig, config: dict) -> ImageDataModule:
    """The checkpoint's own data, or ``data=...`` with the checkpoint's preprocessing and its classes' order."""
    if not cfg.get("data"):
        return instantiate(config["data"], "data")
    options = OmegaConf.to_container(cfg.data, resolve=True)
    trained = {k: config["data"][k] for k in PREPROCESSING if k in config["data"]}
    changed = [f"data.{k}={options.get(k)}" for k in trained if options.get(k) != trained[k]]
    if changed:
        log.warning("Testing with the checkpoint's preprocessing (%s), not %s", ", ".join(f"{k}={v}" for k, v in trained.items()), ", ".join(changed))
    # The size the model saw (its img_size where the training data needed no resizing), whatever this data stores.
    trained["image_size"] = trained.get("image_size") or config["model"].get("img_size")
    return instantiate({**options, **trained}, "data")


def evaluate_checkpoint(cfg: DictConfig, path: Path, run_name: str | None = None) -> Metrics:
    """The test metrics of one checkpoint; ``run_name`` names its run in every logger (a job of a re-tested sweep)."""
    module = evaluation_module(path)
    config = module.hparams["config"]
    log.info("Testing %s", path)
    datamodule = evaluation_data(cfg, config)
    if datamodule.num_classes != module.net.n_classes:
        raise ConfigError(
            f"the checkpoint's model has {module.net.n_classes} classes but the data has {datamodule.num_classes}: "
            "test it on the data it was trained on (leave out data=...)"
        )
    datamodule.setup("test")
    if "classes" in config:
        datamodule.use_classes(config["classes"])
    check_input_shape(datamodule, module.net)
    trainer = build_trainer(cfg, build_callbacks(cfg), run_name=run_name)
    metrics = {"ckpt": str(path), **as_metrics(trainer.test(module, datamodule=datamodule))}
    trackers.close(trainer)
    return metrics


def evaluate_sweep(cfg: DictConfig, sweep_dir: Path) -> Metrics:
    """Tests every job's best checkpoint, each a run of its own in every logger (``job<n>``: ``tensorboard/job<n>``);
    writes and prints the sweep table with the fresh test figures."""
    rows, extra = report.collect(sweep_dir)
    results: Metrics = {}
    for row in rows:
        if not row["ckpt"]:  # a failed job
            continue
        try:
            path = checkpoints.resolve(sweep_dir / row["job"])
        except ConfigError as e:
            log.warning("Job %s not tested again: %s", row["job"], e)
            continue
        fresh = evaluate_checkpoint(cfg, path, run_name=f"job{row['job']}")
        row.update(test_acc=fresh["test/acc"], test_loss=fresh["test/loss"], ckpt=fresh["ckpt"])
        results[row["job"]] = fresh
    table = report.write(rows, extra, Path(cfg.paths.output_dir), title=f"Sweep {sweep_dir}, tested again")
    print(table)
    return results
