"""The config's nodes as objects (net, LightningModule, callbacks, loggers, Trainer), and a checkpoint as a net ready to
evaluate; every refusal is a one-line ConfigError that names the config key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from vit import checkpoints, parallel, signatures, trackers
from vit.data import ImageDataModule
from vit.errors import ConfigError, first_line
from vit.module import ClassifierModule

log = logging.getLogger(__name__)


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, turning a constructor's ValueError into a ConfigError that names the config key.

    Values of the wrong type for their parameter are refused first, naming the key (``optim.lr must be a number``).
    """
    signatures.check_values(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node), key)
    try:
        return hydra_instantiate(node, **kwargs)
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
    net = instantiate(options, "model")
    if compile_net:
        net.compile()
    return net


def module_factory(module_cfg: Any) -> Any:
    """The ``module`` group as a partial taking the net (``ClassifierModule`` itself when a config has none)."""
    return instantiate(module_cfg, "module") if module_cfg else ClassifierModule


def evaluation_module(path: Path) -> ClassifierModule:
    """A checkpoint as the LightningModule its run trained, in eval mode: the net with its weights and the run's own
    module options (``module.tta_flip``), so ``test.py`` and ``vit.predict`` evaluate it as training did."""
    checkpoint = checkpoints.load(path)
    config = checkpoint["hyper_parameters"]["config"]
    net = build_net({**config["model"], "compile": False}, pretrained=False)
    module = module_factory(config.get("module"))(net=net, config=config)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise ConfigError(f"{path} does not match its own model config: {first_line(e)}") from None
    return module.eval()


def check_input_shape(datamodule: ImageDataModule, net: torch.nn.Module) -> None:
    channels, height, width = datamodule.image_shape()
    side = getattr(net, "img_size", None)  # None: the net takes any size (a CNN)
    want = (getattr(net, "in_channels", channels), side or height, side or width)
    if (channels, height, width) != want:
        raise ConfigError(
            f"the data gives {channels}x{height}x{width} images but the model expects {want[0]}x{want[1]}x{want[2]}: "
            f"set model.img_size={height} or data.image_size={want[1]} (resizes on the device)"
        )


def check_train_sizes(datamodule: ImageDataModule, net: torch.nn.Module, model_cfg: Any) -> None:
    """``data.train_sizes`` other than the data's side need a net that takes them; the fix names a key of this model's config."""
    height = datamodule.image_shape()[1]
    sizes = sorted(set(datamodule.train_sizes or []) - {height})
    if not sizes or getattr(net, "img_size", None) is None:  # a net that takes any size (a CNN)
        return
    if not getattr(net, "dynamic_img_size", False):
        if "dynamic_img_size" in model_cfg:
            fix = "set model.dynamic_img_size=true"
        elif "kwargs" in model_cfg:
            fix = "add dynamic_img_size:true to model.kwargs (timm's ViTs take it), or leave out data.train_sizes"
        else:
            fix = "leave out data.train_sizes"
        raise ConfigError(f"data.train_sizes={sizes} trains at other sides than {height}, which the model does not take: {fix}")
    patch = getattr(net, "patch_size", None) or 1
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


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]


def build_loggers(cfg: DictConfig, run_name: str | None = None) -> list[Any]:
    """The ``logger`` group; ``run_name`` gives each logger a run of that name (one per job when re-testing a sweep).

    A logger whose tracker is an optional extra that is not installed is a one-line error.
    """
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        try:
            loggers.append(instantiate(node, f"logger.{name}", **trackers.naming(node, name, run_name)))
        except InstantiationException as e:
            if isinstance(e.__cause__, ImportError):
                raise ConfigError(f'logger={name} needs its tracker ({first_line(e.__cause__)}): pip install -e ".[trackers]"') from None
            raise
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list, run_name: str | None = None, **overrides: Any) -> L.Trainer:
    """The configured Trainer, writing its checkpoints atomically (``checkpoints.AtomicCheckpointIO``);
    ``run_name``: see ``build_loggers``."""
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=build_loggers(cfg, run_name) or False,
        precision=resolve_precision(cfg.trainer),
        plugins=[checkpoints.AtomicCheckpointIO()],
        **overrides,
    )
    parallel.check_no_relaunch_in_sweep(trainer)
    return trainer
