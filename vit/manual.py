"""The course manual's code as printed: its ViT (indentation restored), its data pipeline, and its training and test loops.

The reference the project is measured against: the tests compare ``vit.model`` with these classes, and both
benchmarks (``bench/throughput.py``, ``bench/time_to_accuracy.py``) time this loop. Its bugs are kept on purpose:
the softmax is taken before any scaling and then divided by sqrt(emb_size), and ``energy.mask_fill`` (not
``masked_fill``) fails whenever a mask is given. Nothing else in the package imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange, repeat
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

NUM_EPOCHS, BATCH_SIZE, LEARNING_RATE = 20, 32, 0.001
# The manual's CIFAR-10 model: 607,946 parameters.
CIFAR_MODEL = {"in_channels": 3, "patch_size": 4, "emb_size": 64, "img_size": 32, "depth": 12, "n_classes": 10}


class PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224):
        self.patch_size = patch_size
        super().__init__()
        self.projection = nn.Sequential(
            nn.Conv2d(in_channels, emb_size, kernel_size=patch_size, stride=patch_size),
            Rearrange("b e (h) (w) -> b (h w) e"),
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, emb_size))
        self.positions = nn.Parameter(torch.randn((img_size // patch_size) ** 2 + 1, emb_size))

    def forward(self, x: Tensor) -> Tensor:
        b, _, _, _ = x.shape
        x = self.projection(x)
        cls_tokens = repeat(self.cls_token, "() n e -> b n e", b=b)
        x = torch.cat([cls_tokens, x], dim=1)
        x += self.positions
        return x


class MultiHeadAttention(nn.Module):
    def __init__(self, emb_size: int = 768, num_heads: int = 8, dropout: float = 0):
        super().__init__()
        self.emb_size = emb_size
        self.num_heads = num_heads
        self.qkv = nn.Linear(emb_size, emb_size * 3)
        self.att_drop = nn.Dropout(dropout)
        self.projection = nn.Linear(emb_size, emb_size)

    def forward(self, x: Tensor, mask: Tensor = None) -> Tensor:
        qkv = rearrange(self.qkv(x), "b n (h d qkv) -> (qkv) b h n d", h=self.num_heads, qkv=3)
        queries, keys, values = qkv[0], qkv[1], qkv[2]
        energy = torch.einsum("bhqd, bhkd -> bhqk", queries, keys)
        if mask is not None:
            fill_value = torch.finfo(torch.float32).min
            energy.mask_fill(~mask, fill_value)
        scaling = self.emb_size ** (1 / 2)
        att = F.softmax(energy, dim=-1) / scaling
        att = self.att_drop(att)
        out = torch.einsum("bhal, bhlv -> bhav ", att, values)
        out = rearrange(out, "b h n d -> b n (h d)")
        out = self.projection(out)
        return out


class ResidualAdd(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        res = x
        x = self.fn(x, **kwargs)
        x += res
        return x


class FeedForwardBlock(nn.Sequential):
    def __init__(self, emb_size: int, L: int = 4, drop_p: float = 0.0):
        super().__init__(
            nn.Linear(emb_size, L * emb_size),
            nn.GELU(),
            nn.Dropout(drop_p),
            nn.Linear(L * emb_size, emb_size),
        )


class TransformerEncoderBlock(nn.Sequential):
    def __init__(self, emb_size: int = 768, drop_p: float = 0.0, forward_expansion: int = 4, forward_drop_p: float = 0.0, **kwargs):
        super().__init__(
            ResidualAdd(nn.Sequential(nn.LayerNorm(emb_size), MultiHeadAttention(emb_size, **kwargs), nn.Dropout(drop_p))),
            ResidualAdd(
                nn.Sequential(
                    nn.LayerNorm(emb_size),
                    FeedForwardBlock(emb_size, L=forward_expansion, drop_p=forward_drop_p),
                    nn.Dropout(drop_p),
                )
            ),
        )


class TransformerEncoder(nn.Sequential):
    def __init__(self, depth: int = 12, **kwargs):
        super().__init__(*[TransformerEncoderBlock(**kwargs) for _ in range(depth)])


class ClassificationHead(nn.Sequential):
    def __init__(self, emb_size: int = 768, n_classes: int = 1000):
        super().__init__(Reduce("b n e -> b e", reduction="mean"), nn.LayerNorm(emb_size), nn.Linear(emb_size, n_classes))


class ViT(nn.Sequential):
    def __init__(
        self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224, depth: int = 12, n_classes: int = 1000, **kwargs
    ):
        super().__init__(
            PatchEmbedding(in_channels, patch_size, emb_size, img_size),
            TransformerEncoder(depth, emb_size=emb_size, **kwargs),
            ClassificationHead(emb_size, n_classes),
        )


def transform() -> transforms.Compose:
    """The manual's per-image PIL pipeline."""
    return transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def datasets(root: Path | None, fake_sizes: tuple[int, int] = (50_000, 10_000)) -> tuple[Dataset, Dataset]:
    """(train, test): an ImageFolder copy of CIFAR-10 at ``root`` (``root/train``, ``root/test``), or with ``root=None``
    torchvision's FakeData of ``fake_sizes`` images (random labels: a smoke run of the code, nothing to learn)."""
    if root is not None:
        return tuple(torchvision.datasets.ImageFolder(str(Path(root) / split), transform=transform()) for split in ("train", "test"))
    return tuple(
        torchvision.datasets.FakeData(size, (3, 32, 32), 10, transform=transform(), random_offset=offset)
        for size, offset in zip(fake_sizes, (0, 10**6))
    )


