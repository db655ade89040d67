"""Every config composes, every group option instantiates, and the defaults are the manual's."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import CONF, make_image_folder
from vit.model import ViT
from vit.run import build_net


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_reproduce_the_manual(make_cfg):
    cfg = make_cfg(tiny=False)
    assert cfg.trainer.max_epochs == 20 and cfg.data.batch_size == 32 and cfg.optim.lr == 1e-3
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.scheduler is None
    assert cfg.data.mean == [0.5] * 3 and cfg.data.std == [0.5] * 3
    assert cfg.seed == 42 and cfg.test is True and cfg.model.seed_attention is False


def test_default_data_is_torchvision_cifar10(make_cfg, tmp_path):
    cfg = make_cfg(tiny=False)
    assert cfg.data._target_ == "vit.data.CIFAR10DataModule"
    assert Path(cfg.data.data_dir) == tmp_path / "data"
    assert cfg.model.patch_size == 4 and cfg.model.emb_size == 64 and cfg.model.depth == 12


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(make_cfg, tmp_path, option):
    root = make_image_folder(tmp_path / "images")
    cfg = make_cfg([f"data={option}", f"data.root={root}"] if option == "folder" else [f"data={option}"], tiny=False)
    dm = instantiate(cfg.data)
    assert dm.batch_size == 32
    if option != "cifar100":  # its class names are in its files (tests/test_datasets.py)
        assert dm.num_classes == (2 if option == "folder" else 10)


@pytest.mark.parametrize("option", options("model"))
def test_model_options_instantiate(make_cfg, option):
    cfg = make_cfg([f"model={option}"], tiny=False)
    net = build_net(cfg.model, 10)
    assert net.n_classes == 10 and isinstance(net, ViT) == cfg.model._target_.startswith("vit.model.")
    side = net.img_size or 32  # None: any size
    assert net(torch.zeros(1, net.in_channels, side, side)).shape == (1, 10)


def test_model_configs_give_the_manuals_models(make_cfg):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_net(make_cfg(tiny=False).model, 10)) == 607_946
    assert count(build_net(make_cfg(["model=vit_base"], tiny=False).model, 1000)) == 86_567_656


@pytest.mark.parametrize("option", options("optim"))
def test_optim_options_instantiate(make_cfg, option):
    cfg = make_cfg([f"optim={option}"])
    factory = instantiate(cfg.optim)
    net = ViT(patch_size=8, emb_size=16, img_size=32, depth=1, n_classes=10, num_heads=2, stem_channels=[4])  # two convs: muon_convs has one to take
    optimizer = factory(params=net if getattr(factory.func, "takes_module", False) else net.parameters())
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_options_instantiate(make_cfg, option):
    cfg = make_cfg([f"scheduler={option}"])
    if option == "none":
        assert cfg.scheduler is None
        return
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[5] and max(lrs) == pytest.approx(1.0, abs=0.01) and lrs[-1] < 0.01


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_compose(make_cfg, option):
    cfg = make_cfg([f"trainer={option}"], tiny=False)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    for key in ("max_epochs", "limit_train_batches", "limit_val_batches", "limit_test_batches", "precision", "deterministic"):
        assert key in cfg.trainer
    if option != "gpu" or torch.cuda.is_available():
        trainer = instantiate(cfg.trainer, precision=cfg.trainer.precision or "32-true", logger=False)
        assert trainer.max_epochs == 20


def test_logger_and_callbacks_instantiate(make_cfg):
    cfg = make_cfg(tiny=False)
    loggers = [instantiate(node) for node in cfg.logger.values()]
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    assert type(loggers[0]).__name__ == "TensorBoardLogger"
    assert {type(c).__name__ for c in callbacks} == {
        "RunCheckpoint",
        "LearningRateMonitor",
        "StopOnNonFiniteLoss",
        "RngState",
        "LogTestFigures",
        "RunStats",
    }
    assert "=" not in cfg.callbacks.model_checkpoint.filename


def test_test_config_composes(make_cfg):
    cfg = make_cfg(["ckpt=some/run"], name="test")
    assert cfg.ckpt == "some/run" and cfg.get("data") is None
