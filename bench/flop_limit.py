"""``bench/throughput.py --flops`` and ``--run-dir`` (imported by it, not run): the distance to the limit. This machine's
fp32 matmul peak; per net and training size, the FLOPs of a training step (``vit.flops``) and the images/s of a bare
step; a finished run's whole share of the peak.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from clock import now
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vit import checkpoints
from vit.builders import build_net, instantiate, module_factory
from vit.errors import ConfigError
from vit.flops import count_step_flops
from vit.precision import resolve_precision

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# --flops: the nets timed and counted, by the overrides that make them (the manual's recipe is the config's default).
FLOP_NETS = {"manual": [], "fast": ["experiment=fast"], "budget": ["experiment=budget"], "budget_max": ["experiment=budget_max"]}


def matmul_rates(device: torch.device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """This machine's matmul rate in ``dtype`` at the current torch thread count: ``2 n^3`` over the best time of a
    ``torch.mm`` of two n x n matrices, after one untimed product; in FLOP/s of wall time, and in FLOP per CPU-second of
    this process (``time.process_time``, all its threads: on a CPU shared with other work, the rate while it ran)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.mm(a, b)
    best = best_cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = now(device), time.process_time()
        torch.mm(a, b, out=out)
        best, best_cpu = min(best, now(device) - start), min(best_cpu, time.process_time() - start_cpu)
    return 2 * n**3 / best, 2 * n**3 / max(best_cpu, 1e-9)


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul peak in FLOP/s (``matmul_rates``' wall-clock figure)."""
    return matmul_rates(device, n, repeats)[0]


# A step's dtype: the matmuls' (bf16 under bf16-mixed autocast, fp16 under 16-mixed), whose peak it is measured against.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
STEP_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


def step_dtype(precision: str) -> torch.dtype:
    return STEP_DTYPES.get(str(precision), torch.float32)


def step_autocast(args: argparse.Namespace, cfg: DictConfig) -> tuple[torch.dtype, torch.autocast]:
    """The dtype a net's step runs its matmuls in (``args.precision``, else its config's as resolved for this device),
    and the autocast that runs it so (off for fp32)."""
    dtype = step_dtype(args.precision or resolve_precision(cfg.trainer, say=False))
    return dtype, torch.autocast(args.device.type, dtype=dtype, enabled=dtype != torch.float32)


def compose_net(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config ``python train.py OVERRIDES`` composes (no data is loaded: only its model, optim, module and data sizes are read)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"paths.root_dir={Path.cwd()}", f"paths.output_dir={output_dir}"])


def train_sides(cfg: DictConfig) -> list[int]:
    """The sides a run of ``cfg`` trains at: its ``data.train_sizes``, else the data's own side."""
    return sorted(set(cfg.data.get("train_sizes") or [full_side(cfg)]))


def full_side(cfg: DictConfig) -> int:
    return cfg.data.get("image_size") or cfg.data.get("stored_size") or 32


def num_classes_of(cfg: DictConfig) -> int:
    """The config's class count where it names one, else CIFAR-10's 10 (the head's FLOPs are a sliver of the net's)."""
    return cfg.model.get("n_classes") or cfg.data.get("num_classes") or 10


