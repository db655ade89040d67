"""Where runs keep their checkpoints and which one a command takes: the one file to test (``resolve``), where to
resume (``resume_from``: a file, a run dir or ``last``, one rule for all three), and reading and writing them, with
one-line errors for every way that fails. A checkpoint stores its run's settings (``stored_config``), which a resume
compares with its own."""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_object
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from vit.callbacks import INTERRUPTED
from vit.errors import ConfigError, first_line

log = logging.getLogger(__name__)

USAGE = "give ckpt=outputs/<date>/<time>_<us> (a run dir) or ckpt=path/to/file.ckpt"
# The config sections a checkpoint stores: what the net, data and training were.
STORED_KEYS = ("model", "data", "optim", "scheduler", "module", "seed")
# The trainer settings that change what is trained, stored with the run config so a resume can compare them.
TRAINED_TRAINER_KEYS = ("max_epochs", "accumulate_grad_batches", "gradient_clip_val", "limit_train_batches")
# Stored keys that may differ on resume: where data is read from or how it is handled, and evaluation-only settings.
MAY_DIFFER_ON_RESUME = (
    "model.compile",
    "model.fused",  # which attention kernel computes the same attention
    "data.data_dir",
    "data.root",
    "data.eval_batch_size",
    "data.device_resident",
)
# Evaluation-only, but with a validation split they make val/acc, which chooses the best checkpoint across the resume
# (old views before it, new ones after) and which views the final test uses: they may differ only without one.
TEST_VIEWS = ("module.tta_flip", "module.tta_shift")


def stored_config(cfg: DictConfig, classes: Sequence[str]) -> dict[str, Any]:
    """What every checkpoint of this run stores (plain containers): the run's resolved settings, the model's class
    count and the classes' order (from the data), and the trainer settings that change what is trained."""
    stored = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in STORED_KEYS if k in cfg}
    stored["model"]["n_classes"] = len(classes)
    stored["classes"] = list(classes)
    stored["trainer"] = {k: cfg.trainer.get(k) for k in TRAINED_TRAINER_KEYS}
    return stored


def resolve(path: str | Path | None) -> Path:
    """The checkpoint to test: a ``.ckpt`` file as is; a run dir (or its ``checkpoints/``) -> its best checkpoint,
    else ``last.ckpt``.

    The best is the one the run's ``run.json`` names (a resumed run's best epoch may lie in the dir of the run it
    resumed; a run dir moved or copied since has it under the same name), else the highest ``val_acc`` in the
    file names, with a warning where ``run.json`` named another.
    """
    if path is None or str(path) == "":
        raise ConfigError(f"no checkpoint given: {USAGE}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist: {USAGE}")
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    named, problem = _named_in_run_json(path, folder)
    if named is not None:
        return named
    if not any(folder.iterdir()):
        raise ConfigError(f"{folder} is empty: {USAGE}")
    files = sorted(folder.glob("*.ckpt"))
    if not files:
        raise ConfigError(f"no checkpoints (*.ckpt) in {folder}: {USAGE}")
    best = [f for f in files if f.name not in ("last.ckpt", INTERRUPTED)]
    chosen = max(best, key=_score) if best else folder / "last.ckpt" if (folder / "last.ckpt").exists() else files[0]
    if problem:
        log.warning("%s: testing %s instead (give ckpt=FILE to test another)", problem, chosen)
    return chosen


def _named_in_run_json(run_dir: Path, folder: Path) -> tuple[Path | None, str | None]:
    """The best checkpoint ``run.json`` names, where it was written or under its name in ``folder``; else why not
    (None where there is no ``run.json`` or it names none)."""
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        return None, None
    try:
        named = json.loads(run_json.read_text()).get("ckpt")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{run_json} is damaged ({first_line(e)})"
    if not named:
        return None, None
    for candidate in (Path(named), folder / Path(named).name):
        if candidate.is_file():
            return candidate, None
    return None, f"{run_json} names the best checkpoint {named}, which is gone (also from {folder})"


def resume_from(cfg: DictConfig, stored: dict, path: str | Path | None = None) -> str | None:
    """The checkpoint to resume from, checked: readable, and trained as this run would be.

    ``ckpt_path`` is a file, a run dir (where it stopped: ``resume_point``) or ``last`` (the newest earlier run
    under ``paths.log_dir`` trained with these settings, where it stopped). ``stored`` is this run's stored config.
    Any setting that changes what is trained and differs from the checkpoint's is refused, since it would be
    half-applied (the restored optimizer keeps its learning rate, a schedule its length) while the run records the
    new value. Without a schedule ``trainer.max_epochs`` may change (more epochs, or fewer to stop earlier).
    ``path``: a checkpoint chosen already (a sweep's job starting from another, ``vit.sharing``), checked the same way.
    """
    ckpt_path = path or cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    path = latest_resume_point(cfg) if ckpt_path == "last" else resume_point(ckpt_path)
    differ = settings_that_differ(load(path)["hyper_parameters"]["config"], stored)
    if differ:
        raise ConfigError(
            f"ckpt_path={path} was trained with {', '.join(differ)}: resume with the settings it was trained with "
            "(only trainer.max_epochs may change, and only with scheduler=none), or start a new run"
        )
    log.info("Resuming from %s", path)
    return str(path)


