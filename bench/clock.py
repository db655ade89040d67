"""The clock and the device for bench/'s scripts (imported by them, not run): a clock read after the device's queued
work, peak memory, the device's name as the tables print it.
"""

from __future__ import annotations

import resource
import time

import torch

from vit.machine import cpu_name


def now(device: torch.device) -> float:
    """A clock read after the device has finished its queued work, so asynchronous CUDA steps are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """CUDA: peak allocated by this variant. CPU: the process's peak RSS so far (getrusage cannot be reset)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB RSS"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


def steps_per_s(start: float | None, end: float | None, steps: int, what: str) -> float:
    if start is None or end is None:
        raise RuntimeError(f"{what} stopped before its timed steps ended: lower --warmup/--steps")
    return steps / (end - start)
