"""FLOPs of a training step, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls, convolutions and
attention; elementwise work is not counted), with the CPU's fused attention counted too: ``bench/throughput.py
--flops`` sets them against this machine's peak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def attention_formulas() -> dict:
    """FLOP formulas for the CPU's fused attention kernel, which ``FlopCounterMode`` does not count by itself (torch 2.x
    counts the CUDA kernels only): ``F.scaled_dot_product_attention`` on a CPU would otherwise count as 0 FLOPs."""
    ops = (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops),
    )
    return {getattr(torch.ops.aten, name): formula for name, formula in ops if hasattr(torch.ops.aten, name)}


def count_step_flops(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer | None = None, label_smoothing: float = 0.0
) -> tuple[int, int]:
    """FLOPs of one training step on the batch ``x``: (forward + backward, the optimizer step), as ``FlopCounterMode``
    counts them (matmuls, convolutions, attention; not elementwise work). The optimizer step is taken (the weights change)."""
    if optimizer is not None:
        optimizer.zero_grad()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=attention_formulas()) as counter:
        F.cross_entropy(net(x), y, label_smoothing=label_smoothing).backward()
    if optimizer is None:
        return counter.get_total_flops(), 0
    with flop_counter.FlopCounterMode(display=False, custom_mapping=attention_formulas()) as step_counter:
        optimizer.step()
    return counter.get_total_flops(), step_counter.get_total_flops()
