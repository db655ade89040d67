"""Which precision a run trains in when ``trainer.precision`` is null: the manual's mixed precision, as the device can do it.

The manual trains under ``autocast`` with a ``GradScaler``, which on a CPU silently runs fp32. Here null means: 16-mixed
on a CUDA GPU; bf16-mixed on a CPU with native bf16 instructions (avx512_bf16 or AMX), where bf16 matmuls run 2-4x as
fast as fp32 ones, once a quick check has found this CPU's bf16 results right (some CPUs have returned wrong ones); fp32
elsewhere. The run's log says which and why, and run.json records it (``precision``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.errors import ConfigError

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of x86 CPUs that compute bf16 dot products natively (AVX512-BF16; AMX tiles).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def native_bf16(flags: set[str] | None = None) -> str | None:
    """The flag that says this CPU computes bf16 natively, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


@functools.cache
def bf16_is_right() -> bool:
    """Whether this CPU's bf16 autocast gives what fp32 gives, within bf16's rounding: a linear layer, a batched matmul
    and a softmax (the ops a ViT's step is made of) on fixed random inputs, against the same in fp64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 65, 64, generator=generator, dtype=torch.float64)
    w = torch.randn(256, 64, generator=generator, dtype=torch.float64) / 8
    reference = torch.softmax(torch.einsum("bqe, bke -> bqk", (x @ w.T)[..., :64], x) / 8, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x.float(), w.float())
        got = torch.softmax(torch.einsum("bqe, bke -> bqk", h[..., :64], x.float()) / 8, dim=-1)
    error = (got.double() - reference).abs().max().item()
    return got.dtype in (torch.bfloat16, torch.float32) and error < 0.05 and bool(torch.isfinite(got).all())


def cpu_default(flags: set[str] | None = None) -> tuple[str, str]:
    """(precision, why) for a CPU run with ``trainer.precision`` null."""
    flag = native_bf16(flags)
    if flag is None:
        return "32-true", "this CPU has no native bf16 (avx512_bf16 or AMX)"
    if not bf16_is_right():
        return "32-true", f"this CPU has {flag}, but its bf16 results failed the check against fp64 (vit.precision.bf16_is_right)"
    return "bf16-mixed", f"this CPU has {flag} and its bf16 results check out"


def on_cuda(trainer_cfg: Any) -> bool:
    return torch.cuda.is_available() and trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")


def resolve_precision(trainer_cfg: Any, say: bool = True) -> str | int:
    """An explicit ``trainer.precision`` wins; null: 16-mixed on a CUDA GPU, else ``cpu_default`` (said in the log
    where ``say``)."""
    if trainer_cfg.get("precision") is not None:
        return trainer_cfg.get("precision")
    if on_cuda(trainer_cfg):
        return "16-mixed"
    precision, why = cpu_default()
    if say:
        log.info("No CUDA GPU: training in %s precision (%s; set trainer.precision=32-true or bf16-mixed to choose)", precision, why)
    return precision


def stride_past_input(net: nn.Module, shapes: Sequence[Sequence[int]]) -> str | None:
    """The first convolution of ``net`` wider than 1 whose stride exceeds its input's extent along an axis, for an input
    of one of ``shapes`` (c, h, w), as "NAME (stride S on a HxW input at side N)"; None if none does.

    There torch's CPU bf16 convolution computes wrong weight gradients: a 3x3 stride-2 convolution on a 1x1 input gave
    non-finite or wrong ones in 20 of 20 calls on a 2-core AMD EPYC (avx512_bf16, torch 2.14.1), and a timm ResNet at
    16 px diverged at its second step; 1x1 kernels and every stride within its input agreed with fp32
    (``python bench/bf16_convs.py``, docs/measurements.md). One forward pass per shape, batch of 1, in eval mode, no grad.
    """
    convs = {module: name for name, module in net.named_modules() if isinstance(module, nn.modules.conv._ConvNd)}
    found: list[str] = []

    def look(side: int):
        def hook(module: nn.Module, args: tuple) -> None:
            extent = args[0].shape[2:]
            if not found and any(k > 1 and stride > size for k, stride, size in zip(module.kernel_size, module.stride, extent)):
                found.append(
                    f"{convs[module] or 'the net'} (stride {'x'.join(map(str, module.stride))} on a {'x'.join(map(str, extent))} input at side {side})"
                )

        return hook

    was_training = net.training
    net.eval()
    try:
        for shape in shapes:
            handles = [conv.register_forward_pre_hook(look(shape[-1])) for conv in convs]
            try:
                with torch.no_grad():
                    net(torch.zeros(1, *shape, device=next(net.parameters()).device))
            finally:
                for handle in handles:
                    handle.remove()
            if found:
                return found[0]
    finally:
        net.train(was_training)
    return None


def settle_for_net(trainer_cfg: Any, net: nn.Module, shapes: Sequence[Sequence[int]]) -> str | None:
    """Why this run must train in fp32 rather than the bf16 chosen for this CPU (``stride_past_input``), or None.
    Asked for by name (``trainer.precision=bf16-mixed``), the run is refused in one line instead."""
    if on_cuda(trainer_cfg) or "bf16" not in str(resolve_precision(trainer_cfg, say=False)):
        return None
    where = stride_past_input(net, shapes)
    if where is None:
        return None
    why = f"torch's CPU bf16 convolution computes wrong weight gradients where a stride exceeds its input: {where}"
    if trainer_cfg.get("precision") is not None:
        raise ConfigError(
            f"trainer.precision={trainer_cfg.get('precision')}: {why}; set trainer.precision=32-true, or train at larger sides (data.train_sizes)"
        )
    return why
