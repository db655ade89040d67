"""Where runs keep their checkpoints and which one a command takes: the one file to test (``resolve``), where to
resume (``resume_from``: a file, a run dir or ``last``, one rule for all three), and reading and writing them, with
one-line errors for every way that fails. A checkpoint stores its run's settings (``stored_config``), which a resume
compares with its own."""

from __future__ import annotations

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
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vit.callbacks import INTERRUPTED
from vit.errors import ConfigError, first_line
from vit.precision import resolve_precision
from vit.resume import compare, constructor_defaults, settings_that_differ

log = logging.getLogger(__name__)

USAGE = "give ckpt=outputs/<date>/<time>_<us> (a run dir) or ckpt=path/to/file.ckpt"
# The config sections a checkpoint stores, resolved: what the net, data and training were (vit.resume: what may change).
STORED_KEYS = ("model", "data", "optim", "scheduler", "module", "seed", "trainer", "callbacks")


def stored_config(cfg: DictConfig, classes: Sequence[str]) -> dict[str, Any]:
    """What every checkpoint of this run stores (plain containers): the run's resolved settings (the trainer's
    precision as resolved for this machine), the model's class count and the classes' order (from the data), and the
    defaults its targets had for the keys it leaves out (``defaults``), which a resume compares with (``vit.resume``)."""
    stored = {k: _resolved(cfg[k]) for k in STORED_KEYS if k in cfg}
    stored["model"]["n_classes"] = len(classes)
    stored["classes"] = list(classes)
    if isinstance(stored.get("trainer"), dict):
        stored["trainer"]["precision"] = resolve_precision(cfg.trainer, say=False)
    nodes = {k: stored.get(k) for k in ("model", "data", "optim", "scheduler", "module", "trainer")}
    nodes.update({f"callbacks.{name}": node for name, node in (stored.get("callbacks") or {}).items()})
    stored["defaults"] = {key: constructor_defaults(node) for key, node in nodes.items() if isinstance(node, dict)}
    return stored


def _resolved(node: Any) -> Any:
    """A config node as plain containers, resolved where it can be (a run's paths need Hydra's; a benchmark has none)."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError:
        return OmegaConf.to_container(node, resolve=False)


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
    Each setting that differs from the checkpoint's is refused, allowed with a line in the log, or free, by the
    rules of ``vit.resume``; the allowed changes are recorded in ``stored["resumed"]`` (every later checkpoint).
    ``path``: a checkpoint chosen already (a sweep's job starting from another, ``vit.sharing``), checked the same way.
    """
    ckpt_path = path or cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    path = latest_resume_point(cfg) if ckpt_path == "last" else resume_point(ckpt_path)
    checkpoint = load(path)
    trained = checkpoint["hyper_parameters"]["config"]
    changes = compare(trained, stored)
    if changes.refused:
        raise ConfigError(
            f"ckpt_path={path} was trained with {changes.refusal()}: resume with the settings it was trained with "
            "(docs/resume-and-errors.md lists what may change), or start a new run"
        )
    for line in changes.logged:
        log.info("Resuming with %s", line)
    # Recorded: every checkpoint from here on (and run.json) says where this run resumed and what changed there.
    stored["resumed"] = [*trained.get("resumed", []), {"from": str(path), "epoch": checkpoint.get("epoch"), "changed": changes.logged}]
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
    settings["defaults"] = {}  # none stored: compared key by key, a key one side leaves out at today's default
    return settings


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
