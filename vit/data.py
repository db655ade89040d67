"""CIFAR-10, CIFAR-100, SVHN (and any ImageFolder tree) as LightningDataModules.

A whole data set is held as one uint8 tensor, shape (n, c, h, w), and batches are
cut from it by index (``vit.batches``): no per-sample PIL work. Float conversion, normalisation,
resizing and augmentation run batched on the device in ``on_after_batch_transfer`` (``vit.images``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.error import URLError

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from vit import loop_state
from vit.augment import batch_generator
from vit.batches import EpochBatches, TensorImages, TrainLoader
from vit.errors import ConfigError, first_line, require_int
from vit.images import IMAGE_SUFFIXES, decode_image, to_model_input

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ImageDataModule(L.LightningDataModule):
    """Base: holds train/test uint8 tensors, splits off a seeded validation set, prepares batches on the device.

    Subclasses say where the images come from (``_load``) and what the classes are;
    ``data_dir`` holds downloads and caches.
    ``val_size=0`` trains on the whole training set with no validation, as the manual does.
    ``train_sizes`` (progressive resizing): the side of the training images in each epoch, the
    last one for every later epoch, e.g. ``[16, 16, 24, 32]``; small images are cheap early, when
    the model only learns coarse features. Evaluation always runs at the full size.
    ``crop_padding`` is in pixels of the image as trained, after that resize (4 pads a 16 px image by a
    quarter of its side); ``scale_crop_padding=True`` reads it in pixels of the stored image instead and
    scales it to each training side (4 at 32 px is 2 at 16 px).
    """

    classes: Sequence[str] = ()

    def __init__(
        self,
        data_dir: str | None = "data",
        batch_size: int = 32,
        eval_batch_size: int = 256,
        val_size: int = 5000,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        image_size: int | None = None,
        augment: bool = False,
        crop_padding: int = 4,
        scale_crop_padding: bool = False,
        trivial_augment: bool = False,
        seed: int = 42,
        device_resident: bool = True,
        train_sizes: Sequence[int] | None = None,
    ):
        super().__init__()
        for name, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
            require_int(name, value)
        if not isinstance(val_size, int) or val_size < 0:
            raise ConfigError(f"data.val_size must be an integer >= 0, got {val_size!r}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"data.mean and data.std need one value per channel and std > 0, got {list(mean)} and {list(std)}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ConfigError(f"data.image_size must be null or an integer >= 1, got {image_size!r}")
        if not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be an integer >= 0, got {crop_padding!r}")
        if train_sizes is not None and (len(train_sizes) == 0 or any(not isinstance(v, int) or v < 1 for v in train_sizes)):
            raise ConfigError(f"data.train_sizes must be null or a list of integers >= 1 (one side per epoch), got {train_sizes!r}")
        self.train_sizes = list(train_sizes) if train_sizes is not None else None
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.image_size = image_size
        self.augment = augment
        self.trivial_augment = trivial_augment
        self.crop_padding = crop_padding
        self.scale_crop_padding = bool(scale_crop_padding)
        self.seed = seed
        self.device_resident = device_resident
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None
        self.test_set: TensorImages | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_val(self) -> bool:
        return self.val_size > 0

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        """(images uint8 (n, c, h, w), labels int64 (n,)) of the train or test split."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load(train=True)
            if self.val_size >= len(labels):
                raise ConfigError(
                    f"data.val_size={self.val_size} must be smaller than the training set ({len(labels)} images): "
                    f"use 0 <= data.val_size < {len(labels)}"
                )
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val, train = order[: self.val_size], order[self.val_size :]
            self.train_set = TensorImages(images[train], labels[train])
            self.val_set = TensorImages(images[val], labels[val]) if self.has_val else None
        if stage in (None, "test") and self.test_set is None:
            # One fixed mixed order (an ImageFolder lists class by class), so trainer.limit_test_batches
            # and the test figures see every class; the accuracy on the whole split does not depend on it.
            images, labels = self._load(train=False)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            self.test_set = TensorImages(images[order], labels[order])

    def _loader(self, data: TensorImages | None, batch_size: int, shuffle: bool) -> DataLoader:
        if data is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type == "cuda" and self.device_resident:
            # CIFAR-10 is 180 MB as uint8: keep it on the GPU and cut batches there, no copies per step
            data.images, data.labels = data.images.to(device), data.labels.to(device)
        pin = device.type == "cuda" and data.images.device.type == "cpu"
        replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        # Training: equal shares, so the ranks step together; evaluation: every image exactly once.
        sampler = EpochBatches(len(data), batch_size, shuffle, self.seed, num_replicas=replicas, rank=rank, even_shares=shuffle)
        if shuffle and self.trainer is not None:
            return TrainLoader(data, sampler, batches_done=lambda: loop_state.batches_trained(self.trainer), pin_memory=pin)
        return DataLoader(data, sampler=sampler, batch_size=None, pin_memory=pin)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def preprocess(self, images: Tensor, training: bool = False, generator: torch.Generator | None = None, side: int | None = None) -> Tensor:
        """uint8 (b, c, h, w) -> normalised float (b, c, s, s), the model's input; ``training`` applies the
        augmentations switched on, each on its own (``augment``: crop + flip, ``trivial_augment``: TrivialAugment),
        drawing from ``generator`` (the global stream when None). ``side`` (progressive resizing) replaces
        ``image_size``: the images are resized first, so the augmentations run on the small images, once."""
        if self.mean.device != images.device:  # moved once, not copied every batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        crop_padding = self.crop_padding if training and self.augment else None
        size = side if side is not None else self.image_size
        if crop_padding and self.scale_crop_padding and size is not None:
            crop_padding = self.padding_at(size, images.shape[-1])
        return to_model_input(images, self.mean, self.std, size, crop_padding, training and self.trivial_augment, generator)

    def padding_at(self, side: int, stored: int) -> int:
        """``crop_padding`` (pixels of the stored image) at a training side, with ``scale_crop_padding``: 4 at 32 px is 2 at 16."""
        return round(self.crop_padding * side / stored)

    def augment_generator(self, rank: int, epoch: int, batch: int, device: torch.device) -> torch.Generator:
        """The crops' and ops' random stream of one training batch on one rank (``augment.batch_generator``)."""
        return batch_generator(self.seed, rank, epoch, batch, device, purpose="augment")

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor] | Tensor, dataloader_idx: int) -> tuple[Tensor, Tensor] | Tensor:
        if isinstance(batch, Tensor):  # the model summary's example image (ClassifierModule.setup): already the model's input
            return batch
        images, labels = batch
        if self.trainer is None or not self.trainer.training:
            return self.preprocess(images), labels
        trainer = self.trainer
        generator = None
        if self.augment or self.trivial_augment:
            index = loop_state.batches_before_this_one(trainer)
            generator = self.augment_generator(trainer.global_rank, trainer.current_epoch, index, images.device)
        return self.preprocess(images, training=True, generator=generator, side=self.train_side(trainer.current_epoch)), labels

    def train_side(self, epoch: int) -> int | None:
        """The side of training images in ``epoch`` (0-based) under ``train_sizes``; None: the stored or ``image_size``."""
        return self.train_sizes[min(epoch, len(self.train_sizes) - 1)] if self.train_sizes else None

    def use_classes(self, classes: Sequence[str]) -> None:
        """Relabels the test split to ``classes``' order (a checkpoint's); other class names are an error."""
        classes = list(classes)
        if list(self.classes) == classes:
            return
        if sorted(self.classes) != sorted(classes):
            raise ConfigError(
                f"the checkpoint was trained on the classes {classes} but the data has {list(self.classes)}: "
                "test it on data with the same class names (leave out data=... to use its own)"
            )
        if self.test_set is not None:
            position = torch.tensor([classes.index(name) for name in self.classes], device=self.test_set.labels.device)
            self.test_set.labels = position[self.test_set.labels]
        self.classes = tuple(classes)

    def image_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of the model's input."""
        data = self.train_set or self.test_set
        if data is None:
            raise RuntimeError("call setup() first")
        c, h, w = data.images.shape[1:]
        return (c, self.image_size, self.image_size) if self.image_size else (c, h, w)


