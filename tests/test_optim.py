"""optim=muon (vit.optim.MuonAdamW): which parameters Muon takes, both updates against torch's own, resume, training."""

import copy
import functools

import pytest
import torch

from tests.conftest import TINY
from vit.errors import ConfigError
from vit.model import MultiHeadAttention, ViT
from vit.module import ClassifierModule
from vit.optim import MuonAdamW, orthogonalize, qkv_blocks
from vit.run import build_for_fit, train
from vit.zoo import TimmNet

SMALL = dict(patch_size=8, emb_size=32, img_size=32, depth=2, n_classes=10, num_heads=4, forward_expansion=2, pos_init="sincos", stem_channels=[8])
# experiment=budget's net (conf/experiment/fast.yaml and budget.yaml): 595,386 parameters
BUDGET = dict(
    patch_size=4,
    emb_size=128,
    img_size=32,
    depth=4,
    n_classes=10,
    num_heads=4,
    forward_expansion=2,
    pos_init="sincos",
    dynamic_img_size=True,
    stem_channels=[48, 96],
)
# timm nets without weights, small: a ViT, a Swin (relative_position_bias_table: 2-D tables) and a distilled DeiT (two heads)
TIMM_NETS = {
    "vit": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, embed_dim=32, num_heads=2)),
}


def routed_by_the_module(net: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The names of the net's parameters that go to Muon and to AdamW, as training builds optim=muon (in order)."""
    optimizer = ClassifierModule(net, optimizer=functools.partial(MuonAdamW, lr=1e-3)).configure_optimizers()
    names = {id(p): n for n, p in net.named_parameters()}
    return tuple([names[id(p)] for g in optimizer.param_groups if g["muon"] is muon for p in g["params"]] for muon in (True, False))


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) @ torch.diag(torch.logspace(-1, 0.5, shape[1]))  # singular values 10 to 500 apart
    out = orthogonalize(g)
    s = torch.linalg.svdvals(out)
    assert out.shape == g.shape
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 9
    assert s.min() > 0.5 and s.max() < 1.2, s  # Muon's quintic lands them near 1, not exactly on it


@pytest.mark.parametrize("kwargs", [SMALL, BUDGET], ids=["small", "budget"])
def test_muon_takes_the_hidden_matrices_only(kwargs):
    net = ViT(**kwargs)
    muon, adamw = routed_by_the_module(net)
    names = [n for n, _ in net.named_parameters()]
    linear = {f"{n}.weight" for n, m in net[1].named_modules(prefix="1") if isinstance(m, torch.nn.Linear)}
    # the encoder's Linear weights, in the net's order (so optimizer states of checkpoints saved before load as they were):
    # qkv, projection and the MLP's two layers in each block
    assert muon == [n for n in names if n in linear] and len(muon) == kwargs["depth"] * 4
    assert {"0.positions", "0.cls_token", "2.2.weight", "0.projection.0.weight"} <= set(adamw)  # tables, output layer, stem
    assert adamw == [n for n in names if n not in linear]
    if kwargs is BUDGET:
        assert sum(p.numel() for p in net.parameters()) == 595_386


@pytest.mark.parametrize("which", TIMM_NETS)
def test_timm_nets_route_by_module(which):
    """Muon takes the hidden Linear weights; tables (Swin's relative_position_bias_table), both of DeiT's heads,
    Swin's head.fc and the patch convolution go to AdamW."""
    name, kwargs = TIMM_NETS[which]
    net = TimmNet(name, n_classes=10, img_size=32, patch_size=4, kwargs=kwargs)
    muon, adamw = routed_by_the_module(net)
    hidden = {
        f"{n}.weight"
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2", "reduction")
    }
    assert set(muon) == hidden and {"qkv", "proj", "fc1", "fc2"} <= {n.split(".")[-2] for n in muon}
    assert not [n for n in muon if "relative_position_bias_table" in n or ".head" in n]
    heads = {"vit": {"model.head.weight"}, "swin": {"model.head.fc.weight"}, "deit_distilled": {"model.head.weight", "model.head_dist.weight"}}[which]
    assert heads | {"model.patch_embed.proj.weight"} <= set(adamw)
    if which == "swin":
        assert len([n for n in adamw if n.endswith("relative_position_bias_table")]) == 2  # one per block, 2-D
    assert sorted(muon + adamw) == sorted(n for n, _ in net.named_parameters())


