"""This machine as results record it: its CPU's model name and the cores this process may use."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name (``AMD EPYC ...``), which a recorded time is only comparable with."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def core_count() -> int:
    """The cores this process may run on (its affinity), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
