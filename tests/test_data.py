from urllib.error import URLError

import pytest
import torch
from PIL import Image
from torchvision import transforms

from tests.conftest import make_image_folder
from vit.augment import random_crop_flip
from vit.batches import EpochBatches
from vit.data import CIFAR10DataModule, FakeDataModule, FolderDataModule
from vit.errors import ConfigError


def fake(**kwargs) -> FakeDataModule:
    dm = FakeDataModule(**{"train_size": 100, "test_size": 20, "val_size": 10, **kwargs})
    dm.setup()
    return dm


def test_fake_data_has_cifar_shapes_and_is_reproducible():
    dm = fake()
    assert dm.train_set.images.shape == (90, 3, 32, 32) and dm.train_set.images.dtype == torch.uint8
    assert len(dm.val_set) == 10 and len(dm.test_set) == 20
    assert dm.num_classes == 10 and int(dm.train_set.labels.max()) < 10
    assert torch.equal(fake().train_set.images, dm.train_set.images)


def test_split_is_seeded():
    a, b, c = fake(seed=1), fake(seed=1), fake(seed=2)
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    # the test split is the official one, whatever the seed
    assert torch.equal(a.test_set.images, c.test_set.images)


def test_val_size_zero_trains_on_everything():
    dm = fake(val_size=0)
    assert len(dm.train_set) == 100 and dm.val_set is None and not dm.has_val


