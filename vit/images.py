"""Images to what the model takes: an image file decoded to uint8 as the folder data stores it, and a uint8 batch
scaled, resized, augmented and normalised on its device. Training, testing and ``vit.predict`` share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vit.augment import random_crop_flip, trivial_augment
from vit.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def resize(x: Tensor, side: int | None) -> Tensor:
    """Float images (b, c, h, w) to side x side, antialiased; as they are where ``side`` is None or already theirs."""
    if side is None or x.shape[-2:] == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def to_model_input(
    images: Tensor,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    image_size: int | None = None,
    crop_padding: int | None = None,
    trivial: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """uint8 (b, c, h, w) -> float (b, c, s, s): scaled to [0, 1], resized to ``image_size``,
    augmented (random crop + flip when ``crop_padding`` is given, then TrivialAugment when
    ``trivial``; drawn from ``generator``), normalised. Training, testing and predict share it."""
    x = resize(images.float().div_(255), image_size)
    if crop_padding is not None:
        x = random_crop_flip(x, crop_padding, generator)
    if trivial:
        x = trivial_augment(x, generator)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def decode_image(path: str | Path, size: int) -> Tensor:
    """Any image file (grayscale, RGBA, palette, any size) -> uint8 (3, size, size), as the folder data stores it."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # h w c -> c h w
