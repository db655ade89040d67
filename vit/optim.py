"""Optimizers built from config (``optim=...``, ``_partial_: true``; the module passes the parameters, or the net to an
optimizer that declares ``takes_module``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Protocol

import torch
from einops import rearrange
from torch import Tensor, nn

from vit.errors import ConfigError

# Newton-Schulz coefficients of Muon (Jordan et al. 2024), as torch.optim.Muon uses them.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class RoutedNet(Protocol):
    """What MuonAdamW asks of a net, so that it routes parameters knowing none of the net's classes. The project's
    ``ViT`` and ``vit.zoo``'s nets (any timm model, the CIFAR ResNet) meet it."""

    def output_layers(self) -> list[nn.Module]:
        """The layers that give the logits (classifier heads, of any kind): none of their parameters goes to Muon."""
        ...

    def qkv_projections(self) -> list[tuple[nn.Linear, str]]:
        """Each fused q/k/v projection ((3 a, e) weight) with how its output rows hold q, k and v, as an einops group
        of ``qkv``, ``h`` (heads) and ``d``: "(h d qkv)" interleaved, "(qkv h d)" q's rows first. Empty: none."""
        ...


def output_layers(net: nn.Module) -> list[nn.Module]:
    """The net's output layers, as it names them (``RoutedNet.output_layers``); a net that names none is refused, since
    an output layer must never go to Muon."""
    named = getattr(net, "output_layers", None)
    if not callable(named):
        raise ConfigError(
            f"optim=muon keeps the output layers with AdamW, and {_label(net)} does not name its own (no output_layers() method, "
            "vit.optim.RoutedNet): add one or use optim=adamw"
        )
    return list(named())


def qkv_layouts(net: nn.Module) -> dict[int, str]:
    """The ids of the net's fused q/k/v projection weights, each with its layout (``RoutedNet.qkv_projections``)."""
    named = getattr(net, "qkv_projections", None)
    return {id(layer.weight): layout for layer, layout in (named() if callable(named) else [])}