def resume_point(path: str | Path) -> Path:
    """``ckpt_path=`` for resuming: a file as is; a run dir -> where it stopped, its ``last.ckpt`` or, where that
    is newer (Ctrl-C after the last epoch end), its ``interrupted.ckpt``; never its best epoch, which may be older."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"ckpt_path={path} does not exist: give ckpt_path=RUN_DIR or RUN_DIR/checkpoints/last.ckpt")
    if path.is_file():
        return path
    found = stop_points(path)
    if not found:
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        raise ConfigError(f"ckpt_path={path}: no last.ckpt or {INTERRUPTED} in {folder}: give ckpt_path=path/to/file.ckpt")
    return max(found, key=lambda f: f.stat().st_mtime)


def stop_points(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    return [f for f in (folder / "last.ckpt", folder / INTERRUPTED) if f.is_file()]


def latest_resume_point(cfg: DictConfig) -> Path:
    """``ckpt_path=last``: where the newest earlier run under ``paths.log_dir`` stopped, of the runs whose settings
    ``settings_that_differ`` finds none differing from this one's (by the ``.hydra/config.yaml`` Hydra keeps)."""
    want = _trained_settings(cfg)
    found = []
    for config_file in Path(cfg.paths.log_dir).glob("**/.hydra/config.yaml"):
        run_dir = config_file.parent.parent
        stops = stop_points(run_dir)
        if not stops:
            continue
        try:
            settings = _trained_settings(OmegaConf.load(config_file))
        except (OSError, ValueError, yaml.YAMLError, AttributeError) as e:
            log.warning("Skipping %s for ckpt_path=last: %s is damaged (%s)", run_dir, config_file, first_line(e))
            continue
        if not settings_that_differ(settings, want):
            found.append(resume_point(run_dir))
    if not found:
        raise ConfigError(
            f"ckpt_path=last: no earlier run under {cfg.paths.log_dir} trained with these settings has checkpoints/last.ckpt "
            f"or {INTERRUPTED}: give ckpt_path=RUN_DIR"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _trained_settings(config: DictConfig) -> dict[str, Any]:
    """A run config's stored sections as written (interpolations unresolved: a ``.hydra/config.yaml`` cannot resolve
    Hydra's own), for comparing two run configs with each other."""
    settings = {
        k: OmegaConf.to_container(config[k], resolve=False) if OmegaConf.is_config(config[k]) else config[k] for k in STORED_KEYS if k in config
    }
    settings["trainer"] = {k: config.trainer.get(k) for k in TRAINED_TRAINER_KEYS}
    return settings


def settings_that_differ(trained: dict, now: dict) -> list[str]:
    """``key=the checkpoint's value`` for each setting of ``now`` that changes what is trained and differs."""

    def flat(config: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(config, dict):
            return {prefix: config}
        return {k: v for name, value in config.items() for k, v in flat(value, f"{prefix}.{name}").items()}

    may_differ = set(MAY_DIFFER_ON_RESUME)
    if not (now.get("data") or {}).get("val_size") and not (trained.get("data") or {}).get("val_size"):
        may_differ.update(TEST_VIEWS)
    if trained.get("scheduler") is None and now.get("scheduler") is None:
        may_differ.add("trainer.max_epochs")
    differ = []
    for section in (*STORED_KEYS, "classes", "trainer"):
        if section not in trained:  # a checkpoint from before this section was stored
            continue
        old, new = trained[section], now.get(section)
        before, after = (
            (flat(old, section), flat(new, section)) if isinstance(old, dict) and isinstance(new, dict) else ({section: old}, {section: new})
        )
        for key in sorted(set(before) | set(after)):
            if key in may_differ or before.get(key) == after.get(key):
                continue
            if key not in before:  # the checkpoint's run used the constructor's default: was it the same?
                default = _constructor_default(old if isinstance(old, dict) else None, key.partition(".")[2])
                if default is _UNKNOWN:
                    differ.append(f"{key}=<unset>")
                elif _plain(default) != _plain(after.get(key)):
                    differ.append(f"{key}={_plain(default)!r} (unset there: its default)")
                continue
            differ.append(f"{key}={before.get(key, '<unset>')}")
    return differ


_UNKNOWN = object()


def _constructor_default(section: dict | None, name: str) -> Any:
    """The default of parameter ``name`` of the section's ``_target_``: what a run whose config did not have the key
    trained with (an option the project added since, or a ``+key`` the user adds). ``_UNKNOWN`` where it can't be told."""
    target = (section or {}).get("_target_")
    if not target or not name or "." in name:
        return _UNKNOWN
    try:
        parameter = inspect.signature(get_object(target)).parameters.get(name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return _UNKNOWN
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return _UNKNOWN
    return parameter.default


def _plain(value: Any) -> Any:
    """Tuples as lists, as a config stores them (``stem_strides=()`` in code, ``[]`` in a config)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same dir, then renames it over the old one.

    A kill or a full disk during the write leaves the previous file whole (Lightning's own write goes through the
    system temp dir; where that is another filesystem, the final move is a copy that can stop half way).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _score(path: Path) -> tuple[float, float]:
    match = re.search(r"val_acc(\d+(?:\.\d+)?)", path.name)
    return (float(match.group(1)) if match else -1.0, path.stat().st_mtime)


def load(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (``weights_only``): a checkpoint cannot run code when read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise ConfigError(f"{path} was refused: it holds objects that could run code when loaded (not a checkpoint of this project)") from None
        raise ConfigError(f"{path} is not a checkpoint (corrupt or random bytes)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can raise nearly any type while it is read
        with open(path, "rb") as f:
            is_archive = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        if is_archive:
            raise ConfigError(f"{path} is not a readable checkpoint (truncated or corrupt): {first_line(e)}") from None
        raise ConfigError(f"{path} is not a checkpoint (corrupt or random bytes)") from None
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConfigError(f"{path} is a plain state_dict (weights only, no run config): test a .ckpt written by train.py")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint: test a .ckpt written by train.py")
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise ConfigError(f"{path} is a checkpoint of another model (no run config of this project): test a .ckpt written by train.py")
    return checkpoint
