"""optim=muon (vit.optim.MuonAdamW): which parameters Muon takes, both updates against torch's own, resume, training."""

import copy

import pytest
import torch

from vit.errors import ConfigError
from vit.model import ViT
from vit.optim import MuonAdamW, orthogonalize
from vit.run import train

SMALL = dict(patch_size=8, emb_size=32, img_size=32, depth=2, n_classes=10, num_heads=4, forward_expansion=2, pos_init="sincos", stem_channels=[8])


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) @ torch.diag(torch.logspace(-1, 0.5, shape[1]))  # singular values 10 to 500 apart
    out = orthogonalize(g)
    s = torch.linalg.svdvals(out)
    assert out.shape == g.shape
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 9
    assert s.min() > 0.5 and s.max() < 1.2, s  # Muon's quintic lands them near 1, not exactly on it


def test_muon_takes_the_hidden_matrices_only():
    net = ViT(**SMALL)
    opt = MuonAdamW(net.named_parameters())
    names = {id(p): n for n, p in net.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    linear = {f"{n}.weight" for n, m in net[1].named_modules(prefix="1") if isinstance(m, torch.nn.Linear)}
    assert muon == linear and len(muon) == 2 * 4  # qkv, projection and the MLP's two layers in each of 2 blocks
    assert {"0.positions", "0.cls_token", "2.2.weight", "0.projection.0.weight"} <= adamw  # tables, output layer, stem
    assert muon | adamw == set(names.values())


def test_without_matrices_it_is_torch_adamw():
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(7)) for _ in range(2))
    b.data.copy_(a.data)
    ours = MuonAdamW([("w", a)], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    theirs = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    for step in range(5):
        for p, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            ((p - step) ** 2 * torch.arange(7.0)).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b)


def test_a_matrix_moves_as_torch_muon_moves_it():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(24, 12))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    ours = MuonAdamW([("w", a), ("out", torch.nn.Parameter(torch.zeros(3, 12)))], lr=0.02, weight_decay=0.1)
    theirs = torch.optim.Muon([b], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    target = torch.randn(24, 12)
    for _ in range(4):
        for p, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    moved = (a - start).abs().mean()
    assert moved > 0.01  # 4 steps of lr 0.02 * 0.2 sqrt(24) on an update whose entries are about 0.2
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)  # torch's runs Newton-Schulz in bfloat16, ours in float32


def test_state_dict_resumes_where_it_stopped():
    def steps(net, opt, n):
        torch.manual_seed(1)
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
            opt.step()

    torch.manual_seed(0)
    straight = ViT(**SMALL)
    resumed = ViT(**SMALL)
    resumed.load_state_dict(straight.state_dict())
    opt = MuonAdamW(straight.named_parameters(), lr=3e-3)
    steps(straight, opt, 2)
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it: not the live tensors
    for p, q in zip(resumed.parameters(), straight.parameters()):
        p.data.copy_(q.data)
    fresh = MuonAdamW(resumed.named_parameters(), lr=3e-3)
    fresh.load_state_dict(saved)
    steps(straight, opt, 1)
    steps(resumed, fresh, 1)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0}, "optim.lr must be > 0"), ({"momentum": 1.0}, "optim.momentum must be in [0, 1)"), ({"ns_steps": 0}, "optim.ns_steps")],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        MuonAdamW([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_optim_muon_trains_through_the_module(make_cfg):
    cfg = make_cfg(["optim=muon", "optim.lr=3e-3", "data.num_classes=2", "trainer.max_epochs=3"])
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.9, metrics  # chance is 0.5
