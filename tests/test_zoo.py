"""Other nets through the same paths: any timm model, the CIFAR ResNet-18, fine-tuning from pretrained weights."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from tests.conftest import TINY, run_script
from vit import predict, report, run
from vit.builders import evaluation_module
from vit.cli import run_reporting_errors
from vit.errors import ConfigError
from vit.module import ClassifierModule
from vit.run import build_net, train
from vit.zoo import ResNet18CIFAR, TimmNet

# TINY without its settings of the manual's ViT, and small enough for an 11M-parameter ResNet on one core.
DATA = [o for o in TINY if not o.startswith("model.")] + [
    "data.train_size=96",
    "data.val_size=32",
    "data.test_size=32",
    "data.eval_batch_size=32",
    "trainer.max_epochs=1",
]
TIMM_VIT = ["model=timm", "model.img_size=32", "model.patch_size=4", "model.kwargs={depth:1}"]


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory) -> Path:
    """The manual's ViT, the CIFAR ResNet-18 and timm's ViT-Ti at 32x32 in one sweep, on fake data."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_script("train.py", "-m", "model=vit_cifar,resnet18_cifar,vit_tiny_cifar", *DATA, cwd=cwd, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = list((cwd / "outputs" / "multirun").glob("*/*"))
    return sweep_dir


def read_rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return {r["job"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_side_by_side_report_has_a_row_per_model(side_by_side):
    rows = read_rows(side_by_side)
    params = {r["model"]: int(r["params"]) for r in rows.values()}
    assert params == {"vit_cifar": 607_946, "resnet18_cifar": 11_173_962, "vit_tiny_cifar": params["vit_tiny_cifar"]}
    assert 5_300_000 < params["vit_tiny_cifar"] < 5_500_000  # ViT-Ti's 5.5M less its 224-side position table
    for job, row in rows.items():
        metrics = json.loads((side_by_side / job / "metrics.json").read_text())
        assert row["status"] == "ok" and float(row["test_acc"]) == pytest.approx(metrics["test/acc"])
        assert Path(row["ckpt"]).exists()
    assert "| ckpt | model |" in (side_by_side / "summary.md").read_text()


@pytest.mark.parametrize("which", ["resnet18_cifar", "vit_tiny_cifar"])
@pytest.mark.slow
def test_checkpoints_test_and_predict(side_by_side, make_cfg, tmp_path, which):
    job = next(side_by_side / r["job"] for r in read_rows(side_by_side).values() if r["model"] == which)
    trained = json.loads((job / "metrics.json").read_text())
    tested = run.test(make_cfg([f"ckpt={job}"], name="test", run="test"))
    assert tested["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(image)
    cfg = make_cfg([f"ckpt={job}", f"image={image}", "top_k=2", "attention=true"], name="predict", tiny=False, run="predict")
    if which == "resnet18_cifar":
        with pytest.raises(ConfigError, match="the model ResNet18CIFAR has no attention maps: leave out attention=true"):
            predict.predict(cfg)
        cfg.attention = False
    (result,) = predict.predict(cfg)
    module = evaluation_module(Path(report.job_row(job)["ckpt"]))
    net, config = module.net, module.hparams["config"]
    _, x = predict.model_input([image], config["data"])
    with torch.no_grad():
        probs = net(x).softmax(-1)[0]
    assert result["top"][0] == (config["classes"][int(probs.argmax())], pytest.approx(float(probs.max()), abs=1e-6))
    assert ("attention" in result) == (which == "vit_tiny_cifar") and (which != "vit_tiny_cifar" or Path(result["attention"]).exists())


def test_timm_vit_rollout_rows_sum_to_one():
    torch.manual_seed(0)
    net = TimmNet("vit_tiny_patch16_224", n_classes=4, img_size=32, patch_size=8, kwargs={"depth": 2}).eval()
    x = torch.randn(2, 3, 32, 32)
    rollout = net.attention_rollout(x)
    assert rollout.shape == (2, 17, 17) and (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17))
    assert all(block.attn.fused_attn for block in net.model.blocks)  # restored
    torch.testing.assert_close(net(x), net.model(x))
    saliency = predict.patch_saliency(net, x)
    assert saliency.shape == (2, 4, 4) and saliency.amax() == pytest.approx(1.0)
    # with the class token pooled, the saliency is its rollout row
    torch.testing.assert_close(saliency[0].flatten(), rollout[0, 0, 1:] / rollout[0, 0, 1:].max())


def test_resnet18_cifar_has_the_cifar_stem():
    net = ResNet18CIFAR(n_classes=10)
    assert net.model.conv1.kernel_size == (3, 3) and net.model.conv1.stride == (1, 1)
    assert isinstance(net.model.maxpool, torch.nn.Identity)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962  # kuangliu's pytorch-cifar ResNet18
    features = net.model.forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 512, 4, 4)  # 32 -> 4 over the three stride-2 stages, as in the papers
    assert net.img_size is None and net(torch.randn(2, 3, 40, 40)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="no_such_net"), "model.name=no_such_net is not a timm model"),
        (dict(name="resnet18", img_size=32), "model.name=resnet18 takes images of any size: leave out model.img_size"),
        (dict(name="resnet18", patch_size=4), "model.name=resnet18 does not take these arguments"),
        (dict(name="resnet18", pretrained_file="missing.pth"), "model.pretrained_file=missing.pth does not exist"),
    ],
)
def test_timm_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        TimmNet(n_classes=10, **kwargs)


def test_timm_vit_size_mismatch_names_both_fixes(make_cfg):
    cfg = make_cfg([*DATA, "model=timm", "model.kwargs={depth:1}"], tiny=False)  # timm's default 224 on 32x32 data
    with pytest.raises(ConfigError, match=r"model expects 3x224x224: set model.img_size=32 or data.image_size=224"):
        train(cfg)


def test_fine_tuning_from_a_local_weights_file(make_cfg, tmp_path):
    torch.manual_seed(0)
    source = TimmNet("vit_tiny_patch16_224", n_classes=1000, img_size=32, patch_size=4, kwargs={"depth": 1})
    weights = tmp_path / "vit_tiny.pth"
    torch.save(source.model.state_dict(), weights)

    net = build_net(
        {
            "_target_": "vit.zoo.TimmNet",
            "name": "vit_tiny_patch16_224",
            "img_size": 32,
            "patch_size": 4,
            "kwargs": {"depth": 1},
            "pretrained_file": str(weights),
        },
        10,
    )
    loaded, original = net.model.state_dict(), source.model.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original if not k.startswith("head."))
    assert net.model.head.weight.shape == (10, 192)  # a new head for the data's 10 classes

    cfg = make_cfg([*DATA, *TIMM_VIT, f"model.pretrained_file={weights}", "optim=adamw", "optim.lr=1e-4"], tiny=False)
    metrics = train(cfg)
    assert metrics["test/acc"] is not None
    # test.py rebuilds the net without the weights file: the checkpoint's weights are the fine-tuned ones
    weights.unlink()
    tested = run.test(make_cfg([f"ckpt={cfg.paths.output_dir}"], name="test", run="test"))
    assert tested["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_pretrained_offline_is_one_line_naming_the_file_option(make_cfg, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached weights either
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read when huggingface_hub was imported
    cfg = make_cfg([*DATA, *TIMM_VIT, "model.pretrained=true"], tiny=False)
    with pytest.raises(SystemExit) as info:
        run_reporting_errors(train, cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pretrained=true" in err[0] and "model.pretrained_file=PATH" in err[0], err


def test_vit_tiny_cifar_is_the_timm_command(make_cfg):
    preset = make_cfg(["model=vit_tiny_cifar"], tiny=False).model
    command = make_cfg(["model=timm", "model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=4"], tiny=False).model
    assert preset == command


def test_finetune_preset_builds_from_a_local_file(make_cfg, tmp_path):
    """experiment=finetune, offline: its net (one block here) from a weights file, at the data's resized 224x224."""
    source = TimmNet("vit_small_patch16_224", n_classes=1000, img_size=224, kwargs={"depth": 1})
    weights = tmp_path / "vit_small.pth"
    torch.save(source.model.state_dict(), weights)
    cfg = make_cfg([*DATA, "experiment=finetune", f"model.pretrained_file={weights}", "model.kwargs={depth:1}"], tiny=False)
    assert cfg.optim.lr == 1e-4 and cfg.scheduler.warmup_fraction == 0.1 and cfg.model.pretrained
    datamodule, net, module = run.build_for_fit(cfg)  # checks the data's 224x224 against the net
    assert datamodule.image_shape() == (3, 224, 224) and net.img_size == 224 and net.n_classes == 10
    torch.testing.assert_close(net.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)


# The zoo's nets as their configs build them, small: the project's ViT without and with a conv stem, timm's ViT-Ti,
# the CIFAR ResNet-18 and a timm CNN whose classifier is a 1x1 conv (DLA).
ZOO = {
    "vit_cifar": ["model=vit_cifar", "model.emb_size=16", "model.depth=1", "model.num_heads=2", "model.patch_size=8"],
    "vit_cifar_stem": ["model=vit_cifar", "model.emb_size=16", "model.depth=1", "model.num_heads=2", "model.patch_size=8", "model.stem_channels=[4]"],
    "vit_tiny_cifar": ["model=vit_tiny_cifar", "model.kwargs={depth:1,embed_dim:16,num_heads:2}"],
    "resnet18_cifar": ["model=resnet18_cifar"],
    "dla46_c": ["model=timm", "model.name=dla46_c"],
}
SIDES = {"resnet18_cifar": 8, "dla46_c": 32}  # the CNNs take any size: small steps, within DLA's five halvings
OPTIMS = {"adam": [], "adamw": [], "sgd": [], "muon": [], "muon_convs": [], "split_qkv": ["optim=muon", "optim.split_qkv=true"]}
NO_CONV = r"optim.muon_convs=true: {} has no convolution for Muon \(the first, which reads the image, and the output layers stay with AdamW\): "
NO_QKV = r"optim.split_qkv=true: {} names no fused q/k/v projection to split \(.*\): leave out optim.split_qkv$"
NO_LINEAR = (
    r"optim=muon found no hidden weight matrices in the model \({}; .*\): use optim=muon_convs \(its convolutions under Muon\) or optim=adamw$"
)
# Every other pair trains.
REFUSED = {
    ("vit_cifar", "muon_convs"): NO_CONV.format("ViT") + r"use optim=muon, or give it a convolutional stem \(model.stem_channels=\[32, 64\]\)$",
    ("vit_tiny_cifar", "muon_convs"): NO_CONV.format("model.name=vit_tiny_patch16_224") + "use optim=muon$",
    ("resnet18_cifar", "muon"): NO_LINEAR.format("ResNet18CIFAR"),
    ("resnet18_cifar", "split_qkv"): NO_QKV.format("ResNet18CIFAR"),
    ("dla46_c", "muon"): NO_LINEAR.format("model.name=dla46_c"),
    ("dla46_c", "split_qkv"): NO_QKV.format("model.name=dla46_c"),
}


def last_layer(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """The last layer with parameters to run in a forward pass: the one that gives the logits, found without asking
    the net."""
    ran = []
    layers = [m for m in net.modules() if not list(m.children()) and list(m.parameters())]
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in layers]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return ran[-1]


@pytest.mark.parametrize("option", OPTIMS)
@pytest.mark.parametrize("model", ZOO)
def test_every_optimizer_option_trains_or_refuses_on_every_zoo_net(make_cfg, model, option):
    """Each optimizer option on each kind of net the zoo builds: a few steps move every parameter with a finite loss,
    or the module refuses it in one line whose hint fits that net. No output layer, whatever its kind, goes to Muon."""
    cfg = make_cfg([*ZOO[model], *(OPTIMS[option] or [f"optim={option}"])], tiny=False)
    net = build_net(cfg.model, 10)
    if (model, option) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[model, option]) as e:
            ClassifierModule(net, optimizer=instantiate(cfg.optim))
        assert "\n" not in str(e.value)
        return
    optimizer = ClassifierModule(net, optimizer=instantiate(cfg.optim)).configure_optimizers()
    torch.manual_seed(0)
    side = net.img_size or SIDES[model]
    x, y = torch.randn(2, 3, side, side), torch.randint(0, 10, (2,))
    head = last_layer(net, x)
    in_muon = {id(p) for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    assert head.weight.ndim in (2, 4) and not in_muon & {id(p) for p in head.parameters()}, type(head)
    assert bool(in_muon) == (option in ("muon", "muon_convs", "split_qkv"))
    start = {name: p.detach().clone() for name, p in net.named_parameters()}
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    names = {id(p): name for name, p in net.named_parameters()}
    for group in optimizer.param_groups:  # the gradient reaches some of each group (not what a zero-init BatchNorm holds)
        pushed = [names[id(p)] for p in group["params"] if p.grad.abs().sum() > 0]
        assert pushed and [name for name in pushed if torch.equal(net.get_parameter(name), start[name])] == []
    assert torch.isfinite(F.cross_entropy(net(x), y))
