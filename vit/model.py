"""The course manual's Vision Transformer, with its attention bugs fixed.

Class names, constructor arguments and the module tree are the manual's, so its
``state_dict`` keys load here unchanged. Only ``nn.Module``s live in this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class PatchEmbedding(nn.Module):
    """Cuts the image into patches, projects each, prepends the class token and adds positions."""

    def __init__(self, in_channels: int = 3, patch_size: int = 16, emb_size: int = 768, img_size: int = 224):
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size), ("emb_size", emb_size), ("img_size", img_size)):
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(
            img_size % patch_size == 0,
            f"img_size={img_size} is not divisible by patch_size={patch_size}: choose a patch_size that divides {img_size}",
        )
        super().__init__()
        self.patch_size = patch_size
        self.img_size = img_size
        self.in_channels = in_channels
        self.projection = nn.Sequential(
            nn.Conv2d(in_channels, emb_size, kernel_size=patch_size, stride=patch_size),
            Rearrange("b e h w -> b (h w) e"),
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, emb_size))
        self.positions = nn.Parameter(torch.randn((img_size // patch_size) ** 2 + 1, emb_size))

    def forward(self, x: Tensor) -> Tensor:
        # b c H W -> b (1 + h w) e
        if x.shape[1:] != (self.in_channels, self.img_size, self.img_size):
            raise ValueError(
                f"PatchEmbedding expects images of shape ({self.in_channels}, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape[1:])}"
            )
        x = self.projection(x)
        cls_tokens = repeat(self.cls_token, "() n e -> b n e", b=x.shape[0])
        return torch.cat([cls_tokens, x], dim=1) + self.positions


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention.

    The manual takes the softmax of the raw scores and then divides by sqrt(emb_size);
    correct attention scales the scores by 1/sqrt(head_dim) before the softmax.
    ``seed_attention=True`` keeps the manual's formula, so weights trained with the
    manual's code give the manual's outputs. ``fused=False`` takes the plain einsum
    path, which also keeps the attention weights in ``self.last_attention`` when
    ``keep_attention`` is set (for inspection); both paths compute the same thing.
    """

    def __init__(
        self,
        emb_size: int = 768,
        num_heads: int = 8,
        dropout: float = 0,
        seed_attention: bool = False,
        fused: bool = True,
    ):
        _require(isinstance(num_heads, int) and num_heads > 0, f"num_heads must be a positive integer, got {num_heads!r}")
        _require(
            emb_size % num_heads == 0,
            f"emb_size={emb_size} is not divisible by num_heads={num_heads}: choose num_heads that divides {emb_size}",
        )
        _require(0 <= dropout < 1, f"attention dropout must be in [0, 1), got {dropout}")
        super().__init__()
        self.emb_size = emb_size
        self.num_heads = num_heads
        self.seed_attention = seed_attention
        self.fused = fused
        self.keep_attention = False
        self.last_attention: Tensor | None = None
        self.qkv = nn.Linear(emb_size, emb_size * 3)
        self.att_drop = nn.Dropout(dropout)
        self.projection = nn.Linear(emb_size, emb_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: bool, broadcastable to (b, h, q, k); True where a query may attend to a key."""
        # b n (h d qkv) -> qkv b h n d
        # one copy makes q, k and v contiguous, which the fused CPU and GPU kernels need (qkv is the fastest axis here)
        queries, keys, values = rearrange(self.qkv(x), "b n (h d qkv) -> qkv b h n d", h=self.num_heads, qkv=3).contiguous()
        # The manual's formula is softmax(q k^T) / sqrt(emb_size): a softmax at scale 1, then a constant factor.
        scale = 1.0 if self.seed_attention else None
        if self.fused and not self.keep_attention:
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, dropout_p=self.att_drop.p if self.training else 0.0, scale=scale
            )
        else:
            out = self._plain_attention(queries, keys, values, mask, scale)
        if self.seed_attention:
            out = out / math.sqrt(self.emb_size)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.projection(out)

    def _plain_attention(self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
        scale = queries.shape[-1] ** -0.5 if scale is None else scale
        energy = torch.einsum("bhqd, bhkd -> bhqk", queries, keys) * scale
        if mask is not None:
            energy = energy.masked_fill(~mask, torch.finfo(energy.dtype).min)
        att = F.softmax(energy, dim=-1)
        if self.keep_attention:
            self.last_attention = att.detach()
        att = self.att_drop(att)
        return torch.einsum("bhqk, bhkd -> bhqd", att, values)


class ResidualAdd(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) + x


class FeedForwardBlock(nn.Sequential):
    def __init__(self, emb_size: int, L: int = 4, drop_p: float = 0.0):
        _require(isinstance(L, int) and L > 0, f"forward_expansion must be a positive integer, got {L!r}")
        _require(0 <= drop_p < 1, f"forward_drop_p must be in [0, 1), got {drop_p}")
        super().__init__(
            nn.Linear(emb_size, L * emb_size),
            nn.GELU(),
            nn.Dropout(drop_p),
            nn.Linear(L * emb_size, emb_size),
        )


class TransformerEncoderBlock(nn.Sequential):
    """Pre-norm block; extra kwargs (num_heads, dropout, seed_attention, fused) go to the attention."""

    def __init__(
        self,
        emb_size: int = 768,
        drop_p: float = 0.0,
        forward_expansion: int = 4,
        forward_drop_p: float = 0.0,
        **kwargs,
    ):
        _require(0 <= drop_p < 1, f"drop_p must be in [0, 1), got {drop_p}")
        super().__init__(
            ResidualAdd(nn.Sequential(nn.LayerNorm(emb_size), MultiHeadAttention(emb_size, **kwargs), nn.Dropout(drop_p))),
            ResidualAdd(
                nn.Sequential(
                    nn.LayerNorm(emb_size),
                    FeedForwardBlock(emb_size, L=forward_expansion, drop_p=forward_drop_p),
                    nn.Dropout(drop_p),
                )
            ),
        )


class TransformerEncoder(nn.Sequential):
    def __init__(self, depth: int = 12, **kwargs):
        _require(isinstance(depth, int) and depth > 0, f"depth must be a positive integer, got {depth!r}")
        super().__init__(*[TransformerEncoderBlock(**kwargs) for _ in range(depth)])


class ClassificationHead(nn.Sequential):
    """Mean over all tokens (class token included, as in the manual), then LayerNorm and a linear layer."""

    def __init__(self, emb_size: int = 768, n_classes: int = 1000):
        _require(isinstance(n_classes, int) and n_classes > 0, f"n_classes must be a positive integer, got {n_classes!r}")
        super().__init__(
            Reduce("b n e -> b e", reduction="mean"),
            nn.LayerNorm(emb_size),
            nn.Linear(emb_size, n_classes),
        )


class ViT(nn.Sequential):
    """The manual's ViT: (b, c, H, W) images -> (b, n_classes) logits.

    Extra kwargs reach every TransformerEncoderBlock: ``drop_p``, ``forward_expansion``,
    ``forward_drop_p``, and through it the attention's ``num_heads``, ``dropout``,
    ``seed_attention`` (the manual's attention formula) and ``fused``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 16,
        emb_size: int = 768,
        img_size: int = 224,
        depth: int = 12,
        n_classes: int = 1000,
        **kwargs,
    ):
        super().__init__(
            PatchEmbedding(in_channels, patch_size, emb_size, img_size),
            TransformerEncoder(depth, emb_size=emb_size, **kwargs),
            ClassificationHead(emb_size, n_classes),
        )
        self.in_channels = in_channels
        self.img_size = img_size
        self.n_classes = n_classes

    def attention_modules(self) -> list[MultiHeadAttention]:
        return [m for m in self.modules() if isinstance(m, MultiHeadAttention)]

    @torch.no_grad()
    def attention_rollout(self, x: Tensor) -> Tensor:
        """(b, c, H, W) -> (b, n, n) attention rollout (Abnar & Zuidema, 2020), n = 1 + patches.

        Per layer: the heads' attention averaged, the identity added for the residual path,
        rows renormalised; then the layers multiplied in order. Every row sums to 1: row i
        says how much each input token contributes to output token i.
        """
        attention = self.attention_modules()
        for module in attention:
            module.keep_attention = True
        try:
            self(x)
            rollout = None
            for module in attention:
                a = module.last_attention.float().mean(dim=1)  # b h q k -> b q k
                a = a + torch.eye(a.shape[-1], device=a.device)
                a = a / a.sum(dim=-1, keepdim=True)
                rollout = a if rollout is None else a @ rollout
        finally:
            for module in attention:
                module.keep_attention, module.last_attention = False, None
        return rollout
