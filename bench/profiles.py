"""Where a training step's time goes, for ``bench/throughput.py`` (imported by it, not run): ``--ops N``, the top ops of
a variant's timed steps; ``--profile NET``, one step of a ``--flops`` net by phase (forward, backward, optimizer) and op.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from flop_limit import DTYPE_NAMES, FLOP_NETS, build_step, compose_net, num_classes_of, step_autocast, train_sides


class OpsProfile:
    """``--ops N``: torch.profiler over the timed steps of a variant, then its top N ops by self CPU time per step."""

    def __init__(self, args: argparse.Namespace, what: str, steps: int):
        self.top, self.what, self.steps, self.prof = args.ops, what, steps, None

    def start(self) -> None:
        if self.top:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def stop(self) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        ops: dict[str, float] = {}
        for event in self.prof.events():
            ops[event.name] = ops.get(event.name, 0.0) + event.self_cpu_time_total
        total = sum(ops.values())
        print(f"\nprofile: {self.what}, {total / self.steps / 1e3:.0f} ms of CPU time per step (all ops, self time), under the profiler")
        for name, t in sorted(ops.items(), key=lambda kv: -kv[1])[: self.top]:
            print(f"  {t / self.steps / 1e3:8.1f} ms  {100 * t / total:5.1f}%  {name}")
        self.prof = None


def profile_step(args: argparse.Namespace, name: str, steps: int = 3, top: int = 15) -> None:
    """Where one training step of ``name`` at its largest side spends its time: torch.profiler over ``steps`` steps (after
    two untimed ones), the phases (forward, backward, optimizer) and the ops by self CPU time, each op under its phase."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cfg = compose_net(FLOP_NETS[name], args.tmp / f"profile-{name}")
    device, batch, side = args.device, cfg.data.batch_size, train_sides(cfg)[-1]
    L.seed_everything(args.seed, verbose=False)
    net, optimizer = build_step(cfg, device)
    smoothing = (cfg.get("module") or {}).get("label_smoothing", 0.0)
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, num_classes_of(cfg), (batch,), device=device)
    dtype, autocast = step_autocast(args, cfg)  # as the --flops rows: the net's own precision

    def step() -> None:
        with record_function("phase:optimizer"):
            optimizer.zero_grad()
        with record_function("phase:forward"), autocast:
            loss = F.cross_entropy(net(x), y, label_smoothing=smoothing)
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            optimizer.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    phases: dict[str, float] = {}
    ops: dict[tuple[str, str], float] = {}
    for event in prof.events():
        parent, phase = event, "other"
        while parent is not None:
            if parent.name.startswith("phase:"):
                phase = parent.name.removeprefix("phase:")
                break
            parent = parent.cpu_parent
        if event.name.startswith("phase:"):
            phases[phase] = phases.get(phase, 0.0) + event.cpu_time_total
        else:
            ops[(phase, event.name)] = ops.get((phase, event.name), 0.0) + event.self_cpu_time_total
    total = sum(phases.values())
    print(
        f"\nprofile: {name} ({type(optimizer).__name__}), {side} px, batch {batch}, {DTYPE_NAMES[dtype]}, {steps} steps: {total / steps / 1e3:.0f} ms per step"
    )
    print("  " + ", ".join(f"{phase} {100 * t / total:.0f}%" for phase, t in sorted(phases.items(), key=lambda kv: -kv[1])))
    print(f"  top {top} ops by self CPU time (ms per step, share of the step):")
    for (phase, op), t in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t / steps / 1e3:8.1f} ms  {100 * t / total:5.1f}%  {phase:9s} {op}")
