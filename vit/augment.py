"""Batched augmentations with per-image randomness, run on the device.

The draws come from ``generator`` (the DataModule gives each training batch on each rank a stream of its
own) or, without one, from torch's global RNG.

torchvision's v2 transforms draw one set of random parameters per call, so on a batch tensor every
image would get the same crop or rotation; these draw per image. Inputs are floats in [0, 1],
shape (b, c, h, w).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# TrivialAugment (Müller and Hutter, 2021): one op per image, uniformly chosen, at a uniform random strength.
OPS = (
    "identity",
    "brightness",
    "contrast",
    "saturation",
    "solarize",
    "posterize",
    "autocontrast",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
MAX_ROTATE_DEG, MAX_SHEAR, MAX_TRANSLATE, MAX_FACTOR = 30.0, 0.3, 0.25, 0.9


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad, crop back to size at a random offset and flip half, each image drawn on its own."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    rows = dy + torch.arange(h, device=x.device)  # b h
    cols = dx + torch.arange(w, device=x.device)  # b w
    flip = torch.rand(b, 1, device=x.device, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def trivial_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image gets one op of ``OPS`` at a random strength (signed where that makes sense)."""
    b = x.shape[0]
    op = torch.randint(0, len(OPS), (b,), device=x.device, generator=generator)
    strength = torch.rand(b, device=x.device, generator=generator)
    signed = strength * torch.where(torch.rand(b, device=x.device, generator=generator) < 0.5, -1.0, 1.0)
    is_op = {name: op == i for i, name in enumerate(OPS)}
    x = _geometric(x, is_op, signed)
    per_image = lambda t: t.view(b, 1, 1, 1)  # noqa: E731
    factor = 1 + MAX_FACTOR * signed
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x.mean(1, keepdim=True)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    bits = (8 - (strength * 6).round()).clamp(2, 8)
    step = per_image(2 ** (8 - bits)) / 255
    candidates = {
        "brightness": x * per_image(factor),
        "contrast": gray.mean(dim=(2, 3), keepdim=True) + (x - gray.mean(dim=(2, 3), keepdim=True)) * per_image(factor),
        "saturation": gray + (x - gray) * per_image(factor),
        "solarize": torch.where(x >= per_image(1 - strength), 1 - x, x),
        "posterize": torch.floor(x / step) * step,
        "autocontrast": (x - lo) / (hi - lo).clamp(min=1e-3),
    }
    for name, value in candidates.items():
        x = torch.where(per_image(is_op[name]), value, x)
    return x.clamp(0, 1)


def _geometric(x: Tensor, is_op: dict[str, Tensor], signed: Tensor) -> Tensor:
    """Rotations, shears and translations as one per-image affine warp (identity for the other ops)."""
    b = x.shape[0]
    zero = torch.zeros_like(signed)
    angle = torch.where(is_op["rotate"], signed * math.radians(MAX_ROTATE_DEG), zero)
    shear_x = torch.where(is_op["shear_x"], signed * MAX_SHEAR, zero)
    shear_y = torch.where(is_op["shear_y"], signed * MAX_SHEAR, zero)
    shift_x = torch.where(is_op["translate_x"], signed * 2 * MAX_TRANSLATE, zero)  # affine_grid spans [-1, 1]
    shift_y = torch.where(is_op["translate_y"], signed * 2 * MAX_TRANSLATE, zero)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos + shear_x * sin, -sin + shear_x * cos, shift_x], 1), torch.stack([sin + shear_y * cos, cos - shear_y * sin, shift_y], 1)], 1
    )  # b 2 3
    if not bool((angle != 0).any() | (shear_x != 0).any() | (shear_y != 0).any() | (shift_x != 0).any() | (shift_y != 0).any()):
        return x
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = (angle != 0) | (shear_x != 0) | (shear_y != 0) | (shift_x != 0) | (shift_y != 0)
    return torch.where(moved.view(b, 1, 1, 1), warped, x)


def batch_generator(seed: int, rank: int, epoch: int, batch: int, device: torch.device | str, purpose: str) -> torch.Generator:
    """The random stream of one training batch on one rank for one ``purpose``: a function of these alone.

    Under DDP every rank draws its own crops, ops and mixing partners, and a run resumed anywhere, even in the
    middle of an epoch, draws what the uninterrupted run drew, with no state to save.
    """
    key = hashlib.sha256(f"{purpose}|{seed}|{rank}|{epoch}|{batch}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


def mix(
    x: Tensor, y: Tensor, mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Mixup or CutMix (one of them per batch when both are on) with a shuffled copy of the batch.

    Draws on the CPU from ``generator`` (default: torch's global CPU RNG).
    Returns (mixed images, labels, partner labels, weight of the own labels).
    """
    g = generator if generator is not None else torch.default_generator
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=g).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(np.random.default_rng(int(torch.randint(2**62, (), generator=g))).beta(alpha, alpha))  # torch's Beta takes no generator
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    if not use_cutmix:
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, (), generator=g)), int(torch.randint(0, w, (), generator=g))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    x = x.clone()
    x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    return x, y, y[perm], 1 - (bottom - top) * (right - left) / (h * w)
