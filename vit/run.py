"""``train(cfg)`` and ``test(cfg)``: what ``train.py`` and ``test.py`` call, and what the tests call."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vit import checkpoints, parallel, report, signatures
from vit.callbacks import RunStats
from vit.data import ImageDataModule
from vit.errors import ConfigError
from vit.module import ClassifierModule

log = logging.getLogger(__name__)

Metrics = dict[str, Any]
SAVED_KEYS = ("model", "data", "optim", "scheduler", "module", "seed")
# The trainer settings that change what is trained, stored with the run config so a resume can compare them.
TRAINED_TRAINER_KEYS = ("max_epochs", "accumulate_grad_batches", "gradient_clip_val", "limit_train_batches")
# Keys of the stored config that say where data is read from or how it is handled, not what is trained.
FREE_ON_RESUME = ("model.compile", "data.data_dir", "data.root", "data.eval_batch_size", "data.device_resident")


def build(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, turning a constructor's ValueError into a ConfigError that names the config key.

    Values of the wrong type for their parameter are refused first, naming the key (``optim.lr must be a number``).
    """
    signatures.check_values(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node), key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{key}: {cause}") from None
        raise


def build_net(model_cfg: Any, num_classes: int | None = None, pretrained: bool = True) -> torch.nn.Module:
    """The net with ``n_classes`` taken from the data (an explicit value that disagrees is an error).

    ``model.compile=true`` compiles the net in place (``nn.Module.compile``), so its state_dict keys,
    and so every checkpoint, are the same as without it. ``pretrained=False`` leaves out pretrained
    weights (``model.pretrained``, ``model.pretrained_file``): a checkpoint's weights replace them.
    """
    options = dict(model_cfg) if isinstance(model_cfg, dict) else OmegaConf.to_container(model_cfg, resolve=True)
    compile_net = options.pop("compile", False)
    if not pretrained:
        options.update({k: default for k, default in (("pretrained", False), ("pretrained_file", None)) if k in options})
    n_classes = options.get("n_classes")
    if num_classes is not None:
        if n_classes is not None and n_classes != num_classes:
            raise ConfigError(
                f"model.n_classes={n_classes} but the data has {num_classes} classes: "
                f"drop model.n_classes (it follows the data) or set model.n_classes={num_classes}"
            )
        options["n_classes"] = num_classes
    net = build(options, "model")
    if compile_net:
        net.compile()
    return net


def check_input_shape(datamodule: ImageDataModule, net: torch.nn.Module) -> None:
    channels, height, width = datamodule.image_shape()
    side = getattr(net, "img_size", None)  # None: the net takes any size (a CNN)
    want = (getattr(net, "in_channels", channels), side or height, side or width)
    if (channels, height, width) != want:
        raise ConfigError(
            f"the data gives {channels}x{height}x{width} images but the model expects {want[0]}x{want[1]}x{want[2]}: "
            f"set model.img_size={height} or data.image_size={want[1]} (resizes on the device)"
        )
    sizes = sorted(set(getattr(datamodule, "train_sizes", None) or []) - {height})
    if sizes and not getattr(net, "dynamic_img_size", False):
        raise ConfigError(f"data.train_sizes={sizes} trains at other sides than {height}: set model.dynamic_img_size=true")
    patch = getattr(net, "patch_size", 1)
    if any(side % patch for side in sizes):
        raise ConfigError(f"data.train_sizes={sizes} must be multiples of model.patch_size={patch}")


def on_cuda(trainer_cfg: Any) -> bool:
    return torch.cuda.is_available() and trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")


def resolve_precision(trainer_cfg: Any) -> str | int:
    """An explicit ``trainer.precision`` wins; null means 16-mixed on a CUDA GPU and 32-true elsewhere."""
    if trainer_cfg.get("precision") is not None:
        return trainer_cfg.precision
    if on_cuda(trainer_cfg):
        return "16-mixed"
    log.info("No CUDA GPU: running in 32-true precision (16-mixed needs a GPU)")
    return "32-true"


def build_callbacks(cfg: DictConfig, has_val: bool = True) -> list[L.Callback]:
    """The ``callbacks`` group; without a validation split there is nothing to monitor: checkpoints keep the last epoch."""
    no_val = {} if has_val else {"monitor": None, "filename": "epoch{epoch:03d}"}
    return [build(node, f"callbacks.{name}", **(no_val if node.get("monitor") else {})) for name, node in (cfg.get("callbacks") or {}).items()]


def build_logger(node: Any, name: str, **kwargs: Any) -> Any:
    """A logger; one whose tracker is an optional extra that is not installed is a one-line error."""
    try:
        return build(node, f"logger.{name}", **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ImportError):
            raise ConfigError(f"logger={name} needs its tracker ({str(e.__cause__).strip().splitlines()[0]}): pip install -e \".[trackers]\"") from None
        raise


