"""data=cifar100 and data=svhn, read by torchvision from small files written in its own on-disk format.

torchvision checks every file's MD5 against the checksums of the real data set; the tests write their
files and hand torchvision those files' own checksums, so its loader runs unchanged.
"""

import hashlib
import json
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from torchvision.datasets import CIFAR100, SVHN

from tests.conftest import TINY
from vit.data import CIFAR100DataModule, SVHNDataModule
from vit.errors import ConfigError
from vit.run import train

NAMES = tuple(f"thing{i:03d}" for i in range(100))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar100(data_dir: Path, monkeypatch, n_train: int = 120, n_test: int = 40) -> dict[bytes, int]:
    """cifar-100-python/{train,test,meta} as the real archive holds them; returns image bytes -> fine label."""
    folder = data_dir / CIFAR100.base_folder
    folder.mkdir(parents=True)
    written = {}
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images = random_images(n, seed)
        fine = np.arange(n) % 100
        coarse = (fine + 7) % 20  # never what a test expects
        with open(folder / name, "wb") as f:
            batch = {
                "batch_label": name,
                "filenames": [f"{i}.png" for i in range(n)],
                "fine_labels": fine.tolist(),
                "coarse_labels": coarse.tolist(),
                "data": images.reshape(n, -1),
            }  # rows: 1024 red, green, blue
            pickle.dump(batch, f, protocol=2)
        written.update({img.tobytes(): int(label) for img, label in zip(images, fine)})
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(NAMES), "coarse_label_names": [f"group{i}" for i in range(20)]}, f, protocol=2)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
    return written


def write_svhn(data_dir: Path, monkeypatch, n_train: int = 60, n_test: int = 30) -> dict[bytes, int]:
    """{train,test}_32x32.mat as the real files hold them (X: h w c n, y: n x 1 with 10 for the digit 0)."""
    folder = data_dir / "svhn"
    folder.mkdir(parents=True)
    written, split_list = {}, dict(SVHN.split_list)
    for split, n, seed in (("train", n_train, 2), ("test", n_test, 3)):
        images = random_images(n, seed)
        digits = np.arange(n) % 10
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        url, filename, _ = SVHN.split_list[split]
        scipy.io.savemat(folder / filename, {"X": images.transpose(2, 3, 1, 0), "y": y})
        split_list[split] = [url, filename, md5(folder / filename)]
        written.update({img.tobytes(): int(d) for img, d in zip(images, digits)})
    monkeypatch.setattr(SVHN, "split_list", split_list)
    return written


def assert_pairs(dm, written: dict[bytes, int], n_train: int, n_test: int) -> None:
    """Every image with its own label, each exactly once, as the uint8 tensors the data module trains from."""
    seen = []
    for data in (dm.train_set, dm.val_set, dm.test_set):
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 32, 32)
        seen += [(img.numpy().tobytes(), int(label)) for img, label in zip(data.images, data.labels)]
    assert len(seen) == n_train + n_test and len({img for img, _ in seen}) == len(seen)
    assert all(written[img] == label for img, label in seen)


def test_cifar100_reads_torchvisions_files_with_fine_labels_and_its_class_names(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path, monkeypatch)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), val_size=20)
    assert dm.classes == NAMES and dm.num_classes == 100
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 100 and len(dm.val_set) == 20 and len(dm.test_set) == 40
    assert_pairs(dm, written, 120, 40)


def test_svhn_reads_torchvisions_files_with_digit_labels(tmp_path, monkeypatch):
    written = write_svhn(tmp_path, monkeypatch)
    dm = SVHNDataModule(data_dir=str(tmp_path), val_size=10)
    assert dm.classes == tuple("0123456789")
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 50 and len(dm.test_set) == 30
    assert_pairs(dm, written, 60, 30)
    assert sorted(set(dm.test_set.labels.tolist())) == list(range(10))  # 10 on disk is the digit 0


def test_corrupt_file_is_caught_by_the_checksum(tmp_path, monkeypatch):
    write_svhn(tmp_path, monkeypatch)
    with open(tmp_path / "svhn" / "test_32x32.mat", "ab") as f:
        f.write(b"\0")
    monkeypatch.setattr("torchvision.datasets.svhn.download_url", fail_download)
    with pytest.raises(ConfigError, match="SVHN is not in"):
        SVHNDataModule(data_dir=str(tmp_path)).prepare_data()


def test_cifar100_trains_with_100_classes(make_cfg, monkeypatch):
    tiny_model_and_trainer = [o for o in TINY if not o.startswith("data")]
    cfg = make_cfg([*tiny_model_and_trainer, "data=cifar100", "data.val_size=20", "data.eval_batch_size=64", "trainer.max_epochs=1"], tiny=False)
    write_cifar100(Path(cfg.paths.data_dir), monkeypatch)
    metrics = train(cfg)
    assert metrics["test/acc"] is not None
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["model"]["n_classes"] == 100
    assert ckpt["hyper_parameters"]["config"]["classes"] == list(NAMES)
    assert ckpt["state_dict"]["net.2.2.weight"].shape[0] == 100  # the head
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text()) == metrics


def fail_download(*args, **kwargs):
    raise URLError("[Errno -2] Name or service not known")


@pytest.mark.parametrize(
    "module, target, title",
    [
        (CIFAR100DataModule, "torchvision.datasets.cifar.download_and_extract_archive", "CIFAR-100"),
        (SVHNDataModule, "torchvision.datasets.svhn.download_url", "SVHN"),
    ],
)
def test_offline_without_files_is_one_line_naming_the_alternatives(tmp_path, monkeypatch, module, target, title):
    monkeypatch.setattr(target, fail_download)
    with pytest.raises(ConfigError) as info:
        module(data_dir=str(tmp_path)).prepare_data()
    message = str(info.value)
    assert message.startswith(f"{title} is not in {tmp_path}") and "\n" not in message
    assert "data=folder data.root=" in message and "data=fake" in message


def test_confusion_figure_of_100_classes_stays_a_picture():
    """CIFAR-100's test figure: no 10,000 cell counts on a 61-inch canvas (as 10 classes get), but a bounded heat map."""
    from vit.figures import confusion_figure

    fig = confusion_figure(torch.eye(100, dtype=torch.long) * 5, list(NAMES))
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 1600 and height <= 1600
    assert not fig.axes[0].texts  # counts only where they can be read
    few = confusion_figure(torch.eye(10, dtype=torch.long) * 5, list(NAMES[:10]))
    assert len(few.axes[0].texts) == 100