class TorchvisionDataModule(ImageDataModule):
    """A data set of torchvision's, downloaded into ``data_dir`` on first use; offline and not there, one line naming the
    alternatives. Subclasses build the torchvision data set of a split and take its arrays as uint8 tensors."""

    title = ""

    def _dataset(self, train: bool, download: bool = False) -> Any:
        raise NotImplementedError

    def prepare_data(self) -> None:
        try:
            for train in (True, False):
                self._dataset(train, download=True)
        except (URLError, OSError, RuntimeError) as e:
            raise ConfigError(
                f"{self.title} is not in {self.data_dir} and could not be downloaded ({e}). "
                "Offline, use an ImageFolder copy: data=folder data.root=DIR (e.g. ../shared/data/cifar10-jpeg), "
                "or synthetic data: data=fake"
            ) from None


class CIFAR10DataModule(TorchvisionDataModule):
    """torchvision's CIFAR-10."""

    title = "CIFAR-10"
    classes = CIFAR10_CLASSES

    def _dataset(self, train: bool, download: bool = False) -> Any:
        from torchvision.datasets import CIFAR10

        return CIFAR10(self.data_dir, train=train, download=download)

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        data = self._dataset(train)
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # n h w c -> n c h w
        return images, torch.tensor(data.targets, dtype=torch.long)


class CIFAR100DataModule(CIFAR10DataModule):
    """torchvision's CIFAR-100 with its 100 fine labels; the class names come from the data set's metadata
    (read on first use, downloading the data set if it is not there yet)."""

    title = "CIFAR-100"

    def _dataset(self, train: bool, download: bool = False) -> Any:
        from torchvision.datasets import CIFAR100

        return CIFAR100(self.data_dir, train=train, download=download)

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        self.prepare_data()
        return tuple(self._dataset(train=False).classes)