def build_trainer(cfg: DictConfig, callbacks: list, logger_version: str | None = None, **overrides: Any) -> L.Trainer:
    """The configured Trainer, writing its checkpoints atomically (``checkpoints.AtomicCheckpointIO``);
    ``logger_version`` makes the loggers write to a sub-dir of that name (one TensorBoard run)."""
    version = {} if logger_version is None else {"version": logger_version}
    loggers = [build_logger(node, name, **version) for name, node in (cfg.get("logger") or {}).items()]
    trainer = build(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, precision=resolve_precision(cfg.trainer),
        plugins=[checkpoints.AtomicCheckpointIO()], **overrides,
    )
    parallel.check_no_relaunch_in_sweep(trainer)
    return trainer


def report_metrics(metrics: Metrics, output_dir: str | Path) -> None:
    """Prints the manual's closing line and writes ``metrics.json`` into the run dir."""
    if metrics.get("test/acc") is not None:
        print(f"Accuracy on test set: {100 * metrics['test/acc']:.2f}%")
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("Metrics written to %s", path)


def test_metrics(results: list[dict[str, float]]) -> Metrics:
    return {"test/acc": float(results[0]["test/acc"]), "test/loss": float(results[0]["test/loss"])}


def resume_from(cfg: DictConfig, saved: dict) -> str | None:
    """The checkpoint to resume from (a run dir: where it stopped), checked: readable, and trained as this run would be.

    ``saved`` is this run's stored config. Any setting that changes what is trained and differs from the
    checkpoint's is refused, since it would be half-applied (the restored optimizer keeps its learning rate, a
    schedule its length) while the run records the new value. More ``trainer.max_epochs`` is fine without a schedule.
    """
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    path = find_last_checkpoint(cfg) if ckpt_path == "last" else checkpoints.resume_point(ckpt_path)
    differ = settings_that_differ(checkpoints.load(path)["hyper_parameters"]["config"], saved)
    if differ:
        raise ConfigError(
            f"ckpt_path={path} was trained with {', '.join(differ)}: resume with the settings it was trained with "
            "(only trainer.max_epochs may grow, and only with scheduler=none), or start a new run"
        )
    log.info("Resuming from %s", path)
    return str(path)