@pytest.mark.parametrize(("split_qkv", "muon_convs"), [(False, False), (True, False), (False, True), (True, True)])
def test_the_vits_groups_are_as_before_the_net_named_its_own_layers(split_qkv, muon_convs):
    """The project's ViT's parameter groups, members and order, as the routing by class gave them (so its checkpoints'
    optimizer states load as they were): Muon's (the encoder's Linear weights, but q/k/v under split_qkv, then the
    convolutions after the first under muon_convs), the split q/k/v group, then AdamW's, each in the net's order."""
    net = ViT(**SMALL)
    optimizer = MuonAdamW(net, split_qkv=split_qkv, muon_convs=muon_convs)
    names = [n for n, _ in net.named_parameters()]
    linear = [n for n in names if n.startswith("1.") and n.endswith("weight") and net.get_parameter(n).ndim == 2]
    qkv = [n for n in linear if n.endswith(".qkv.weight")] if split_qkv else []
    convs = [n for n in names if net.get_parameter(n).ndim == 4][1:] if muon_convs else []
    expected = [(True, False, [n for n in linear if n not in qkv] + convs), (True, True, qkv)]
    expected.append((False, False, [n for n in names if n not in linear + convs]))
    by_id = {id(p): n for n, p in net.named_parameters()}
    groups = [(g["muon"], g.get("split_qkv", False), [by_id[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    assert groups == [g for g in expected if g[2]]
    assert len(linear) == SMALL["depth"] * 4 and len(convs) == (1 if muon_convs else 0)  # qkv, projection, MLP; the patch conv


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_timm_split_qkv_takes_the_rows_its_attention_uses_as_q_k_and_v(monkeypatch, which):
    """As for the project's attention: timm's, fed the identity (no bias), hands scaled_dot_product_attention W_q, W_k and
    W_v transposed, and they must be the blocks of the layout the net names (``TimmNet.qkv_projections``)."""
    name, kwargs = TIMM_NETS[which]
    net = TimmNet(name, n_classes=10, img_size=32, patch_size=4, kwargs=kwargs)
    projections = net.qkv_projections()
    attentions = [m for m in net.modules() if isinstance(getattr(m, "qkv", None), torch.nn.Linear)]
    assert [layer for layer, _ in projections] == [m.qkv for m in attentions] and len(attentions) == 2  # every block's
    layer, layout = projections[0]
    attention = attentions[0]
    attention.fused_attn = True
    torch.nn.init.zeros_(layer.bias)
    seen = {}

    def capture(q, k, v, **kwargs):
        seen["qkv"] = (q, k, v)
        return q

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", capture)
    e = layer.in_features  # 16 for the Swin: as many tokens as its 4 x 4 window holds
    attention(torch.eye(e)[None])
    for block, used in zip(qkv_blocks(layer.weight.detach(), layout), seen["qkv"]):
        torch.testing.assert_close(block.T, used[0].permute(1, 0, 2).reshape(e, e))  # h n d -> n (h d)


def test_a_net_without_hidden_matrices_is_refused(make_cfg):
    """model=resnet18_cifar has convolutions and an output layer only: optim=muon would be AdamW under Muon's name, and
    the hint names the option that puts its convolutions under Muon."""
    data = [o for o in TINY if not o.startswith("model.")] + ["data.train_size=32", "data.val_size=0", "data.test_size=32"]
    cfg = make_cfg([*data, "model=resnet18_cifar", "optim=muon"], tiny=False)
    with pytest.raises(
        ConfigError,
        match=r"optim=muon found no hidden weight matrices in the model \(ResNet18CIFAR; .*\): use optim=muon_convs \(.*\) or optim=adamw$",
    ) as e:
        build_for_fit(cfg)  # when the module is built, before the data loads
    assert "\n" not in str(e.value)


def test_a_net_that_does_not_name_its_output_layers_is_refused():
    """Nothing tells a plain stack's last Linear (its output layer) from a hidden one: rather than guess, and put the
    output layer under Muon, the optimizer asks the net (``RoutedNet``) and refuses one that does not answer."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"Sequential does not name its own \(no output_layers\(\) method, .*\): add one or use optim=adamw$"):
        MuonAdamW(net)


def test_named_pairs_are_refused():
    """Names alone cannot tell a table or an output layer from a hidden map: the optimizer takes the net itself."""
    with pytest.raises(ConfigError, match=r"routes by module: give it the net"):
        MuonAdamW(ViT(**SMALL).named_parameters())


def test_without_matrices_it_is_torch_adamw():
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(7)) for _ in range(2))
    b.data.copy_(a.data)
    ours = MuonAdamW([a], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
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
    ours = MuonAdamW([a], lr=0.02, weight_decay=0.1)
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


def lone_matrix_step(grad: torch.Tensor) -> torch.Tensor:
    """The step MuonAdamW takes on a lone matrix parameter with this gradient (lr 1, no momentum, no weight decay): the
    path ``test_a_matrix_moves_as_torch_muon_moves_it`` checks against torch.optim.Muon, so a block or a conv that moves
    by it is orthogonalised and scaled as a matrix of its own shape, without this file restating the formula."""
    p = torch.nn.Parameter(torch.zeros_like(grad))
    opt = MuonAdamW([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def test_split_qkv_takes_the_rows_the_attention_uses_as_q_k_and_v(monkeypatch):
    """The model's own forward, fed the identity (no bias), hands scaled_dot_product_attention W_q, W_k and W_v
    transposed: they must be qkv_blocks' three blocks."""
    attention = MultiHeadAttention(emb_size=12, num_heads=3)
    torch.nn.init.zeros_(attention.qkv.bias)
    seen = {}

    def capture(q, k, v, **kwargs):
        seen["qkv"] = (q, k, v)
        return q

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", capture)
    attention(torch.eye(12)[None])
    blocks = qkv_blocks(attention.qkv.weight.detach(), attention.QKV_LAYOUT)
    for block, used in zip(blocks, seen["qkv"]):
        torch.testing.assert_close(block.T, used[0].permute(1, 0, 2).reshape(12, 12))  # h n d -> n (h d)


def test_split_qkv_orthogonalises_q_k_and_v_apart_and_leaves_the_rest_as_before():
    torch.manual_seed(0)
    net = ViT(**SMALL)
    twin = copy.deepcopy(net)
    split = MuonAdamW(net, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, split_qkv=True)
    fused = MuonAdamW(twin, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    qkv = next(m.qkv.weight for m in net.modules() if isinstance(m, MultiHeadAttention))
    for model in (net, twin):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    start, grad = qkv.detach().clone(), qkv_blocks(qkv.grad, MultiHeadAttention.QKV_LAYOUT)
    split.step()
    fused.step()
    for block, g in zip(qkv_blocks(qkv.detach() - start, MultiHeadAttention.QKV_LAYOUT), grad):
        torch.testing.assert_close(block, lone_matrix_step(g))
    moved = dict(twin.named_parameters())
    for name, p in net.named_parameters():
        if name.endswith("qkv.weight"):
            assert not torch.allclose(p, moved[name])  # fused orthogonalisation moves it otherwise
        else:
            torch.testing.assert_close(p, moved[name])
    with pytest.raises(ConfigError, match="optim.split_qkv and optim.muon_convs route by module: give MuonAdamW the net"):
        MuonAdamW([torch.nn.Parameter(torch.zeros(2, 2))], split_qkv=True)


def test_muon_convs_orthogonalises_every_conv_but_the_first_as_a_matrix():
    torch.manual_seed(0)
    net = ViT(**{**SMALL, "stem_channels": [8, 16]})
    twin = copy.deepcopy(net)
    opt = MuonAdamW(net, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, muon_convs=True)
    plain = MuonAdamW(twin, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for model in (net, twin):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    starts, grads = [w.detach().clone() for w in convs], [w.grad.clone() for w in convs]
    opt.step()
    plain.step()
    assert len(convs) == 3  # two stem convs and the patch projection
    moved = dict(twin.named_parameters())
    first = next(name for name, p in net.named_parameters() if p is convs[0])
    torch.testing.assert_close(convs[0], moved[first])  # the first conv: AdamW's step, as without the option
    for w, start, g in zip(convs[1:], starts[1:], grads[1:]):
        torch.testing.assert_close((w.detach() - start).flatten(1), lone_matrix_step(g.flatten(1)))
    for name, p in net.named_parameters():
        if all(p is not w for w in convs[1:]):
            torch.testing.assert_close(p, moved[name])
    with pytest.raises(
        ConfigError, match=r"optim.muon_convs=true: ViT has no convolution for Muon .*: use optim=muon, or give it a convolutional stem"
    ):
        MuonAdamW(ViT(**{**SMALL, "stem_channels": []}), muon_convs=True)  # the patch projection alone: it reads the image


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
    opt = MuonAdamW(straight, lr=3e-3)
    steps(straight, opt, 2)
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it: not the live tensors
    for p, q in zip(resumed.parameters(), straight.parameters()):
        p.data.copy_(q.data)
    fresh = MuonAdamW(resumed, lr=3e-3)
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
