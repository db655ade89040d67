"""Learning-rate schedules built from config (``_partial_: true``; the module passes the rest)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from vit.errors import ConfigError


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` * lr at ``total_steps``, stepped per batch.

    ``warmup_steps`` wins over ``warmup_fraction`` (of ``total_steps``) when > 0.
    """
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if not math.isfinite(total_steps):
        raise ConfigError(
            "scheduler=cosine needs a known number of steps and trainer.max_epochs=-1 sets no limit: set trainer.max_epochs >= 1 or scheduler=none"
        )
    total_steps = max(1, int(total_steps))
    warmup = warmup_steps if warmup_steps > 0 else int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