def settings_that_differ(trained: dict, now: dict) -> list[str]:
    """``key=the checkpoint's value`` for each setting of ``now`` that changes what is trained and differs."""

    def flat(config: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(config, dict):
            return {prefix: config}
        return {k: v for name, value in config.items() for k, v in flat(value, f"{prefix}.{name}").items()}

    free = set(FREE_ON_RESUME)
    if trained.get("scheduler") is None and now.get("scheduler") is None:
        free.add("trainer.max_epochs")
    differ = []
    for section in (*SAVED_KEYS, "classes", "trainer"):
        if section not in trained:  # a checkpoint from before this section was stored
            continue
        old, new = trained[section], now.get(section)
        before, after = (flat(old, section), flat(new, section)) if isinstance(old, dict) and isinstance(new, dict) else ({section: old}, {section: new})
        for key in sorted(set(before) | set(after)):
            if key not in free and before.get(key) != after.get(key):
                differ.append(f"{key}={before.get(key, '<unset>')}")
    return differ


def find_last_checkpoint(cfg: DictConfig) -> Path:
    """``ckpt_path=last``: the newest ``last.ckpt`` of an earlier run under ``paths.log_dir`` with the same config.

    "The same" ignores ``ckpt_path`` and ``paths`` (where things are written, not what is trained).
    """

    def comparable(config: Any) -> dict:
        return {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k not in ("ckpt_path", "paths")}

    want = comparable(cfg)
    found = []
    for config_file in Path(cfg.paths.log_dir).glob("**/.hydra/config.yaml"):
        last = config_file.parent.parent / "checkpoints" / "last.ckpt"
        if last.exists() and comparable(OmegaConf.load(config_file)) == want:
            found.append(last)
    if not found:
        raise ConfigError(
            f"ckpt_path=last: no earlier run under {cfg.paths.log_dir} with this config has checkpoints/last.ckpt: "
            "give ckpt_path=RUN_DIR/checkpoints/last.ckpt"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def module_factory(module_cfg: Any) -> Any:
    """The ``module`` group as a partial taking the net (``ClassifierModule`` itself when a config has none)."""
    return build(module_cfg, "module") if module_cfg else ClassifierModule


def build_for_fit(cfg: DictConfig) -> tuple[ImageDataModule, torch.nn.Module, ClassifierModule]:
    """The DataModule (set up for fitting), the net and the LightningModule, as a training run builds them.

    The module carries the run's resolved config (model with the data's class count, data, optimizer,
    ...), which every checkpoint stores. The benchmarks build their runs here too.
    """
    datamodule: ImageDataModule = build(cfg.data, "data")
    net = build_net(cfg.model, datamodule.num_classes)
    saved = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in SAVED_KEYS if k in cfg}
    saved["model"]["n_classes"] = datamodule.num_classes
    saved["classes"] = list(datamodule.classes)
    saved["trainer"] = {k: cfg.trainer.get(k) for k in TRAINED_TRAINER_KEYS}
    module = module_factory(cfg.get("module"))(
        net=net,
        optimizer=build(cfg.optim, "optim"),
        scheduler=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        config=saved,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_input_shape(datamodule, net)
    return datamodule, net, module


def train(cfg: DictConfig) -> Metrics:
    """Fits the model, tests the best checkpoint (``test: true``) and returns the metrics also written to metrics.json."""
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and not (isinstance(max_epochs, int) and (max_epochs >= 1 or max_epochs == -1)):
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1 (or -1 for no limit), got {max_epochs!r}")
    if cfg.get("seed") is not None:
        if not isinstance(cfg.seed, int):
            raise ConfigError(f"seed must be an integer or null, got {cfg.seed!r}")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        log.info("Seed: %d", cfg.seed)

    if on_cuda(cfg.trainer):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    datamodule, net, module = build_for_fit(cfg)
    saved = module.hparams["config"]

    callbacks = build_callbacks(cfg, has_val=datamodule.has_val)
    trainer = build_trainer(cfg, callbacks, **({} if datamodule.has_val else {"limit_val_batches": 0}))
    if trainer.world_size > 1:
        accumulate = trainer.accumulate_grad_batches
        log.info(
            "%d processes: effective batch size %d (data.batch_size %d x %d processes x trainer.accumulate_grad_batches %d)",
            trainer.world_size, datamodule.batch_size * trainer.world_size * accumulate, datamodule.batch_size, trainer.world_size, accumulate,
        )

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from(cfg, saved), weights_only=True)
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else None
    best_score = checkpoint.best_model_score if best_path else None
    metrics: Metrics = {
        "val/acc": float(best_score) if datamodule.has_val and best_score is not None else None,
        "epochs": trainer.current_epoch,
    }
    info = run_info(trainer, net, best_path)
    if trainer.interrupted:
        log.warning("Training was interrupted: skipping the test")
    elif cfg.get("test"):
        ckpt_path = "best" if datamodule.has_val and best_path else None
        log.info("Testing %s", best_path if ckpt_path else "the final weights")
        metrics.update(test_metrics(trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)))
    if trainer.is_global_zero:  # under DDP every rank has the same (synced) metrics; one writes them
        report_metrics(metrics, cfg.paths.output_dir)
        (Path(cfg.paths.output_dir) / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        log_hparams(trainer, cfg, net, metrics)
    return metrics


def run_info(trainer: L.Trainer, net: torch.nn.Module, best_path: str | None) -> dict[str, Any]:
    """What the sweep report shows beside the metrics, kept out of metrics.json (which must not vary with timing).

    Taken right after fitting: testing the best checkpoint restores the callbacks' state as of that epoch.
    """
    stats = next((c for c in trainer.callbacks if isinstance(c, RunStats)), None)
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "ckpt": best_path or None,
        "train_time_s": round(stats.train_time_s, 3) if stats else None,
        "images_per_s": round(stats.images_per_s, 1) if stats and stats.images_per_s else None,
        "history": list(stats.history) if stats else [],
    }


# The run's metrics as HPARAMS shows them, under tags of their own: written at step 0 under the curves' own tags,
# TensorBoard would take the step going back as a restart and drop the curves' earlier points.
HPARAMS_METRICS = {"val/acc": "hparams/best_val_acc", "test/acc": "hparams/test_acc", "test/loss": "hparams/test_loss"}