def split_for_muon(net: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """The net's trainable (name, parameter) pairs as (Muon's, AdamW's), each in ``named_parameters()`` order.

    Routed by the module that holds each parameter: Muon takes the ``weight`` of every ``nn.Linear`` outside the
    output layers (the hidden maps between features: attention, MLP, Swin's patch merging); AdamW takes the rest:
    tables (a parameter held directly by a module that is not a Linear: positions, class tokens, Swin's
    ``relative_position_bias_table``; ``nn.Embedding``), the output layers (``output_layers``), convolutions,
    and every vector (norms, biases, layer scales).
    """
    head = {id(p) for module in output_layers(net) for p in module.parameters()}
    tables = {id(p) for module in net.modules() if not isinstance(module, nn.Linear) for p in module.parameters(recurse=False)}
    hidden = {id(m.weight) for m in net.modules() if isinstance(m, nn.Linear)} - head - tables
    muon, adamw = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (muon if id(p) in hidden and p.ndim == 2 else adamw).append((name, p))
    return muon, adamw


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """(..., m, n) -> (..., m, n): each matrix close to the nearest semi-orthogonal matrix U V^T of g = U S V^T
    (Newton-Schulz iterations)."""
    a, b, c = NS_COEFFICIENTS
    x = g / ((g.norm() if g.ndim == 2 else g.norm(dim=(-2, -1), keepdim=True)) + eps)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the short side: (n, n) products instead of (m, m)
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


def hidden_conv_weights(net: nn.Module) -> set[int]:
    """The ids of the net's convolution weights but the first conv's (the one that reads the image) and the output
    layers' (a conv head): the stem's hidden convolutions, the patch projection, a CNN's blocks; maps between
    features as the Linear weights are."""
    head = {id(p) for module in output_layers(net) for p in module.parameters()}
    convs = [m.weight for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.weight.requires_grad]
    return {id(w) for w in convs[1:]} - head


def qkv_blocks(w: Tensor, layout: str) -> Tensor:
    """(3a, e) -> (3, a, e): a fused projection's rows as the q, k and v matrices, laid out as ``layout`` says
    (``RoutedNet.qkv_projections``)."""
    return rearrange(w, f"{layout} e -> qkv (h d) e", h=1, qkv=3)


def qkv_fused(w: Tensor, layout: str) -> Tensor:
    """(3, a, e) -> (3a, e): ``qkv_blocks`` undone."""
    return rearrange(w, f"qkv (h d) e -> {layout} e", h=1)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices, AdamW for everything else, at one learning rate and weight decay.

    Muon (Jordan et al. 2024) replaces a matrix's momentum by its orthogonalised form, so every direction of
    the update moves at the same rate; it trains the same net in fewer steps than AdamW. It is meant for the
    maps between features (attention, MLP): the tables (positions, class token), the output layer, convolutions
    and every vector (norms, biases) stay with AdamW. Its update is scaled by 0.2 sqrt(max(m, n)) to AdamW's size
    ("match_rms_adamw", Liu et al. 2025, "Muon is scalable"), so AdamW's ``lr`` and ``weight_decay`` carry over.

    ``params``: the net (an ``nn.Module``: the module passes it, see ``takes_module``), routed by module
    (``split_for_muon``) and by what the net says of itself (``RoutedNet``: its output layers, its q/k/v layout); a
    net with no hidden weight matrices is refused (it would train as AdamW under Muon's name). Plain parameters are
    routed by shape alone (2-D to Muon; none 2-D: AdamW). ``split_qkv``: orthogonalise each fused q/k/v projection
    (``RoutedNet.qkv_projections``) as three matrices, as Muon's authors treat q, k and v, rather than one (3a, e)
    matrix; each is then scaled as an (a, e) matrix. ``muon_convs``: every convolution but the first and the output
    layers (``hidden_conv_weights``) under Muon too, its (out, in, kh, kw) weight orthogonalised as an
    (out, in kh kw) matrix, as airbench94_muon trains its convolutions; the first stays with AdamW.
    """

    takes_module = True

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        split_qkv: bool = False,
        muon_convs: bool = False,
    ):
        if not lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ConfigError(f"optim.betas must be in [0, 1), got {list(betas)}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {momentum}")
        if not (isinstance(ns_steps, int) and ns_steps > 0):
            raise ConfigError(f"optim.ns_steps must be a positive integer, got {ns_steps!r}")
        if isinstance(params, nn.Module):
            muon, adamw, layouts = self._route(params, split_qkv, muon_convs)
        else:
            if split_qkv or muon_convs:
                raise ConfigError("optim.split_qkv and optim.muon_convs route by module: give MuonAdamW the net, not its parameters")
            plain = [p for p in _plain(params) if p.requires_grad]
            muon, adamw, layouts = [p for p in plain if p.ndim == 2], [p for p in plain if p.ndim != 2], {}
        fused = {id(p) for p in muon if id(p) in layouts}
        # Each split projection's layout, by parameter: kept out of the groups, so the state_dict is as it was.
        self.qkv_layouts = {p: layouts[id(p)] for p in muon if id(p) in fused}
        groups = [
            {"params": [p for p in muon if id(p) not in fused], "muon": True},
            *([{"params": [p for p in muon if id(p) in fused], "muon": True, "split_qkv": True}] if fused else []),
            {"params": adamw, "muon": False},
        ]
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__([g for g in groups if g["params"]], defaults)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "qkv_layouts": self.qkv_layouts}  # a copy (deepcopy, pickle) steps as this one

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
                if group["muon"]:
                    self._muon_update(p, state, group, lr)
                else:
                    self._adamw_update(p, state, group, lr)
        return loss

    @staticmethod
    def _route(net: nn.Module, split_qkv: bool, muon_convs: bool) -> tuple[list[Tensor], list[Tensor], dict[int, str]]:
        """(Muon's, AdamW's, the fused q/k/v weights' layouts by id) for the net and the options, or a one-line refusal
        whose hint fits the net."""
        label = _label(net)
        muon, adamw = ([p for _, p in pairs] for pairs in split_for_muon(net))
        convs = hidden_conv_weights(net)
        if muon_convs and not convs:
            stem = ", or give it a convolutional stem (model.stem_channels=[32, 64])" if _takes(net, "stem_channels") else ""
            raise ConfigError(
                f"optim.muon_convs=true: {label} has no convolution for Muon (the first, which reads the image, and the output "
                f"layers stay with AdamW): use optim=muon{stem}"
            )
        if muon_convs:
            muon, adamw = muon + [p for p in adamw if id(p) in convs], [p for p in adamw if id(p) not in convs]
        layouts = qkv_layouts(net) if split_qkv else {}
        if split_qkv and not {id(p) for p in muon} & layouts.keys():
            raise ConfigError(
                f"optim.split_qkv=true: {label} names no fused q/k/v projection to split (the project's ViT and timm's ViT and "
                "Swin attention have one): leave out optim.split_qkv"
            )
        if not muon:
            fix = "optim=muon_convs (its convolutions under Muon) or optim=adamw" if convs else "optim=adamw"
            raise ConfigError(
                f"optim=muon found no hidden weight matrices in the model ({label}; Muon takes the 2-D weights of linear layers "
                f"between features, not convolutions, tables or the output layer): use {fix}"
            )
        return muon, adamw, layouts

    def _muon_update(self, p: Tensor, state: dict, group: dict, lr: float) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        if group.get("split_qkv"):
            layout = self.qkv_layouts[p]
            update = qkv_blocks(update, layout)
            p.add_(qkv_fused(orthogonalize(update, group["ns_steps"]), layout), alpha=-lr * 0.2 * math.sqrt(max(update.shape[-2:])))
        else:  # a conv's (out, in, kh, kw) as (out, in kh kw)
            matrix = update.flatten(1)
            p.add_(orthogonalize(matrix, group["ns_steps"]).view_as(p), alpha=-lr * 0.2 * math.sqrt(max(matrix.shape)))

    @staticmethod
    def _adamw_update(p: Tensor, state: dict, group: dict, lr: float) -> None:
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), g = group["betas"], p.grad
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def _plain(params: Iterable) -> list[Tensor]:
    params = list(params)
    if params and isinstance(params[0], dict):
        raise ConfigError("MuonAdamW makes its own parameter groups: give it the net or its parameters, not groups")
    if params and isinstance(params[0], tuple):
        raise ConfigError("MuonAdamW routes by module: give it the net (MuonAdamW(net)) or plain parameters, not (name, parameter) pairs")
    return params


def _takes(net: nn.Module, key: str) -> bool:
    """Whether the net's constructor takes ``key`` (so ``model.KEY`` is a setting of this model)."""
    return key in inspect.signature(type(net)).parameters


def _label(net: nn.Module) -> str:
    """The net as a user knows it: ``model.name=...`` for a timm model (model=timm), else its class (``ResNet18CIFAR``)."""
    name = getattr(net, "name", None)
    return f"model.name={name}" if isinstance(name, str) and type(net).__name__ == "TimmNet" else type(net).__name__
