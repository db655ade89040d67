"""The experiment presets compose and train; the augmentations they use draw per image."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import CONF
from vit import augment
from vit.errors import ConfigError
from vit.model import ViT
from vit.module import ClassifierModule
from vit.run import train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "assignment")
FEW_BATCHES = [
    "data=fake",
    "data.train_size=256",
    "data.test_size=64",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def test_presets_say_what_the_issue_asks(make_cfg):
    seed = make_cfg(["experiment=seed"], tiny=False)
    assert seed.model.seed_attention and seed.data.val_size == 0 and not seed.data.augment
    assert (seed.optim._target_, seed.optim.lr, seed.data.batch_size, seed.trainer.max_epochs) == ("torch.optim.Adam", 1e-3, 32, 20)
    assert not make_cfg(["experiment=seed_fixed"], tiny=False).model.seed_attention
    strong = make_cfg(["experiment=small_strong"], tiny=False)
    assert strong.model.emb_size == 64 and strong.model.depth == 12 and strong.trainer.max_epochs == 20
    assert strong.data.augment and strong.data.trivial_augment and strong.module.label_smoothing > 0
    assert strong.optim._target_ == "torch.optim.AdamW" and strong.scheduler._target_ == "vit.schedulers.warmup_cosine"
    fast = make_cfg(["experiment=fast"], tiny=False)  # the speed run: the manual's ViT family, ending at the full image size
    assert fast.model._target_ == "vit.model.ViT" and fast.model.patch_size == 4 and fast.data.val_size == 0
    assert fast.data.train_sizes[-1] == fast.model.img_size and len(fast.data.train_sizes) == fast.trainer.max_epochs
    assert fast.model.dynamic_img_size and all(side % fast.model.patch_size == 0 for side in fast.data.train_sizes)
    best = make_cfg(["experiment=cifar_best"], tiny=False)
    assert 4_000_000 <= n_params(best) <= 10_000_000 and best.model.patch_size == 4
    for name in ("budget", "budget_max"):  # within the manual's budget: its parameters, its 20 epochs, all 50,000
        budget = make_cfg([f"experiment={name}"], tiny=False)
        assert n_params(budget) <= 610_000 and budget.trainer.max_epochs <= 20 and budget.data.val_size == 0, name
        assert budget.data.train_sizes[-1] == budget.model.img_size and budget.model._target_ == "vit.model.ViT", name


def n_params(cfg) -> int:
    options = {k: v for k, v in cfg.model.items() if k not in ("_target_", "compile")} | {"n_classes": 10}
    return sum(p.numel() for p in ViT(**options).parameters())


def test_assignment_preset_is_the_design_card_sweep(make_cfg):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=assignment"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"trainer.max_epochs": "10,20", "data.batch_size": "32,64", "optim.lr": "1e-3,1e-4"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.slow
def test_each_experiment_trains_a_few_batches(make_cfg, experiment):
    overrides = [f"experiment={experiment}", *FEW_BATCHES, "data.val_size=0" if "seed" in experiment else "data.val_size=64"]
    if experiment == "cifar_best":
        overrides += ["model.compile=false"]  # compiling a 6M-parameter net takes a minute on 2 cores
    if experiment == "finetune":
        # no download in tests (fine-tuning from a weights file: tests/test_zoo.py), and one block of the ViT-S at 224
        overrides += ["model.pretrained=false", "model.kwargs={depth:1}", "data.batch_size=16"]
    metrics = train(make_cfg(overrides, tiny=False))
    assert 0 <= metrics["test/acc"] <= 1


def test_trivial_augment_draws_per_image():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16).repeat(64, 1, 1, 1)
    out = augment.trivial_augment(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    distinct = {tuple(img.flatten().round(decimals=4).tolist()) for img in out}
    assert len(distinct) > 20
    assert any(torch.equal(img, x[0]) for img in out)  # the identity op leaves an image untouched


def test_mixup_and_cutmix_mix_with_a_partner():
    torch.manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    y = torch.arange(4)
    mixed, own, partner, weight = augment.mix(x, y, mixup_alpha=0.4, cutmix_alpha=0.0)
    assert torch.equal(own, y) and sorted(partner.tolist()) == [0, 1, 2, 3] and 0 <= weight <= 1
    torch.testing.assert_close(mixed, weight * x + (1 - weight) * x[partner])
    cut, own, partner, weight = augment.mix(x, y, mixup_alpha=0.0, cutmix_alpha=1.0)
    for i in range(4):
        from_partner = (cut[i] == x[partner[i]]).float().mean() if partner[i] != i else 1 - weight
        assert float(from_partner) == pytest.approx(1 - weight, abs=1e-6) or partner[i] == i


class PredictsFromPixel(nn.Module):
    """Predicts the class written into each image's first pixel: a net whose predictions the test chooses."""

    n_classes = 4

    def forward(self, x):
        return F.one_hot(x[:, 0, 0, 0].long(), self.n_classes).float()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step called without a Trainer
