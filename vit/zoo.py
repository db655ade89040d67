"""Nets beyond the manual's ViT, built by timm: any timm model, and the CIFAR ResNet-18 as the CNN baseline.

They carry what the rest of the project reads from a net (``n_classes``, ``in_channels``, ``img_size``,
None for a net that takes any size), so training, checkpoints, ``test.py``, ``vit.predict`` and the
sweep report treat them like the manual's ViT. Only ``nn.Module``s live here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from vit.errors import ConfigError, first_line
from vit.model import rollout

# timm's attention modules whose fused ``qkv`` Linear the project knows the layout of: both reshape its output to
# (b, n, 3, heads, head_dim), q's rows first. Other attentions (MaxViT's interleaves by head) name none.
QKV_LAYOUTS = {Attention: "(qkv h d)", WindowAttention: "(qkv h d)"}
# Output layers by name besides get_classifier()'s: ViT's and DeiT's head, DeiT's head_dist, the whole ClassifierHead of
# Swin and the CNNs (its pre-logits layers too).
HEAD_NAMES = ("head", "head_dist")


class TimmNet(nn.Module):
    """``timm.create_model(name, num_classes=n_classes, ...)`` behind the project's net interface.

    ``img_size`` and ``patch_size`` go to models that take them (timm's ViTs: ``img_size=32, patch_size=4``
    suits CIFAR); for a model that takes any image size (a CNN) ``img_size`` must stay null.
    ``pretrained`` loads timm's weights (downloaded on first use), ``pretrained_file`` a local weights
    file (a state_dict as ``.pth``/``.bin``/``.safetensors``, as timm saves it); either way the
    classifier head is new, for the data's classes. ``kwargs``: any other argument of the timm model.
    """

    def __init__(
        self,
        name: str,
        n_classes: int = 1000,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_channels: int = 3,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        kwargs: dict[str, Any] | None = None,
    ):
        if not timm.is_model(name):
            raise ConfigError(
                f"model.name={name} is not a timm model: pick one of timm.list_models(), e.g. vit_tiny_patch16_224, resnet18, convnext_atto"
            )
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ConfigError(f"model.n_classes must be a positive integer, got {n_classes!r}")
        super().__init__()
        default = timm.get_pretrained_cfg(name)
        fixed_size = bool(default is not None and default.fixed_input_size)
        options = {**dict(kwargs or {}), "num_classes": n_classes, "in_chans": in_channels}
        if img_size is not None:
            if not fixed_size:
                raise ConfigError(f"model.name={name} takes images of any size: leave out model.img_size (data.image_size resizes)")
            options["img_size"] = img_size
        if patch_size is not None:
            options["patch_size"] = patch_size
        if pretrained_file:
            if not Path(pretrained_file).is_file():
                raise ConfigError(f"model.pretrained_file={pretrained_file} does not exist: give a weights file saved from a timm {name}")
            options.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
        elif pretrained:
            options["pretrained"] = True
        self.model = self._create(name, options, pretrained_file)
        if options.get("pretrained"):
            self.model.reset_classifier(n_classes)  # a new head for the data's classes, whatever the file held
        self.name = name
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.img_size = (img_size or default.input_size[-1]) if fixed_size else None
        blocks = getattr(self.model, "blocks", None)
        self.has_attention = blocks is not None and all(hasattr(getattr(b, "attn", None), "fused_attn") for b in blocks)

    @staticmethod
    def _create(name: str, options: dict[str, Any], pretrained_file: str | None) -> nn.Module:
        try:
            return timm.create_model(name, **options)
        except TypeError as e:
            raise ConfigError(f"model.name={name} does not take these arguments: {first_line(e)}") from None
        except (OSError, RuntimeError) as e:
            if pretrained_file:
                raise ConfigError(f"model.pretrained_file={pretrained_file} does not fit model.name={name}: {first_line(e)}") from None
            if options.get("pretrained"):
                raise ConfigError(
                    f"model.pretrained=true: timm could not fetch the weights of {name} ({first_line(e)[:120]}): "
                    "offline, give a local weights file with model.pretrained_file=PATH"
                ) from None
            raise

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def output_layers(self) -> list[nn.Module]:
        """The classifier: what timm's ``get_classifier()`` returns (a Linear, a 1x1 conv as DLA's, DeiT's head and
        head_dist) and every module named ``head`` or ``head_dist``; optim=muon keeps them with AdamW."""
        found = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        heads = [m for m in (found if isinstance(found, (tuple, list)) else [found]) if isinstance(m, nn.Module)]
        return heads + [m for name, m in self.model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES]

    def qkv_projections(self) -> list[tuple[nn.Linear, str]]:
        """Each fused q/k/v projection of an attention in ``QKV_LAYOUTS``, with its layout; none for a CNN."""
        return [
            (m.qkv, QKV_LAYOUTS[type(m)]) for m in self.model.modules() if type(m) in QKV_LAYOUTS and isinstance(getattr(m, "qkv", None), nn.Linear)
        ]

    @property
    def dynamic_img_size(self) -> bool:
        """Whether a fixed-size model takes other sizes too (timm's ViTs with ``dynamic_img_size=True`` in ``model.kwargs``)."""
        return bool(getattr(self.model, "dynamic_img_size", False))

    @property
    def num_prefix_tokens(self) -> int:
        return getattr(self.model, "num_prefix_tokens", 1)

    @property
    def global_pool(self) -> str:
        return getattr(self.model, "global_pool", "token")

    @torch.no_grad()
    def attention_rollout(self, x: Tensor) -> Tensor:
        """(b, c, H, W) -> (b, n, n) attention rollout, as ``vit.model.ViT.attention_rollout``, for timm's ViTs.

        The attention weights are taken where timm's unfused attention passes them through ``attn_drop``.
        """
        if not self.has_attention:
            raise ConfigError(f"model.name={self.name} has no attention maps: leave out attention=true")
        attention = [block.attn for block in self.model.blocks]
        maps: list[Tensor] = []
        hooks = [a.attn_drop.register_forward_hook(lambda m, i, out: maps.append(out.detach())) for a in attention]
        fused = [a.fused_attn for a in attention]
        for a in attention:
            a.fused_attn = False
        try:
            self(x)
        finally:
            for a, f, hook in zip(attention, fused, hooks):
                a.fused_attn = f
                hook.remove()
        return rollout(maps)


class ResNet18CIFAR(TimmNet):
    """timm's ResNet-18 with the stem CIFAR papers use on 32x32 images: one 3x3 stride-1 convolution and no
    max-pool (the ImageNet stem, 7x7 stride 2 and a max-pool, leaves 8x8 features after it). 11,173,962
    parameters with 10 classes; takes images of any size."""

    def __init__(self, n_classes: int = 10, in_channels: int = 3):
        super().__init__("resnet18", n_classes=n_classes, in_channels=in_channels)
        self.model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.model.maxpool = nn.Identity()
