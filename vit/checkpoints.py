"""Finding, reading and writing this project's checkpoints, with one-line errors for every way that fails."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from vit.callbacks import INTERRUPTED
from vit.errors import ConfigError

USAGE = "give ckpt=outputs/<date>/<time>_<us> (a run dir) or ckpt=path/to/file.ckpt"


def resolve(path: str | Path | None) -> Path:
    """A ``.ckpt`` file as is; a run dir (or its ``checkpoints/``) -> its best checkpoint, else ``last.ckpt``.

    The best is the one the run's ``run.json`` names (a resumed run's best epoch may lie in the dir of the
    run it resumed), else the highest ``val_acc`` in the file names.
    """
    if path is None or str(path) == "":
        raise ConfigError(f"no checkpoint given: {USAGE}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist: {USAGE}")
    if path.is_file():
        return path
    named = _named_in_run_json(path)
    if named is not None:
        return named
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not any(folder.iterdir()):
        raise ConfigError(f"{folder} is empty: {USAGE}")
    files = sorted(folder.glob("*.ckpt"))
    if not files:
        raise ConfigError(f"no checkpoints (*.ckpt) in {folder}: {USAGE}")
    best = [f for f in files if f.name not in ("last.ckpt", INTERRUPTED)]
    if best:
        return max(best, key=_score)
    return folder / "last.ckpt" if (folder / "last.ckpt").exists() else files[0]


def _named_in_run_json(run_dir: Path) -> Path | None:
    info = run_dir / "run.json"
    if not info.is_file():
        return None
    try:
        named = json.loads(info.read_text()).get("ckpt")
    except (ValueError, AttributeError):
        return None
    return Path(named) if named and Path(named).is_file() else None


def resume_point(path: str | Path) -> Path:
    """``ckpt_path=`` for resuming: a file as is; a run dir -> where it stopped, its ``last.ckpt`` or, where that
    is newer (Ctrl-C after the last epoch end), its ``interrupted.ckpt``; never its best epoch, which may be older."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"ckpt_path={path} does not exist: give ckpt_path=RUN_DIR or RUN_DIR/checkpoints/last.ckpt")
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = [f for f in (folder / "last.ckpt", folder / INTERRUPTED) if f.is_file()]
    if not found:
        raise ConfigError(f"ckpt_path={path}: no last.ckpt or {INTERRUPTED} in {folder}: give ckpt_path=path/to/file.ckpt")
    return max(found, key=lambda f: f.stat().st_mtime)


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
            raise ConfigError(f"{path} is not a readable checkpoint (truncated or corrupt): {_first_line(e)}") from None
        raise ConfigError(f"{path} is not a checkpoint (corrupt or random bytes)") from None
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConfigError(f"{path} is a plain state_dict (weights only, no run config): test a .ckpt written by train.py")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint: test a .ckpt written by train.py")
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise ConfigError(f"{path} is a checkpoint of another model (no run config of this project): test a .ckpt written by train.py")
    return checkpoint


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