def log_hparams(trainer: L.Trainer, cfg: DictConfig, net: torch.nn.Module, metrics: Metrics) -> None:
    """The settings people compare, with the run's real metrics (the best epoch's val/acc), to every logger:
    TensorBoard's HPARAMS tab takes them together, under tags of their own (``HPARAMS_METRICS``); the others
    (CSV, MLflow, W&B) get the settings as hyperparameters and the metrics as ``final/val/acc``,
    ``final/test/acc``, ``final/test/loss``."""
    scheduler = cfg.get("scheduler")
    hparams = {
        "max_epochs": cfg.trainer.max_epochs,
        "batch_size": cfg.data.batch_size,
        "lr": cfg.optim.lr,
        "optimizer": str(cfg.optim._target_).rsplit(".", 1)[-1],
        "weight_decay": cfg.optim.get("weight_decay", 0.0),
        "scheduler": str(scheduler._target_).rsplit(".", 1)[-1] if scheduler else "none",
        "model": cfg.model.get("name") or str(cfg.model._target_).rsplit(".", 1)[-1],
        "data": str(cfg.data._target_).rsplit(".", 1)[-1],
        "augment": cfg.data.get("augment", False),
        "trivial_augment": cfg.data.get("trivial_augment", False),
        "val_size": cfg.data.val_size,
        "params": sum(p.numel() for p in net.parameters()),
        **{f"model/{k}": cfg.model[k] for k in ("patch_size", "emb_size", "depth", "num_heads", "seed_attention", "pretrained") if cfg.model.get(k) is not None},
        "seed": cfg.get("seed"),
    }
    final = {k: v for k, v in metrics.items() if k in HPARAMS_METRICS and v is not None}
    for logger in trainer.loggers:
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(hparams, metrics={HPARAMS_METRICS[k]: v for k, v in final.items()})
        else:
            logger.log_hyperparams(hparams)
            logger.log_metrics({f"final/{k}": v for k, v in final.items()}, step=trainer.global_step)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # else the next run in this process (a sweep's next job) would log into this one


def test(cfg: DictConfig) -> Metrics:
    """Evaluates a checkpoint (or every job of a sweep dir) on the test split of the data it was trained on (or ``data=...``)."""
    if cfg.get("ckpt") and report.is_sweep_dir(cfg.ckpt):
        return test_sweep(cfg, Path(cfg.ckpt))
    metrics = test_checkpoint(cfg, checkpoints.resolve(cfg.get("ckpt")))
    if rank_zero_only.rank == 0:  # under DDP every rank has the same (synced) metrics; one writes them
        report_metrics(metrics, cfg.paths.output_dir)
    return metrics


# What the model was trained to see: kept from the checkpoint when testing on other data.
PREPROCESSING = ("mean", "std", "image_size")


def test_data(cfg: DictConfig, config: dict) -> ImageDataModule:
    """The checkpoint's own data, or ``data=...`` with the checkpoint's preprocessing and its classes' order."""
    if not cfg.get("data"):
        return build(config["data"], "data")
    options = OmegaConf.to_container(cfg.data, resolve=True)
    kept = {k: config["data"][k] for k in PREPROCESSING if k in config["data"]}
    changed = [f"data.{k}={options.get(k)}" for k in kept if options.get(k) != kept[k]]
    if changed:
        log.warning("Testing with the checkpoint's preprocessing (%s), not %s", ", ".join(f"{k}={v}" for k, v in kept.items()), ", ".join(changed))
    # The size the model saw (its img_size where the training data needed no resizing), whatever this data stores.
    kept["image_size"] = kept.get("image_size") or config["model"].get("img_size")
    return build({**options, **kept}, "data")


def test_checkpoint(cfg: DictConfig, path: Path, logger_version: str | None = None) -> Metrics:
    checkpoint = checkpoints.load(path)
    config = checkpoint["hyper_parameters"]["config"]
    log.info("Testing %s", path)
    datamodule = test_data(cfg, config)
    net = build_net({**config["model"], "compile": False}, pretrained=False)
    if datamodule.num_classes != net.n_classes:
        raise ConfigError(
            f"the checkpoint's model has {net.n_classes} classes but the data has {datamodule.num_classes}: "
            "test it on the data it was trained on (leave out data=...)"
        )
    # the run's own module options (e.g. module.tta_flip), so it is evaluated as in training
    module = module_factory(config.get("module"))(net=net, config=config)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise ConfigError(f"{path} does not match its own model config: {str(e).splitlines()[0]}") from None
    datamodule.setup("test")
    if "classes" in config:
        datamodule.use_classes(config["classes"])
    check_input_shape(datamodule, net)
    callbacks = build_callbacks(cfg)
    trainer = build_trainer(cfg, callbacks=callbacks, logger_version=logger_version)
    return {"ckpt": str(path), **test_metrics(trainer.test(module, datamodule=datamodule))}


def test_sweep(cfg: DictConfig, sweep_dir: Path) -> Metrics:
    """Tests every job's best checkpoint, each a TensorBoard run of its own (``tensorboard/job<n>``); writes and
    prints the sweep table with the fresh test figures."""
    rows, extra = report.collect(sweep_dir)
    results: Metrics = {}
    for row in rows:
        if row["ckpt"] and Path(row["ckpt"]).exists():
            fresh = test_checkpoint(cfg, Path(row["ckpt"]), logger_version=f"job{row['job']}")
            row.update(test_acc=fresh["test/acc"], test_loss=fresh["test/loss"])
            results[row["job"]] = fresh
    table = report.write(rows, extra, Path(cfg.paths.output_dir), title=f"Sweep {sweep_dir}, tested again")
    print(table)
    return results
