"""Finding and reading this project's checkpoints, with one-line errors for every way that fails."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from vit.callbacks import INTERRUPTED
from vit.errors import ConfigError

USAGE = "give ckpt=outputs/<date>/<time>_<us> (a run dir) or ckpt=path/to/file.ckpt"


def resolve(path: str | Path | None) -> Path:
    """A ``.ckpt`` file as is; a run dir (or its ``checkpoints/``) -> its best checkpoint, else ``last.ckpt``."""
    if path is None or str(path) == "":
        raise ConfigError(f"no checkpoint given: {USAGE}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist: {USAGE}")
    if path.is_file():
        return path
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
