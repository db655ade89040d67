"""The course manual's Vision Transformer, with its attention bugs fixed.

Class names, constructor arguments and the module tree are the manual's, so its
``state_dict`` keys load here unchanged. Only ``nn.Module``s live in this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class PatchEmbedding(nn.Module):
    """Cuts the image into patches, projects each, prepends the class token and adds positions.

    ``pos_init``: how the class token and the positions start. "randn": N(0, 1), as the manual;
    "trunc_normal": a normal with std 0.02 truncated at 2 std (timm's ViTs), so they do not drown
    the patch features at the start; "sincos": positions start as 2-D sine-cosine waves over the
    patch grid (MAE, MoCo v3), which tell neighbouring patches apart from the first step, and the
    class token as "trunc_normal". Either way they are learnt.
    ``dynamic_img_size``: images of any side divisible by ``patch_size`` are accepted, the
    positions resampled (bicubic) from the ``img_size`` grid to theirs; at ``img_size`` nothing
    changes. Progressive resizing (``data.train_sizes``) trains at smaller sides with it.
    ``stem_channels``: a convolutional stem before the projection (Xiao et al. 2021, "Early convolutions
    help transformers see better"): one 3x3 stride-2 convolution, BatchNorm and ReLU per entry, so a
    patch's pixels are mixed by small overlapping filters before they become a token; the projection
    then covers what is left of the patch (``patch_size`` over the product of ``stem_strides``, 1x1 when nothing).
    Same tokens, same grid; small data sets learn faster with it. Empty (the manual's): one strided conv.
    ``stem_strides``: each stem conv's stride, 1 or 2 (empty: 2 for each); a stride-1 conv filters at the
    full resolution before the grid shrinks, for a few hundred parameters; ``patch_size`` must then be
    divisible by the product of the strides.
    """

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 16,
        emb_size: int = 768,
        img_size: int = 224,
        pos_init: str = "randn",
        dynamic_img_size: bool = False,
        stem_channels: Sequence[int] = (),
        stem_strides: Sequence[int] = (),
    ):
        stem_channels = list(stem_channels or ())
        stem_strides = list(stem_strides or ()) or [2] * len(stem_channels)
        _require(
            len(stem_strides) == len(stem_channels) and all(s in (1, 2) for s in stem_strides),
            f"stem_strides must give a stride of 1 or 2 for each of the {len(stem_channels)} stem_channels (or be empty: 2 each); got {stem_strides}",
        )
        reduction = math.prod(stem_strides)
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size), ("emb_size", emb_size), ("img_size", img_size)):
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(
            img_size % patch_size == 0,
            f"img_size={img_size} is not divisible by patch_size={patch_size}: choose a patch_size that divides {img_size}",
        )
        _require(
            all(isinstance(c, int) and c > 0 for c in stem_channels) and patch_size % reduction == 0,
            f"stem_channels must be positive integers, one conv each, and patch_size={patch_size} must be divisible by the product "
            f"of their strides ({reduction}); got stem_channels={stem_channels}, stem_strides={stem_strides}",
        )
        _require(pos_init in POS_INITS, f"pos_init must be one of {', '.join(POS_INITS)}, got {pos_init!r}")
        _require(pos_init != "sincos" or emb_size % 4 == 0, f"pos_init=sincos needs emb_size divisible by 4, got {emb_size}")
        super().__init__()
        self.patch_size = patch_size
        self.img_size = img_size
        self.in_channels = in_channels
        self.dynamic_img_size = dynamic_img_size
        stem, channels = [], in_channels
        for out, stride in zip(stem_channels, stem_strides):  # b c H W -> b out H/stride W/stride
            stem += [nn.Conv2d(channels, out, kernel_size=3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        rest = patch_size // reduction
        self.projection = nn.Sequential(
            *stem,
            nn.Conv2d(channels, emb_size, kernel_size=rest, stride=rest),
            Rearrange("b e h w -> b (h w) e"),
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, emb_size))
        self.positions = nn.Parameter(torch.randn((img_size // patch_size) ** 2 + 1, emb_size))
        if pos_init != "randn":  # after the manual's draws, so its default keeps the random stream as it was
            for table in (self.cls_token, self.positions):
                nn.init.trunc_normal_(table, std=0.02, a=-0.04, b=0.04)
        if pos_init == "sincos":
            with torch.no_grad():
                self.positions[1:] = sincos_positions(img_size // patch_size, emb_size)

    def forward(self, x: Tensor) -> Tensor:
        # b c H W -> b (1 + h w) e
        size_ok = x.shape[2:] == (self.img_size, self.img_size) or (
            self.dynamic_img_size and x.shape[2] % self.patch_size == 0 and x.shape[3] % self.patch_size == 0
        )
        if x.shape[1] != self.in_channels or not size_ok:
            sides = f"any sides divisible by {self.patch_size}" if self.dynamic_img_size else f"{self.img_size}, {self.img_size}"
            raise ValueError(f"PatchEmbedding expects images of shape ({self.in_channels}, {sides}), got {tuple(x.shape[1:])}")
        positions = self.resampled_positions(x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        x = self.projection(x)
        cls_tokens = repeat(self.cls_token, "() n e -> b n e", b=x.shape[0])
        return torch.cat([cls_tokens, x], dim=1) + positions

    def resampled_positions(self, h: int, w: int) -> Tensor:
        """(1 + g g, e) positions of the ``img_size`` grid g x g -> (1 + h w, e) for an h x w grid of patches."""
        g = self.img_size // self.patch_size
        if (h, w) == (g, g):
            return self.positions
        grid = rearrange(self.positions[1:], "(h w) e -> 1 e h w", h=g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.positions[:1], rearrange(grid, "1 e h w -> (h w) e")])


POS_INITS = ("randn", "trunc_normal", "sincos")


def sincos_positions(grid: int, emb_size: int) -> Tensor:
    """(grid grid, emb_size) 2-D sine-cosine position codes: half the channels encode the row, half the column."""
    quarter = emb_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = [rearrange(axis, "h w -> (h w) 1") * omega for axis in (rows, cols)]  # (h w) quarter each
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention.

    The manual takes the softmax of the raw scores and then divides by sqrt(emb_size);
    correct attention scales the scores by 1/sqrt(head_dim) before the softmax.
    ``seed_attention=True`` keeps the manual's formula, so weights trained with the
    manual's code give the manual's outputs. ``fused=True`` takes PyTorch's fused
    ``F.scaled_dot_product_attention``, ``fused=False`` the plain einsum path (which also
    keeps the attention weights in ``self.last_attention`` when ``keep_attention`` is set,
    for inspection); ``None`` (the default) the faster of the two for the device and dtype
    the step runs in (``sdpa_is_faster``). Both paths compute the same thing.
    """

    def __init__(
        self,
        emb_size: int = 768,
        num_heads: int = 8,
        dropout: float = 0,
        seed_attention: bool = False,
        fused: bool | None = None,
    ):
        _require(isinstance(num_heads, int) and num_heads > 0, f"num_heads must be a positive integer, got {num_heads!r}")
        _require(
            emb_size % num_heads == 0,
            f"emb_size={emb_size} is not divisible by num_heads={num_heads}: choose num_heads that divides {emb_size}",
        )
        _require(0 <= dropout < 1, f"attention dropout must be in [0, 1), got {dropout}")
        _require(fused in (None, True, False), f"fused must be true, false or null (the faster for the device and dtype), got {fused!r}")
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

    # How the fused projection's outputs (and so the rows of ``qkv.weight``) hold q, k and v: interleaved, qkv the
    # fastest axis, as the manual's code lays them out. optim=muon reads it to orthogonalise q, k and v apart.
    QKV_LAYOUT = "(h d qkv)"

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: bool, broadcastable to (b, h, q, k); True where a query may attend to a key."""
        # one copy makes q, k and v contiguous, which the fused CPU and GPU kernels need (qkv is the fastest axis here)
        queries, keys, values = rearrange(self.qkv(x), f"b n {self.QKV_LAYOUT} -> qkv b h n d", h=self.num_heads, qkv=3).contiguous()
        # The manual's formula is softmax(q k^T) / sqrt(emb_size): a softmax at scale 1, then a constant factor.
        scale = 1.0 if self.seed_attention else None
        fused = self.fused if self.fused is not None else sdpa_is_faster(queries.device, queries.dtype, queries.shape[-1])
        if fused and not self.keep_attention:
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
        if scale != 1.0:  # on the queries (b h n d), not the scores (b h n n): n / d times fewer multiplications
            queries = queries * scale
        energy = torch.einsum("bhqd, bhkd -> bhqk", queries, keys)
        if mask is not None:
            energy = energy.masked_fill(~mask, torch.finfo(energy.dtype).min)
        att = F.softmax(energy, dim=-1)
        if self.keep_attention:
            self.last_attention = att.detach()
        att = self.att_drop(att)
        return torch.einsum("bhqk, bhkd -> bhqd", att, values)


def sdpa_is_faster(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``F.scaled_dot_product_attention`` is faster than the plain einsum path here: the one rule that picks the
    attention kernel (``MultiHeadAttention(fused=None)``), from ``bench/attention.py`` (docs/measurements.md, "Attention
    kernels").

    On CUDA the fused kernels (flash, memory-efficient) win. On a CPU (a 2-core AMD EPYC with avx512_bf16, 65 tokens,
    batch 32 and 256, head dims 8 to 128): in fp32 SDPA takes 0.45-0.86x the plain path's time to train (forward +
    backward) and 0.56-1.02x to infer; in bf16 it takes 3.4-7.8x and 1.7-2.6x (its CPU kernel has no fast bf16 path at
    these sizes), so bf16 and fp16 take the plain path. Above head dim 128 (unmeasured; SDPA's lag shrinks as heads
    grow) SDPA.
    """
    return device.type != "cpu" or dtype == torch.float32 or head_dim > 128


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
    """Pools the tokens, then LayerNorm and a linear layer.

    ``pool="mean"`` averages all tokens, class token included, as the manual does; ``pool="cls"``
    takes the class token alone, as the original ViT does.
    """

    def __init__(self, emb_size: int = 768, n_classes: int = 1000, pool: str = "mean"):
        _require(isinstance(n_classes, int) and n_classes > 0, f"n_classes must be a positive integer, got {n_classes!r}")
        _require(pool in POOLS, f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        super().__init__(
            Reduce("b n e -> b e", reduction="mean") if pool == "mean" else ClassToken(),
            nn.LayerNorm(emb_size),
            nn.Linear(emb_size, n_classes),
        )


POOLS = ("mean", "cls")


class ClassToken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]  # b n e -> b e


class ViT(nn.Sequential):
    """The manual's ViT: (b, c, H, W) images -> (b, n_classes) logits.

    Extra kwargs reach every TransformerEncoderBlock: ``drop_p``, ``forward_expansion``,
    ``forward_drop_p``, and through it the attention's ``num_heads``, ``dropout``,
    ``seed_attention`` (the manual's attention formula) and ``fused``. ``pos_init``,
    ``dynamic_img_size``, ``stem_channels`` and ``stem_strides`` go to the PatchEmbedding, ``pool`` to the ClassificationHead; their
    defaults are the manual's model.
    """

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 16,
        emb_size: int = 768,
        img_size: int = 224,
        depth: int = 12,
        n_classes: int = 1000,
        pool: str = "mean",
        pos_init: str = "randn",
        dynamic_img_size: bool = False,
        stem_channels: Sequence[int] = (),
        stem_strides: Sequence[int] = (),
        **kwargs,
    ):
        super().__init__(
            PatchEmbedding(
                in_channels,
                patch_size,
                emb_size,
                img_size,
                pos_init=pos_init,
                dynamic_img_size=dynamic_img_size,
                stem_channels=stem_channels,
                stem_strides=stem_strides,
            ),
            TransformerEncoder(depth, emb_size=emb_size, **kwargs),
            ClassificationHead(emb_size, n_classes, pool=pool),
        )
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.dynamic_img_size = dynamic_img_size
        self.n_classes = n_classes

    def attention_modules(self) -> list[MultiHeadAttention]:
        return [m for m in self.modules() if isinstance(m, MultiHeadAttention)]

    def output_layers(self) -> list[nn.Module]:
        """The classifier head: optimizers that treat output layers apart (optim=muon) ask the net, not its classes."""
        return [m for m in self.modules() if isinstance(m, ClassificationHead)]

    def qkv_projections(self) -> list[tuple[nn.Linear, str]]:
        """Each attention's fused q/k/v projection and how its rows hold q, k and v (``MultiHeadAttention.QKV_LAYOUT``)."""
        return [(m.qkv, m.QKV_LAYOUT) for m in self.attention_modules()]

    @torch.no_grad()
    def attention_rollout(self, x: Tensor) -> Tensor:
        """(b, c, H, W) -> (b, n, n) attention rollout (Abnar & Zuidema, 2020, see ``rollout``), n = 1 + patches.

        Every row sums to 1: row i says how much each input token contributes to output token i.
        """
        attention = self.attention_modules()
        for module in attention:
            module.keep_attention = True
        try:
            self(x)
            return rollout([module.last_attention for module in attention])
        finally:
            for module in attention:
                module.keep_attention, module.last_attention = False, None


def rollout(attention: list[Tensor]) -> Tensor:
    """Attention rollout of the layers' attention weights ((b, heads, n, n) each, first layer first) -> (b, n, n).

    Per layer: the heads' attention averaged, the identity added for the residual path,
    rows renormalised; then the layers multiplied in order.
    """
    result = None
    for a in attention:
        a = a.float().mean(dim=1)  # b h q k -> b q k
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result
