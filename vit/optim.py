"""Optimizers built from config (``optim=...``, ``_partial_: true``; the module passes the parameters, or the net to an
optimizer that declares ``takes_module``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor, nn

from vit.errors import ConfigError
from vit.model import ClassificationHead, MultiHeadAttention

# Newton-Schulz coefficients of Muon (Jordan et al. 2024), as torch.optim.Muon uses them.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Modules that are output layers by their name (timm: ViT's and DeiT's head, DeiT's head_dist, the ClassifierHead of
# Swin and the CNNs), besides what a timm model's get_classifier() returns and the project ViT's ClassificationHead.
HEAD_NAMES = ("head", "head_dist")


def output_layers(net: nn.Module) -> list[nn.Module]:
    """The net's classifier head(s): the project ViT's ClassificationHead, what timm's ``get_classifier()`` returns
    (a module, or a tuple of them: DeiT's head and head_dist), and every module named ``head`` or ``head_dist``."""
    heads = []
    for name, module in net.named_modules():
        if isinstance(module, ClassificationHead) or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.append(module)
        get_classifier = getattr(module, "get_classifier", None)
        if callable(get_classifier):
            found = get_classifier()
            heads += [m for m in (found if isinstance(found, (tuple, list)) else [found]) if isinstance(m, nn.Module)]
    return heads


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
    """The ids of the net's convolution weights but the first conv's (the one that reads the image): the stem's
    hidden convolutions and the patch projection, maps between features as the Linear weights are."""
    convs = [m.weight for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.weight.requires_grad]
    return {id(w) for w in convs[1:]}


def fused_qkv_weights(net: nn.Module) -> set[int]:
    """The ids of the net's fused q/k/v projection weights (the project's ``MultiHeadAttention.qkv``)."""
    return {id(m.qkv.weight) for m in net.modules() if isinstance(m, MultiHeadAttention)}


def qkv_blocks(w: Tensor) -> Tensor:
    """(3e, e) -> (3, e, e): a fused projection's rows as the q, k and v matrices (``MultiHeadAttention.QKV_LAYOUT``)."""
    return rearrange(w, f"{MultiHeadAttention.QKV_LAYOUT} e -> qkv (h d) e", h=1, qkv=3)


def qkv_fused(w: Tensor) -> Tensor:
    """(3, e, e) -> (3e, e): ``qkv_blocks`` undone."""
    return rearrange(w, f"qkv (h d) e -> {MultiHeadAttention.QKV_LAYOUT} e", h=1)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices, AdamW for everything else, at one learning rate and weight decay.

    Muon (Jordan et al. 2024) replaces a matrix's momentum by its orthogonalised form, so every direction of
    the update moves at the same rate; it trains the same net in fewer steps than AdamW. It is meant for the
    maps between features (attention, MLP): the tables (positions, class token), the output layer, convolutions
    and every vector (norms, biases) stay with AdamW. Its update is scaled by 0.2 sqrt(max(m, n)) to AdamW's size
    ("match_rms_adamw", Liu et al. 2025, "Muon is scalable"), so AdamW's ``lr`` and ``weight_decay`` carry over.

    ``params``: the net (an ``nn.Module``: the module passes it, see ``takes_module``), routed by module
    (``split_for_muon``); a net with no hidden weight matrices is refused (it would train as AdamW under Muon's
    name). Plain parameters are routed by shape alone (2-D to Muon; none 2-D: AdamW). ``split_qkv``: orthogonalise
    the fused q/k/v projection of each ``MultiHeadAttention`` as three matrices, as Muon's authors treat q, k and v,
    rather than one (3e, e) matrix; each is then scaled as an (e, e) matrix. ``muon_convs``: every convolution but
    the first (``hidden_conv_weights``) under Muon too, its (out, in, kh, kw) weight orthogonalised as an
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
            muon, adamw = ([p for _, p in pairs] for pairs in split_for_muon(params))
            if not muon:
                raise ConfigError(
                    f"optim=muon found no hidden weight matrices in the model ({_label(params)}; Muon takes the 2-D weights of linear "
                    "layers between features, not convolutions, tables or the output layer): use optim=adamw"
                )
        else:
            plain = [p for p in _plain(params) if p.requires_grad]
            muon, adamw = [p for p in plain if p.ndim == 2], [p for p in plain if p.ndim != 2]
        convs = hidden_conv_weights(params) if isinstance(params, nn.Module) and muon_convs else set()
        if muon_convs and not convs:
            raise ConfigError(
                "optim.muon_convs=true needs a net with at least two convolutions (model.stem_channels=[...]): this one has none to move to Muon"
            )
        muon, adamw = muon + [p for p in adamw if id(p) in convs], [p for p in adamw if id(p) not in convs]
        fused = fused_qkv_weights(params) if isinstance(params, nn.Module) and split_qkv else set()
        if split_qkv and not fused:
            raise ConfigError("optim.split_qkv=true needs the project's ViT (model=vit_cifar): this model has no fused q/k/v projection to split")
        groups = [
            {"params": [p for p in muon if id(p) not in fused], "muon": True},
            *([{"params": [p for p in muon if id(p) in fused], "muon": True, "split_qkv": True}] if fused else []),
            {"params": adamw, "muon": False},
        ]
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__([g for g in groups if g["params"]], defaults)

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
    def _muon_update(p: Tensor, state: dict, group: dict, lr: float) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        if group.get("split_qkv"):
            update = qkv_blocks(update)
            p.add_(qkv_fused(orthogonalize(update, group["ns_steps"])), alpha=-lr * 0.2 * math.sqrt(max(update.shape[-2:])))
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


def _label(net: nn.Module) -> str:
    """The net as a user knows it: ``model.name=...`` for a timm model (model=timm), else its class (``ResNet18CIFAR``)."""
    name = getattr(net, "name", None)
    return f"model.name={name}" if isinstance(name, str) and type(net).__name__ == "TimmNet" else type(net).__name__