@dataclass
class Recipe:
    """The manual's set-up: loaders, model, Adam, cross-entropy and a GradScaler (fp16 autocast on CUDA only)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    test_loader: DataLoader
    device: torch.device

    @classmethod
    def set_up(cls, train_set: Dataset, test_set: Dataset, device: torch.device, batch_size: int = BATCH_SIZE) -> Recipe:
        model = ViT(**CIFAR_MODEL).to(device)
        return cls(
            model=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=LEARNING_RATE),
            criterion=nn.CrossEntropyLoss(),
            scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
            train_loader=DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=2),
            test_loader=DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=2),
            device=device,
        )

    def train_epoch(self, before_step: Callable[[int], bool] | None = None) -> float:
        """One epoch of the manual's loop; returns its mean loss. ``before_step(i)`` runs before step i (a benchmark
        reads its clock there) and ends the epoch early by returning False."""
        self.model.train()
        running_loss, steps = 0.0, 0
        for i, (images, labels) in enumerate(self.train_loader):
            if before_step is not None and before_step(i) is False:
                break
            images = images.to(self.device)
            labels = labels.to(self.device)
            self.optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                outputs = self.model(images)
                loss = self.criterion(outputs, labels)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            running_loss += loss.item()
            steps += 1
        return running_loss / max(steps, 1)

    def time_slice(self, warmup: int, steps: int, clock: Callable[[], float]) -> tuple[float, float] | None:
        """Trains ``warmup`` untimed steps and ``steps`` timed ones, then stops: the clock's readings at the start and
        the end of the timed steps, or None when the epoch is shorter. The benchmarks project the manual's time from it."""
        readings: dict[int, float] = {}

        def before_step(i: int) -> bool:
            if i in (warmup, warmup + steps):
                readings[i] = clock()
            return i < warmup + steps

        self.train_epoch(before_step)
        return (readings[warmup], readings[warmup + steps]) if warmup + steps in readings else None

    def test(self) -> float:
        """The manual's test loop: accuracy on the test split, in percent."""
        self.model.eval()
        total_correct = 0
        total_samples = 0
        with torch.no_grad():
            for images, labels in self.test_loader:
                images = images.to(self.device)
                labels = labels.to(self.device)
                outputs = self.model(images)
                _, predicted = torch.max(outputs, 1)
                total_samples += labels.size(0)
                total_correct += (predicted == labels).sum().item()
        return total_correct / total_samples * 100


@dataclass
class Projection:
    """The manual's 20 epochs projected from a timed slice: set-up and test pass timed whole (0 when not run)."""

    setup_s: float
    epoch_s: float
    test_s: float
    steps_per_epoch: int
    images_per_s: float

    @property
    def total_s(self) -> float:
        return self.setup_s + NUM_EPOCHS * self.epoch_s + self.test_s


def project(
    root: Path | None,
    device: torch.device,
    seed: int,
    warmup: int,
    steps: int,
    clock: Callable[[], float],
    with_test: bool = True,
    batch_size: int = BATCH_SIZE,
) -> Projection | None:
    """Sets up the manual's recipe on ``root`` (an ImageFolder; None: FakeData), trains ``warmup`` + ``steps`` steps
    and times the last ``steps``, and (``with_test``) its test pass: what the benchmarks project its time from. None
    when an epoch is shorter than the slice. ``batch_size``: the manual's 32, or another a sweep trains at."""
    start = clock()
    torch.manual_seed(seed)
    recipe = Recipe.set_up(*datasets(root, fake_sizes=(50_000, 500)), device, batch_size=batch_size)
    setup_s = clock() - start
    readings = recipe.time_slice(warmup, steps, clock)
    if readings is None:
        return None
    step_s = (readings[1] - readings[0]) / steps
    test_s = 0.0
    if with_test:
        test_start = clock()
        recipe.test()
        test_s = clock() - test_start
    return Projection(setup_s, step_s * len(recipe.train_loader), test_s, len(recipe.train_loader), batch_size / step_s)
