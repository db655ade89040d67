"""Optimizers built from config (``optim=...``, ``_partial_: true``; the module passes the parameters)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from vit.errors import ConfigError

# Newton-Schulz coefficients of Muon (Jordan et al. 2024), as torch.optim.Muon uses them.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Parameters that are tables (looked up or added), not maps between features: they stay with AdamW.
TABLE_NAMES = ("positions", "cls_token", "pos_embed")


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """(m, n) -> (m, n): close to the nearest semi-orthogonal matrix U V^T of g = U S V^T (Newton-Schulz iterations)."""
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the short side: (n, n) products instead of (m, m)
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices, AdamW for everything else, at one learning rate and weight decay.

    Muon (Jordan et al. 2024) replaces a matrix's momentum by its orthogonalised form, so every direction of
    the update moves at the same rate; it trains the same net in fewer steps than AdamW. It is meant for the
    maps between features (attention, MLP): the tables (positions, class token), the output layer, convolutions
    and every vector (norms, biases) stay with AdamW. Its update is scaled by 0.2 sqrt(max(m, n)) to AdamW's size
    ("match_rms_adamw", Liu et al. 2025, "Muon is scalable"), so AdamW's ``lr`` and ``weight_decay`` carry over.

    ``params``: (name, parameter) pairs (``named_parameters()``: the module passes them, see
    ``takes_named_parameters``): the names tell the tables apart, and the last 2-D parameter is taken as the
    output layer. Plain parameters are routed by shape alone (2-D to Muon).
    """

    takes_named_parameters = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
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
        named = [item if isinstance(item, tuple) else (None, item) for item in _pairs(params)]
        named = [(n, p) for n, p in named if p.requires_grad]
        matrices = [i for i, (_, p) in enumerate(named) if p.ndim == 2]
        output_layer = matrices[-1] if matrices and named[matrices[-1]][0] is not None else None
        muon, adamw = [], []
        for i, (name, p) in enumerate(named):
            is_table = name is not None and name.rsplit(".", 1)[-1] in TABLE_NAMES
            (muon if p.ndim == 2 and not is_table and i != output_layer else adamw).append(p)
        groups = [{"params": muon, "muon": True}, {"params": adamw, "muon": False}]
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
        p.add_(orthogonalize(update, group["ns_steps"]), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

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


def _pairs(params: Iterable) -> list:
    params = list(params)
    if params and isinstance(params[0], dict):
        raise ConfigError("MuonAdamW makes its own parameter groups: give it the parameters, not groups")
    return params