@pytest.mark.parametrize(
    "kwargs, key",
    [(dict(val_size=100), "data.val_size=100"), (dict(batch_size=0), "data.batch_size"), (dict(val_size=-1), "data.val_size")],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        fake(**kwargs)


def test_epoch_order_depends_on_seed_and_epoch_only():
    batches = EpochBatches(10, 4, shuffle=True, seed=3)
    first = torch.cat(list(batches))
    assert sorted(first.tolist()) == list(range(10)) and len(batches) == 3
    batches.set_epoch(1)
    second = torch.cat(list(batches))
    assert not torch.equal(first, second)
    again = EpochBatches(10, 4, shuffle=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(torch.cat(list(again)), second)


def test_preprocess_matches_the_manuals_transform():
    dm = fake()
    images = dm.test_set.images[:4]
    manual = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    expected = torch.stack([manual(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    torch.testing.assert_close(dm.preprocess(images), expected)


def test_augmentation_is_drawn_per_image():
    torch.manual_seed(0)
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8).repeat(16, 1, 1, 1)
    out = random_crop_flip(x, padding=2)
    assert out.shape == x.shape
    assert len({tuple(img.flatten().tolist()) for img in out}) > 4
    # no padding: only flips, each image either unchanged or mirrored
    flipped = random_crop_flip(x, padding=0)
    assert all(torch.equal(f, x[0]) or torch.equal(f, x[0].flip(-1)) for f in flipped)


def test_augmentation_only_in_training():
    dm = fake(augment=True)
    images = dm.test_set.images[:8]
    torch.testing.assert_close(dm.preprocess(images), fake().preprocess(images))
    assert not torch.allclose(dm.preprocess(images, training=True), dm.preprocess(images))


def test_trivial_augment_works_without_crop_and_flip(monkeypatch):
    """data.trivial_augment=true alone applies TrivialAugment (and no crop + flip); data.augment=true alone only crop + flip."""
    applied = []
    monkeypatch.setattr("vit.images.trivial_augment", lambda x, generator=None: applied.append("trivial") or x)
    monkeypatch.setattr("vit.images.random_crop_flip", lambda x, padding, generator=None: applied.append("crop_flip") or x)
    images = fake().test_set.images[:8]
    for kwargs, expected in [
        (dict(trivial_augment=True), ["trivial"]),
        (dict(augment=True), ["crop_flip"]),
        (dict(augment=True, trivial_augment=True), ["crop_flip", "trivial"]),
        ({}, []),
    ]:
        applied.clear()
        dm = fake(**kwargs)
        dm.preprocess(images)  # evaluation: never augmented
        assert applied == []
        dm.preprocess(images, training=True)
        assert applied == expected, kwargs


def test_image_size_resizes_on_the_device():
    dm = fake(image_size=64)
    assert dm.preprocess(dm.test_set.images[:2]).shape == (2, 3, 64, 64)
    assert dm.image_shape() == (3, 64, 64)


def test_folder_data_classes_come_from_folders_and_are_cached(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "images", classes=("ant", "bee", "cow"), per_class=5)
    # images of another size are resized when decoded
    Image.new("RGB", (50, 40), (255, 0, 0)).save(root / "train" / "cow" / "big.jpg")
    dm = FolderDataModule(root=str(root), data_dir=str(tmp_path / "data"), val_size=4)
    dm.setup()
    assert dm.classes == ("ant", "bee", "cow")
    assert len(dm.train_set) + len(dm.val_set) == 16 and len(dm.test_set) == 15
    assert dm.test_set.images.shape[1:] == (3, 32, 32)
    assert sorted(dm.test_set.labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert dm.test_set.labels.tolist() != sorted(dm.test_set.labels.tolist())  # mixed, not class by class
    caches = sorted((tmp_path / "data" / "cache").glob("*.pt"))
    assert [p.name.split("-")[0] for p in caches] == ["test", "train"]
    # a second module reads the cache: break the decoder to prove it is not called
    monkeypatch.setattr("vit.data.decode_image", None)
    again = FolderDataModule(root=str(root), data_dir=str(tmp_path / "data"), val_size=4)
    again.setup()
    assert torch.equal(again.test_set.images, dm.test_set.images)


def test_folder_cache_notices_changed_files(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=3)
    FolderDataModule(root=str(root), data_dir=str(tmp_path / "data"), val_size=1).setup("test")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "test" / "cat" / "extra.png")
    dm = FolderDataModule(root=str(root), data_dir=str(tmp_path / "data"), val_size=1)
    dm.setup("test")
    assert len(dm.test_set) == 7


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        FolderDataModule(root=None)
    with pytest.raises(ConfigError, match="does not exist"):
        FolderDataModule(root=str(tmp_path / "missing"))
    root = make_image_folder(tmp_path / "a")
    (root / "test" / "dog").rename(root / "test" / "wolf")
    with pytest.raises(ConfigError, match="class folders differ"):
        FolderDataModule(root=str(root))
    root = make_image_folder(tmp_path / "b")
    for f in (root / "test").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((root / "test").glob("*")):
        d.rmdir()
    (root / "test").rmdir()
    with pytest.raises(ConfigError, match="no test/ folder"):
        FolderDataModule(root=str(root))
    root = make_image_folder(tmp_path / "c")
    (root / "train" / "cat" / "0001.png").write_bytes(b"not an image")
    dm = FolderDataModule(root=str(root), data_dir=None, val_size=1)
    with pytest.raises(ConfigError, match="0001.png"):
        dm.setup()


def test_cifar10_offline_names_the_alternatives(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "data=folder data.root=" in message and "data=fake" in message and "\n" not in message


def test_train_sizes_resize_training_batches_per_epoch_only():
    dm = fake(train_sizes=[16, 24])
    assert [dm.train_side(e) for e in range(4)] == [16, 24, 24, 24]
    assert fake().train_side(0) is None
    images, labels = dm.train_set.images[:4], dm.train_set.labels[:4]

    class Trainer:  # what on_after_batch_transfer reads of Lightning's trainer
        training, current_epoch = True, 0

    dm.trainer = Trainer()
    assert dm.on_after_batch_transfer((images, labels), 0)[0].shape == (4, 3, 16, 16)
    Trainer.current_epoch = 3
    assert dm.on_after_batch_transfer((images, labels), 0)[0].shape == (4, 3, 24, 24)
    Trainer.training = False  # evaluation: the full size
    assert dm.on_after_batch_transfer((images, labels), 0)[0].shape == (4, 3, 32, 32)
    # resized first, then augmented: a flip drawn at 16 px, one resampling
    flipping = fake(train_sizes=[16], augment=True, crop_padding=0)
    flipping.trainer = Trainer()
    Trainer.training, Trainer.current_epoch = True, 0
    small = flipping.preprocess(images, side=16)
    out = flipping.preprocess(images, training=True, generator=torch.Generator().manual_seed(0), side=16)
    assert all(torch.equal(o, s) or torch.equal(o, s.flip(-1)) for o, s in zip(out, small))
    with pytest.raises(ConfigError, match="data.train_sizes"):
        fake(train_sizes=[16, 0])


def test_train_sizes_need_a_model_that_takes_them(make_cfg):
    from vit.run import train

    with pytest.raises(ConfigError, match="model.dynamic_img_size=true"):
        train(make_cfg(["data.train_sizes=[16,32]", "model.patch_size=4", "trainer.max_epochs=1"]))
    with pytest.raises(ConfigError, match="multiples of model.patch_size=8"):
        train(make_cfg(["data.train_sizes=[12,32]", "model.dynamic_img_size=true", "trainer.max_epochs=1"]))
    metrics = train(make_cfg(["data.train_sizes=[16,32]", "model.dynamic_img_size=true", "trainer.max_epochs=2"]))
    assert metrics["epochs"] == 2 and metrics["test/acc"] is not None


def test_crop_padding_is_in_pixels_of_the_training_side_unless_scaled(monkeypatch):
    """Progressive resizing resizes first: crop_padding=4 pads a 16 px image by 4 (a quarter of it); with
    scale_crop_padding it is read at the stored 32 px and scaled, 2 at 16 px, 3 at 24, 4 at 32."""
    paddings = []
    monkeypatch.setattr("vit.images.random_crop_flip", lambda x, padding, generator=None: paddings.append(padding) or x)
    images = fake().train_set.images[:2]
    for scale in (False, True):
        dm = fake(augment=True, crop_padding=4, scale_crop_padding=scale, train_sizes=[16, 24, 32])
        for side in (16, 24, 32):
            dm.preprocess(images, training=True, side=side)
    assert paddings == [4, 4, 4, 2, 3, 4]
