"""The config's nodes as objects (net, LightningModule, callbacks, loggers, Trainer), and a checkpoint as a net ready to
evaluate; every refusal is a one-line ConfigError that names the config key."""

from __future__ import annotations

import logging
import os
import shutil
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
from vit.launcher import quiet_worker
from vit.module import ClassifierModule
from vit.precision import on_cuda, resolve_precision

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
    if compile_net not in (True, False, "auto"):
        raise ConfigError(f"model.compile must be true, false or auto (compiled where it pays: vit.builders.compile_pays), got {compile_net!r}")
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
    if compile_net is True:
        net.compile()
    return net


# model.compile=auto compiles a CPU run in bf16 of at least this many training steps. Measured on a 2-core AMD EPYC
# (docs/measurements.md): the manual's net's bf16 step about 1.1x (1.06-1.45x) as fast compiled, in the Lightning path
# 302 against 270 images/s at batch 32 and 359 against 338 at 64; compiling the training, validation and test graphs
# cost 64 s of a 600-step run with inductor's cache warm, about 3 minutes cold. From about 5,000 steps that is paid
# back (the manual's 20 epochs are 28,120 at batch 32; the design card's shortest job, 10 epochs at batch 64, 7,030, so
# every job of its sweep compiles, and jobs that run compiled share epochs only with compiled ones: vit.sharing). In
# fp32 a compiled step is no faster (185 against 212 images/s).
COMPILE_MIN_STEPS = 5_000


def compile_pays(precision: str, cuda: bool, steps: int) -> tuple[bool, str]:
    """Whether ``model.compile=auto`` compiles a run: (yes or no, why), for its log."""
    if cuda:
        return False, "on a GPU it is not measured yet: set model.compile=true to compile"
    if precision != "bf16-mixed":
        return False, f"a CPU step in {precision} is no faster compiled"
    if steps < COMPILE_MIN_STEPS:
        return False, f"{steps} training steps are too few to pay back 1-3 minutes of compiling (>= {COMPILE_MIN_STEPS})"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return False, "no C++ compiler here for torch.compile on a CPU (install g++ to compile)"
    return True, f"a CPU step in bf16 is about 1.1x as fast compiled, which pays back 1-3 minutes of compiling over {steps} steps"


def compile_if_it_pays(net: torch.nn.Module, trainer_cfg: Any, steps: int) -> None:
    """``model.compile=auto``: compiles ``net`` in place where ``compile_pays``; the log says which and why."""
    yes, why = compile_pays(str(resolve_precision(trainer_cfg, say=False)), on_cuda(trainer_cfg), steps)
    log.info("model.compile=auto: %s (%s)", "compiling the net" if yes else "not compiling", why)
    if yes:
        torch._dynamo.config.suppress_errors = True  # a graph that cannot compile runs eagerly instead of ending the run
        net.compile()


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
    if quiet_worker():  # a side-by-side sweep's second worker: one progress bar per terminal (vit.launcher)
        overrides = {"enable_progress_bar": False, "enable_model_summary": False, **overrides}
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