@pytest.mark.parametrize("own_weight, accuracy", [(0.3, 1.0), (0.7, 0.0)])
def test_mixed_batches_score_train_acc_against_the_dominant_label(monkeypatch, own_weight, accuracy):
    """The net predicts every partner's label: right where the partner dominates the mixed image, wrong where the own image does."""
    y = torch.arange(8) % 4
    partner = (y + 1) % 4
    x = torch.zeros(8, 3, 8, 8)
    x[:, 0, 0, 0] = partner.float()
    monkeypatch.setattr("vit.module.mix", lambda x, y, mixup_alpha, cutmix_alpha, generator=None: (x, y, partner, own_weight))
    model = ClassifierModule(PredictsFromPixel(), mixup_alpha=0.2, cutmix_alpha=1.0)
    model.training_step((x, y), 0)
    assert float(model.train_acc.compute()) == accuracy


@pytest.mark.parametrize("kwargs", [dict(label_smoothing=1.0), dict(mixup_alpha=-1.0)])
def test_module_rejects_bad_regularisation(kwargs):
    with pytest.raises(ConfigError, match="module\\."):
        ClassifierModule(ViT(patch_size=8, emb_size=16, img_size=32, depth=1, n_classes=2, num_heads=2), **kwargs)


def test_tta_flip_averages_each_image_with_its_mirror():
    torch.manual_seed(0)
    net = ViT(in_channels=3, patch_size=8, emb_size=16, img_size=32, depth=1, n_classes=10, num_heads=2).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    plain_loss, plain_preds, _ = ClassifierModule(net)._step((x, y))
    loss, preds, _ = ClassifierModule(net, tta_flip=True)._step((x, y))
    with torch.no_grad():
        averaged = (net(x) + net(x.flip(-1))) / 2
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(averaged, y))
    assert torch.equal(preds, averaged.argmax(1)) and not torch.allclose(loss, plain_loss)


def test_tta_shift_averages_moved_copies_and_their_mirrors():
    torch.manual_seed(0)
    net = ViT(in_channels=3, patch_size=8, emb_size=16, img_size=32, depth=1, n_classes=10, num_heads=2).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    module = ClassifierModule(net, tta_flip=True, tta_shift=1)
    views = module.test_views(x)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    torch.testing.assert_close(views[1][..., 1:, 1:], x[..., :-1, :-1])  # moved down-right by one pixel
    torch.testing.assert_close(views[2][..., :-1, :-1], x[..., 1:, 1:])  # moved up-left
    torch.testing.assert_close(views[1][..., 0, 1:], x[..., 1, :-1])  # the new edge row reflects the image
    torch.testing.assert_close(views[4], views[1].flip(-1))
    loss, preds, _ = module._step((x, y))
    with torch.no_grad():
        averaged = sum(net(v) for v in views) / 6
    torch.testing.assert_close(loss, F.cross_entropy(averaged, y))
    assert len(ClassifierModule(net, tta_shift=2).test_views(x)) == 3
    with pytest.raises(ConfigError, match="module.tta_shift must be an integer >= 0"):
        ClassifierModule(net, tta_shift=-1)


def test_retesting_uses_the_runs_tta_flip(make_cfg, tmp_path):
    from vit.run import test

    metrics = train(make_cfg(["module.tta_flip=true", "trainer.max_epochs=1"]))
    retested = test(make_cfg([f"ckpt={make_cfg().paths.output_dir}"], name="test", run="retest"))
    assert retested["test/acc"] == metrics["test/acc"] and retested["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)