class SVHNDataModule(TorchvisionDataModule):
    """torchvision's SVHN (Street View House Numbers: 73,257 training and 26,032 test digits), in ``data_dir/svhn``;
    the "extra" split is not used."""

    title = "SVHN"
    classes = tuple(str(digit) for digit in range(10))

    def _dataset(self, train: bool, download: bool = False) -> Any:
        from torchvision.datasets import SVHN

        return SVHN(str(Path(self.data_dir) / "svhn"), split="train" if train else "test", download=download)

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        data = self._dataset(train)
        return torch.from_numpy(data.data).contiguous(), torch.from_numpy(data.labels).long()  # already n c h w


class FolderDataModule(ImageDataModule):
    """An ImageFolder tree ``root/{train,test}/<class>/<image>``; classes are the folder names.

    Images are decoded once (resized to ``stored_size`` x ``stored_size`` where they differ) and the
    uint8 tensors cached under ``data_dir/cache`` (none when ``data_dir`` is null), keyed
    by the file list, sizes and times.
    """

    def __init__(self, root: str | None = None, stored_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        if not root:
            raise ConfigError("data=folder needs data.root=DIR, a folder with train/<class>/ and test/<class>/ images")
        self.root = Path(root)
        self.stored_size = stored_size
        self.classes = self._class_names()

    def _split_dir(self, split: str) -> Path:
        path = self.root / split
        if not path.is_dir():
            raise ConfigError(f"data.root={self.root} has no {split}/ folder: expected {self.root}/{split}/<class>/<image>")
        return path

    def _class_names(self) -> tuple[str, ...]:
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} does not exist: point data.root at a folder with train/ and test/")
        names = {}
        for split in ("train", "test"):
            names[split] = sorted(p.name for p in self._split_dir(split).iterdir() if p.is_dir())
            if not names[split]:
                raise ConfigError(f"{self.root / split} has no class folders: expected {self.root / split}/<class>/<image>")
        if names["train"] != names["test"]:
            raise ConfigError(f"class folders differ between {self.root / 'train'} {names['train']} and {self.root / 'test'} {names['test']}")
        return tuple(names["train"])

    def _files(self, split: str) -> list[tuple[Path, int]]:
        files = []
        for label, name in enumerate(self.classes):
            for entry in sorted(os.scandir(self.root / split / name), key=lambda e: e.name):
                if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    files.append((Path(entry.path), label))
        if not files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root / split}")
        return files

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        split = "train" if train else "test"
        files = self._files(split)
        cache = self._cache_path(split, files)
        if cache is not None and cache.exists():
            try:
                data = torch.load(cache, weights_only=True)
                return data["images"], data["labels"]
            except Exception as e:  # noqa: BLE001 - a damaged file can raise nearly any type while it is read
                log.warning("The decode cache %s is damaged (%s): decoding the images again", cache, first_line(e))
        log.info("Decoding %d images under %s (once; cached in %s)", len(files), self.root / split, cache)
        images = torch.stack([decode_image(path, self.stored_size) for path, _ in files])
        labels = torch.tensor([label for _, label in files], dtype=torch.long)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"images": images, "labels": labels}, tmp)
            tmp.replace(cache)
        return images, labels

    def _cache_path(self, split: str, files: list[tuple[Path, int]]) -> Path | None:
        if not self.data_dir:
            return None
        digest = hashlib.sha256(f"pil-rgb-v1|{self.root.resolve()}|{self.stored_size}|{self.classes}".encode())
        for path, label in files:
            stat = path.stat()
            digest.update(f"{path.name}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return Path(self.data_dir) / "cache" / f"{split}-{digest.hexdigest()[:16]}.pt"


class FakeDataModule(ImageDataModule):
    """Synthetic images of CIFAR-10's shape: each class is a smooth colour template plus noise, so it can be learnt.

    ``data_seed`` fixes the images themselves (the "data set"); ``seed`` only the split and order, as for real data.
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_size: int = 1000,
        test_size: int = 200,
        stored_size: int = 32,
        noise: float = 0.5,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("data.num_classes", num_classes), ("data.train_size", train_size), ("data.test_size", test_size)):
            require_int(name, value)
        self.classes = tuple(f"class{i}" for i in range(num_classes))
        self.train_size, self.test_size, self.stored_size, self.noise = train_size, test_size, stored_size, noise
        self.data_seed = data_seed

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.data_seed)
        templates = F.interpolate(torch.rand(self.num_classes, 3, 4, 4, generator=g), size=(self.stored_size,) * 2, mode="bilinear")
        if not train:
            g.manual_seed(self.data_seed + 1)
        n = self.train_size if train else self.test_size
        labels = torch.randint(0, self.num_classes, (n,), generator=g)
        noise = torch.rand(n, 3, self.stored_size, self.stored_size, generator=g)
        images = (1 - self.noise) * templates[labels] + self.noise * noise
        return (images * 255).round().to(torch.uint8), labels