def build_step(cfg: DictConfig, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The net and its optimizer as a training run builds them: ``optim`` handed to the LightningModule, whose
    ``configure_optimizers`` gives it the parameters (or the net, to MuonAdamW); no scheduler (it costs no FLOPs)."""
    net = build_net({**OmegaConf.to_container(cfg.model, resolve=True), "compile": False}, num_classes_of(cfg), pretrained=False).to(device)
    module = module_factory(cfg.get("module"))(net=net, optimizer=instantiate(cfg.optim, "optim"), scheduler=None, num_classes=num_classes_of(cfg))
    optimizer = module.configure_optimizers()
    return net.train(), optimizer


@dataclass
class FlopRow:
    net: str
    optimizer: str
    size: int
    batch: int
    dtype: torch.dtype  # the matmuls' (``step_dtype`` of the precision the net trains in)
    flops_per_image: float  # forward + backward
    optimizer_flops_per_image: float  # the optimizer step's counted FLOPs over the batch (Muon's Newton-Schulz matmuls)
    images_per_s: float
    cpu_images_per_s: float  # images per CPU-second of this process (all its threads)


def time_flop_row(args: argparse.Namespace, name: str, cfg: DictConfig, size: int) -> FlopRow:
    """One net at one training side: its FLOPs counted on one step, then ``args.steps`` bare steps timed after
    ``args.warmup``, under autocast where the net trains in a mixed precision (``args.precision`` or its config's, as
    resolved for this device)."""
    device, batch = args.device, cfg.data.batch_size
    dtype, autocast = step_autocast(args, cfg)
    L.seed_everything(args.seed, verbose=False)
    net, optimizer = build_step(cfg, device)
    smoothing = (cfg.get("module") or {}).get("label_smoothing", 0.0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes_of(cfg), (batch,), device=device)
    flops, optimizer_flops = count_step_flops(net, x, y, optimizer, smoothing)
    start = start_cpu = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start, start_cpu = now(device), time.process_time()
        optimizer.zero_grad()
        with autocast:
            loss = F.cross_entropy(net(x), y, label_smoothing=smoothing)
        loss.backward()
        optimizer.step()
    rate = batch * args.steps / (now(device) - start)
    cpu_rate = batch * args.steps / max(time.process_time() - start_cpu, 1e-9)
    return FlopRow(name, type(optimizer).__name__, size, batch, dtype, flops / batch, optimizer_flops / batch, rate, cpu_rate)


def print_flop_table(rows: list[FlopRow], peaks: dict[torch.dtype, tuple[float, float | None]]) -> None:
    """Each row against the peak of its own dtype: ``peaks[dtype]`` = (FLOP/s, FLOP per CPU-second or None on a GPU)."""
    header = (
        "net",
        "optimizer",
        "size",
        "batch",
        "dtype",
        "MFLOP/image",
        "opt. MFLOP/image",
        "images/s",
        "GFLOP/s",
        "share of peak",
        "share, CPU time",
    )
    lines = [
        (
            r.net,
            r.optimizer,
            f"{r.size} px",
            str(r.batch),
            DTYPE_NAMES[r.dtype],
            f"{r.flops_per_image / 1e6:,.1f}",
            f"{r.optimizer_flops_per_image / 1e6:,.2f}",
            f"{r.images_per_s:,.0f}",
            f"{r.flops_per_image * r.images_per_s / 1e9:,.1f}",
            f"{100 * r.flops_per_image * r.images_per_s / peaks[r.dtype][0]:.1f}%",
            f"{100 * r.flops_per_image * r.cpu_images_per_s / peaks[r.dtype][1]:.1f}%" if peaks[r.dtype][1] else "-",
        )
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    for cells in [header, tuple("-" * w for w in widths), *lines]:
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def run_config(run_dir: Path) -> DictConfig:
    """The run's config: ``.hydra/config.yaml`` (written by ``python train.py``), else the one its checkpoint stores."""
    if (run_dir / ".hydra" / "config.yaml").is_file():
        return OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    try:
        return OmegaConf.create(checkpoints.load(checkpoints.resolve(run_dir))["hyper_parameters"]["config"])
    except (ConfigError, KeyError) as e:
        raise SystemExit(f"--run-dir {run_dir}: no .hydra/config.yaml and no checkpoint with its config ({e})") from None


def run_share(run_dir: Path, device: torch.device, peak: float) -> dict:
    """A finished run's whole share of the peak: the FLOPs of every epoch it trained (forward + backward per image at that
    epoch's side, times the images of an epoch) over run.json's ``train_time_s``, over ``peak``.

    The images come from run.json (``images_per_s`` x ``train_time_s``: every image trained, spread evenly over the epochs
    of its ``history``); the sides from the run's config (``data.train_sizes``; ``run_config``)."""
    try:
        summary = json.loads((run_dir / "run.json").read_text())
        epochs, seconds = len(summary["history"]), float(summary["train_time_s"])
        images = summary["images_per_s"] * seconds
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"--run-dir {run_dir}: no readable run.json with train_time_s, images_per_s and a history ({e}): give a finished run dir"
        ) from None
    cfg = run_config(run_dir)
    if not epochs or seconds <= 0:
        raise SystemExit(f"--run-dir {run_dir}: run.json has no trained epoch")
    sides = [cfg.data.train_sizes[min(e, len(cfg.data.train_sizes) - 1)] if cfg.data.get("train_sizes") else full_side(cfg) for e in range(epochs)]
    net = build_net({**OmegaConf.to_container(cfg.model, resolve=True), "compile": False}, num_classes_of(cfg), pretrained=False).to(device).train()
    per_image = {}
    for side in sorted(set(sides)):
        x, y = torch.randn(8, 3, side, side, device=device), torch.randint(0, num_classes_of(cfg), (8,), device=device)
        per_image[side] = count_step_flops(net, x, y)[0] / 8
    total = sum(per_image[side] for side in sides) * images / epochs
    return {
        "epochs": epochs,
        "images": images,
        "train_time_s": seconds,
        "sides": {side: sides.count(side) for side in sorted(set(sides))},
        "flops_per_image": per_image,
        "flops": total,
        "flops_per_s": total / seconds,
        "share": total / seconds / peak,
    }
