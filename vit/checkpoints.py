"""Finding and reading this project's checkpoints, with one-line errors for every way that fails."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vit.errors import ConfigError

USAGE = "give ckpt=outputs/<date>/<time> (a run dir) or ckpt=path/to/file.ckpt"


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
    files = sorted(folder.glob("*.ckpt"))
    if not files:
        raise ConfigError(f"no checkpoints (*.ckpt) in {folder}: {USAGE}")
    best = [f for f in files if f.name != "last.ckpt"]
    if not best:
        return files[0]
    return max(best, key=_score)


def _score(path: Path) -> tuple[float, float]:
    match = re.search(r"val_acc(\d+(?:\.\d+)?)", path.name)
    return (float(match.group(1)) if match else -1.0, path.stat().st_mtime)


def load(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (``weights_only``): a checkpoint cannot run code when read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean the same to the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a readable checkpoint (truncated, corrupt or unsafe): {first_line}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (a plain state_dict?): test it with a .ckpt written by train.py")
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise ConfigError(f"{path} has no run config (model, data): it was not written by this project's train.py")
    return checkpoint
