"""Training throughput: this project's Lightning run against the course manual's loop and a bare step.

Why: the project replaces the manual's per-image PIL pipeline and hand-written loop with an in-memory
uint8 data set, batched preprocessing on the device and ``lightning.Trainer.fit``. This script shows
what that buys, and what Lightning and the data path still cost, by timing in one process, one after
the other and from the same seed:

- bare step: the same net and Adam on one pre-made batch already on the device, no Lightning and no
  DataLoader, in the precision ``ours`` trains in; the ceiling for ``ours`` at the same batch size;
- reference: the manual's code as printed, ``vit.manual`` (its classes, torchvision data set with its PIL
  transform, ``DataLoader(batch_size=32, shuffle=True, num_workers=2)``, Adam 1e-3, ``CrossEntropyLoss``,
  ``running_loss += loss.item()``; fp16 autocast and a GradScaler on CUDA, which on a CPU run fp32), at its
  batch 32 and at the larger batch;
- ours: the DataModule, net, LightningModule and Trainer built from the project's Hydra config the
  way ``python train.py`` builds them (TensorBoard logger, progress bar and the default callbacks
  included, into a temporary directory), with checkpoint files and validation off; in the precision
  ``trainer.precision=null`` picks for the device (``vit.precision``: bf16-mixed on a CPU with native bf16)
  or ``--precision``, with the attention kernel the rule picks for it (``vit.model.sdpa_is_faster``);
- ours with ``model.compile=true`` (``torch.compile``), at the manual's batch and at a larger one
  (``model.compile=auto``, the default, compiles long CPU runs in bf16: ``vit.builders.compile_pays``);
- ours at best settings: a larger batch.

Each variant is timed ``--rounds`` times, the rounds interleaved, and the table gives the median and the spread: on a
shared 2-core machine one timing can be 20% off. ``--ops N`` then profiles bare and ours once more and prints where
their steps go.

Only steady-state steps are timed: the clock is read at the start of step ``warmup`` and of step
``warmup + steps``, so start-up, worker spawn, allocator growth and compilation are left out (the
warm-up column shows what they took). Figures are printed, never asserted.

    python bench/throughput.py --device cpu --steps 100 --warmup 10 --data folder --best-batch 64 --skip compile --ops 12

``--flops``, the distance to the limit, instead: for the manual's net (Adam, batch 32) and the ``fast`` (AdamW) and
``budget`` (MuonAdamW) nets at each of their training sizes (their batch, 128), the FLOPs of one training step per image
(forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention;
elementwise work is not counted), the images/s of a bare training step (net, loss, backward, the preset's optimizer built
as the project builds it, on one premade batch, fp32), their product in GFLOP/s, and that as a share of this machine's
fp32 matmul peak measured in the same run (a 2048x2048 ``torch.mm``, best of a few, at the same thread count).
``--run-dir`` gives a finished run's whole share instead: the FLOPs of all its epochs (each at its training size) over
its training time (run.json's ``train_time_s``: the training batches, data preparation included). ``--profile NET``
adds where one training step of NET at its largest size spends its time (torch.profiler, by self CPU time).

    python bench/throughput.py --flops --threads 2 --steps 20 --warmup 5
    python bench/throughput.py --flops --nets budget --profile budget --run-dir outputs/budget/seed42
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils import flop_counter

from vit import checkpoints, manual
from vit.builders import build_callbacks, build_net, build_trainer, instantiate, module_factory
from vit.errors import ConfigError
from vit.machine import cpu_name
from vit.precision import resolve_precision
from vit.run import build_for_fit

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
VARIANTS = ("bare", "reference", "ours", "best", "compile")
# --flops: the nets timed and counted, by the overrides that make them (the manual's recipe is the config's default).
FLOP_NETS = {"manual": [], "fast": ["experiment=fast"], "budget": ["experiment=budget"]}


@dataclass
class Row:
    """One variant's figures; ``images_per_s`` is None when it could not run (``note`` says why)."""

    variant: str
    batch: int
    images_per_s: float | None
    warmup_s: float | None
    peak_mem: str
    note: str = ""
    spread: str = ""  # min-max of images/s over the rounds


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


class Stopwatch(L.Callback):
    """Reads the clock at the start of batch ``warmup`` and of batch ``warmup + steps`` (one epoch, so batch_idx counts steps).

    ``on_train_batch_start`` runs after the batch was fetched, moved and preprocessed, so the interval
    covers exactly ``steps`` whole iterations of Lightning's loop.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device, ops: OpsProfile | None = None):
        self.warmup, self.steps, self.device, self.ops = warmup, steps, device, ops
        self.fit_start: float | None = None
        self.start: float | None = None
        self.end: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start = now(self.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = now(self.device)
            if self.ops:
                self.ops.start()
        elif batch_idx == self.warmup + self.steps:
            self.end = now(self.device)
            if self.ops:
                self.ops.stop()


def compose_run(args: argparse.Namespace, output_dir: Path, overrides: list[str]) -> DictConfig:
    """The config ``python train.py`` would compose for a timed run: ``overrides`` on top of the data, seed and
    device of ``args``. As a user runs it (progress bar, the default callbacks with their per-step work), but
    without checkpoint files, whose writing is disk time, and without the final test."""
    shared = [
        f"data={args.data}",
        f"seed={args.seed}",
        f"trainer.accelerator={'gpu' if args.device.type == 'cuda' else 'cpu'}",
        "+trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint",
        "test=false",
        # The run dir and the project root, which hydra.main would fill in.
        f"paths.root_dir={Path.cwd()}",
        f"paths.output_dir={output_dir}",
    ]
    if args.data == "folder":
        shared.append(f"data.root={args.root}")
    if args.precision is not None:
        shared.append(f"trainer.precision={args.precision}")
    if args.data_dir is not None:
        shared.append(f"paths.data_dir={args.data_dir.resolve()}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*shared, *overrides])


def compose_config(args: argparse.Namespace, batch: int, n_batches: int, output_dir: Path) -> DictConfig:
    """The config for ``n_batches`` training batches and nothing else."""
    overrides = [
        f"data.batch_size={batch}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={n_batches}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
    ]
    if args.data == "fake":  # one epoch must hold every step; 200 images are held out for validation by data/fake.yaml
        overrides.append(f"data.train_size={200 + n_batches * batch}")
    return compose_run(args, output_dir, overrides)


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


def run_bare(args: argparse.Namespace, batch: int) -> Row:
    """The ceiling: the project's net and optimizer on one random batch already on the device."""
    device = args.device
    cfg = compose_config(args, batch, 1, args.tmp / "bare")
    L.seed_everything(args.seed, verbose=False)
    net = build_net(cfg.model, 10).to(device)
    optimizer = instantiate(cfg.optim, "optim")(params=net.parameters())
    precision = str(resolve_precision(cfg.trainer))  # what ``ours`` trains in: the bare step runs the same
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net.train()
    reset_peak_memory(device)
    begin = now(device)
    start = end = None
    ops = OpsProfile(args, f"bare step, batch {batch}, {precision}", timed_steps(args, batch))
    for i in range(args.warmup + timed_steps(args, batch) + 1):
        if i == args.warmup:
            start = now(device)
            ops.start()
        if i == args.warmup + timed_steps(args, batch):
            end = now(device)
            ops.stop()
            break
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    rate = batch * steps_per_s(start, end, timed_steps(args, batch), "bare step")
    return Row("bare step", batch, rate, start - begin, peak_memory(device))


def run_reference(args: argparse.Namespace, batch: int) -> Row:
    """The course manual's training loop as printed (``vit.manual``), on the same images (or torchvision's FakeData)."""
    device = args.device
    L.seed_everything(args.seed, verbose=False)
    n_batches = args.warmup + timed_steps(args, batch) + 1
    train_set, test_set = manual.datasets(args.root if args.data == "folder" else None, fake_sizes=(n_batches * batch, batch))
    recipe = manual.Recipe.set_up(train_set, test_set, device, batch_size=batch)
    reset_peak_memory(device)
    begin = now(device)
    start, end = recipe.time_slice(args.warmup, timed_steps(args, batch), lambda: now(device)) or (None, None)
    rate = batch * steps_per_s(start, end, timed_steps(args, batch), "reference")
    return Row("reference (manual's loop)", batch, rate, start - begin, peak_memory(device))


def run_ours(args: argparse.Namespace, batch: int, compiled: bool = False) -> Row:
    """The project's DataModule, net and LightningModule through ``Trainer.fit``, built as ``vit.run.train`` builds them."""
    device = args.device
    steps = timed_steps(args, batch)
    n_batches = args.warmup + steps + 1
    name = "ours, torch.compile" if compiled else "ours"
    cfg = compose_config(args, batch, n_batches, args.tmp / f"ours-{batch}{'-compiled' if compiled else ''}")
    cfg.model.compile = compiled  # the project's own option: model.compile=true
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, _, module = build_for_fit(cfg)
    if len(datamodule.train_dataloader()) < n_batches:
        raise SystemExit(f"{name}: one epoch has fewer than {n_batches} batches of {batch}: lower --warmup/--steps/--best-steps")
    stopwatch = Stopwatch(args.warmup, steps, device, OpsProfile(args, f"{name}, batch {batch}, {build_trainer_precision(cfg)}", steps))
    trainer = build_trainer(cfg, [*build_callbacks(cfg), stopwatch])
    reset_peak_memory(device)
    if not compiled:
        trainer.fit(module, datamodule=datamodule)
    else:
        try:
            trainer.fit(module, datamodule=datamodule)
        except Exception as e:  # noqa: BLE001 - any compiler failure means the same here: no compiled figure
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
            return Row(name, batch, None, None, peak_memory(device), f"n/a ({type(e).__name__}: {reason})")
    rate = batch * steps_per_s(stopwatch.start, stopwatch.end, steps, name)
    return Row(name, batch, rate, stopwatch.start - stopwatch.fit_start, peak_memory(device))


def build_trainer_precision(cfg: DictConfig) -> str:
    return str(resolve_precision(cfg.trainer, say=False))


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per variant and batch, in first-run order: the median images/s over the rounds, and their spread."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.variant, r.batch), []).append(r)
    merged = []
    for (variant, batch), group in groups.items():
        rates = sorted(r.images_per_s for r in group if r.images_per_s)
        warmups = sorted(r.warmup_s for r in group if r.warmup_s is not None)
        rate = statistics.median(rates) if rates else None
        spread = f"{rates[0]:,.0f}-{rates[-1]:,.0f} ({len(rates)})" if len(rates) > 1 else ""
        warmup = statistics.median(warmups) if warmups else None
        merged.append(Row(variant, batch, rate, warmup, group[-1].peak_mem, group[-1].note, spread))
    return merged


def print_table(rows: list[Row]) -> None:
    """variant | batch | images/s (median of the rounds) | spread | vs the manual's loop at its batch 32 (``--batch``) | vs the
    manual's loop at the same batch | vs bare step (same batch) | peak mem | warm-up | note."""
    references = {r.batch: r.images_per_s for r in rows if r.variant.startswith("reference")}
    reference = next(iter(references.values()), None)
    bare = {r.batch: r.images_per_s for r in rows if r.variant == "bare step"}

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}x" if value and base else "-"

    header = (
        "variant",
        "batch",
        "images/s",
        "spread (rounds)",
        "vs manual's loop",
        "vs manual, same batch",
        "vs bare step",
        "peak mem",
        "warm-up",
        "note",
    )
    lines = [
        (
            r.variant,
            str(r.batch),
            f"{r.images_per_s:,.0f}" if r.images_per_s else "n/a",
            r.spread,
            ratio(r.images_per_s, reference),
            ratio(r.images_per_s, references.get(r.batch)),
            ratio(r.images_per_s, bare.get(r.batch)),
            r.peak_mem,
            f"{r.warmup_s:.1f} s" if r.warmup_s is not None else "-",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    for cells in [header, tuple("-" * w for w in widths), *lines]:
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


# --- --flops: the distance to the limit -------------------------------------------------------------------------------


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


def matmul_rates(device: torch.device, n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """This machine's fp32 matmul rate at the current torch thread count: ``2 n^3`` over the best time of a ``torch.mm`` of
    two n x n fp32 matrices, after one untimed product; in FLOP/s of wall time, and in FLOP per CPU-second of this process
    (``time.process_time``, all its threads: on a CPU shared with other work, the rate while it ran)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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
    flops_per_image: float  # forward + backward
    optimizer_flops_per_image: float  # the optimizer step's counted FLOPs over the batch (Muon's Newton-Schulz matmuls)
    images_per_s: float
    cpu_images_per_s: float  # images per CPU-second of this process (all its threads)


def time_flop_row(args: argparse.Namespace, name: str, cfg: DictConfig, size: int) -> FlopRow:
    """One net at one training side: its FLOPs counted on one step, then ``args.steps`` bare steps timed after ``args.warmup``."""
    device, batch = args.device, cfg.data.batch_size
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
        F.cross_entropy(net(x), y, label_smoothing=smoothing).backward()
        optimizer.step()
    rate = batch * args.steps / (now(device) - start)
    cpu_rate = batch * args.steps / max(time.process_time() - start_cpu, 1e-9)
    return FlopRow(name, type(optimizer).__name__, size, batch, flops / batch, optimizer_flops / batch, rate, cpu_rate)


def print_flop_table(rows: list[FlopRow], peak: float, cpu_peak: float | None) -> None:
    """``cpu_peak``: the peak in FLOP per CPU-second, for the last column (None: no such column, on a GPU)."""
    header = ("net", "optimizer", "size", "batch", "MFLOP/image", "opt. MFLOP/image", "images/s", "GFLOP/s", "share of peak", "share, CPU time")
    lines = [
        (
            r.net,
            r.optimizer,
            f"{r.size} px",
            str(r.batch),
            f"{r.flops_per_image / 1e6:,.1f}",
            f"{r.optimizer_flops_per_image / 1e6:,.2f}",
            f"{r.images_per_s:,.0f}",
            f"{r.flops_per_image * r.images_per_s / 1e9:,.1f}",
            f"{100 * r.flops_per_image * r.images_per_s / peak:.1f}%",
            f"{100 * r.flops_per_image * r.cpu_images_per_s / cpu_peak:.1f}%" if cpu_peak else "-",
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

    def step() -> None:
        with record_function("phase:optimizer"):
            optimizer.zero_grad()
        with record_function("phase:forward"):
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
    print(f"\nprofile: {name} ({type(optimizer).__name__}), {side} px, batch {batch}, {steps} steps: {total / steps / 1e3:.0f} ms per step")
    print("  " + ", ".join(f"{phase} {100 * t / total:.0f}%" for phase, t in sorted(phases.items(), key=lambda kv: -kv[1])))
    print(f"  top {top} ops by self CPU time (ms per step, share of the step):")
    for (phase, op), t in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t / steps / 1e3:8.1f} ms  {100 * t / total:5.1f}%  {phase:9s} {op}")


def run_flops(args: argparse.Namespace) -> None:
    """--flops, --run-dir, --profile: the peak, the table of nets and sizes, the runs' shares, the profile."""
    began = time.perf_counter()
    print(f"device: {device_name(args.device)}; fp32; torch {torch.__version__}", flush=True)
    peaks = [matmul_rates(args.device)]
    print(f"peak: fp32 torch.mm 2048x2048, best of 5: {peaks[0][0] / 1e9:,.1f} GFLOP/s ({torch.get_num_threads()} torch threads)", flush=True)
    with tempfile.TemporaryDirectory(prefix="vit-flops-") as tmp:
        args.tmp = Path(tmp)
        rows = []
        if args.flops:
            print(f"bare training steps: {args.warmup} warm-up, {args.steps} timed, on one premade batch; seed {args.seed}", flush=True)
            for name in args.nets:
                cfg = compose_net(FLOP_NETS[name], args.tmp / name)
                for side in train_sides(cfg):
                    rows.append(time_flop_row(args, name, cfg, side))
                    r = rows[-1]
                    print(f"  done: {name}, {side} px: {r.flops_per_image / 1e6:,.1f} MFLOP/image at {r.images_per_s:,.0f} images/s", flush=True)
            peaks.append(matmul_rates(args.device))
        peak, cpu_peak = max(p for p, _ in peaks), max(c for _, c in peaks) if args.device.type == "cpu" else None
        if rows:
            print()
            print_flop_table(rows, peak, cpu_peak)
            print(
                f"peak: {peak / 1e9:,.1f} GFLOP/s, fp32 torch.mm 2048x2048, best of 5 ({' and '.join(f'{p / 1e9:,.1f}' for p, _ in peaks)} before and "
                f"after the table), {device_name(args.device)}"
                + (f"; {cpu_peak / 1e9:,.1f} GFLOP per CPU-second of this process" if cpu_peak else "")
            )
            print(
                "MFLOP/image: forward + backward of one training step over its batch, by FlopCounterMode (matmuls, convolutions, attention); "
                "GFLOP/s and the shares use it alone. opt. MFLOP/image: the optimizer step's counted FLOPs over the batch (Muon's "
                "Newton-Schulz matmuls; Adam's elementwise work counts 0). share, CPU time: the same ratio in CPU-seconds of this process "
                "(step and peak alike), which other work on the machine slows less than the wall clock."
            )
        for run_dir in args.run_dir:
            share = run_share(run_dir, args.device, peak)
            sides = "; ".join(f"{n} at {side} px, {share['flops_per_image'][side] / 1e6:,.1f} MFLOP/image" for side, n in share["sides"].items())
            print(
                f"\nrun {run_dir}: {share['epochs']} epochs ({sides}), {share['images']:,.0f} images in {share['train_time_s']:,.1f} s of training "
                f"(run.json's train_time_s): {share['flops'] / 1e12:,.2f} TFLOP, {share['flops_per_s'] / 1e9:,.1f} GFLOP/s, "
                f"{100 * share['share']:.1f}% of the peak above (measured now, here: the run may have trained on another machine, or beside other work)"
            )
        for name in args.profile:
            profile_step(args, name)
    print(f"\nTotal wall time: {time.perf_counter() - began:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant at --batch (default 100; with --flops, per row: 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before the clock starts (default 10; with --flops: 5)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of reference, ours and bare step (default 32, the manual's)")
    parser.add_argument("--best-batch", type=int, default=256, help="batch size of the best-settings rows (default 256)")
    parser.add_argument(
        "--best-steps", type=int, default=None, help="timed steps at --best-batch (default: as many images as --steps at --batch, at least 10)"
    )
    parser.add_argument("--data", choices=("folder", "fake"), default="folder", help="folder: the ImageFolder tree at --root; fake: synthetic")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("../shared/data/cifar10-jpeg"),
        help="ImageFolder tree, relative to the cwd (default ../shared/data/cifar10-jpeg)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="paths.data_dir, where data=folder caches decoded images (default: the config's, data/ in the cwd)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--precision",
        default=None,
        help="trainer.precision of ours and the bare step (default: the config's null, chosen for the device: vit/precision.py)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's); on a shared CPU, fewer threads than free cores avoids OpenMP stalls",
    )
    parser.add_argument("--skip", nargs="+", choices=VARIANTS, default=[], help="variants to leave out")
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each variant is timed, interleaved with the others; the table gives medians (default 3)"
    )
    parser.add_argument("--ops", type=int, default=0, help="after the rounds, profile bare and ours once each and print their top N ops")
    flops = parser.add_argument_group("the distance to the limit (instead of the variants; no data is read)")
    flops.add_argument(
        "--flops",
        action="store_true",
        help="per net and training size: FLOPs per image, images/s of a bare fp32 step, GFLOP/s and the share of this machine's fp32 matmul peak",
    )
    flops.add_argument("--nets", nargs="+", choices=tuple(FLOP_NETS), default=list(FLOP_NETS), help="nets of --flops (default: all)")
    flops.add_argument(
        "--run-dir", nargs="+", type=Path, default=[], help="finished run dirs (their run.json and config): each one's whole share of the peak"
    )
    flops.add_argument(
        "--profile", nargs="+", choices=tuple(FLOP_NETS), default=[], help="profile a training step of these nets at their largest size"
    )
    args = parser.parse_args()
    flop_mode = args.flops or bool(args.run_dir) or bool(args.profile)
    args.steps = args.steps if args.steps is not None else 20 if flop_mode else 100
    args.warmup = args.warmup if args.warmup is not None else 5 if flop_mode else 10
    if min(args.steps, args.batch, args.best_batch, args.rounds) < 1 or args.warmup < 0 or (args.best_steps is not None and args.best_steps < 1):
        parser.error("--steps, --batch, --best-batch, --best-steps, --rounds must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    args.root = args.root.resolve()
    if args.data == "folder" and not flop_mode and not (args.root / "train").is_dir():
        parser.error(f"--root {args.root} has no train/ folder: give the ImageFolder copy of CIFAR-10, or --data fake")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    args.device = torch.device(args.device)
    args.flop_mode = flop_mode
    args.best_steps = args.best_steps or max(10, args.steps * args.batch // args.best_batch)
    return args


def timed_steps(args: argparse.Namespace, batch: int) -> int:
    """--steps at --batch; --best-steps at --best-batch, so a large batch does not make the run many times longer."""
    return args.steps if batch == args.batch else args.best_steps


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the "GPU available: ..." lines out of the table
    if args.flop_mode:
        run_flops(args)
        return
    trainer = {"accelerator": "gpu" if args.device.type == "cuda" else "cpu", "precision": args.precision}
    print(f"device: {device_name(args.device)}; precision of ours and the bare step: {resolve_precision(trainer)} (the manual's loop: as printed)")
    print(
        f"data: {args.data}{' ' + str(args.root) if args.data == 'folder' else ''}; warm-up {args.warmup} steps, "
        f"timed {timed_steps(args, args.batch)} steps at batch {args.batch}, {timed_steps(args, args.best_batch)} at batch {args.best_batch}; "
        f"seed {args.seed}; torch {torch.__version__}, lightning {L.__version__}",
        flush=True,
    )
    began = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
        args.tmp = Path(tmp)
        plan = [
            ("bare", lambda: run_bare(args, args.batch)),
            ("reference", lambda: run_reference(args, args.batch)),
            ("ours", lambda: run_ours(args, args.batch)),
        ]
        if args.best_batch != args.batch:
            plan += [
                ("bare", lambda: run_bare(args, args.best_batch)),
                ("reference", lambda: run_reference(args, args.best_batch)),
                ("best", lambda: run_ours(args, args.best_batch)),
            ]
        plan.append(("compile", lambda: run_ours(args, args.batch, compiled=True)))
        if args.best_batch != args.batch:
            plan.append(("compile", lambda: run_ours(args, args.best_batch, compiled=True)))
        ops, args.ops = args.ops, 0  # profiled after the timed rounds: the profiler slows what it watches
        for round_ in range(args.rounds):
            for variant, run in plan:
                if variant in args.skip:
                    continue
                rows.append(run())
                r = rows[-1]
                rate = f"{r.images_per_s:,.0f} images/s" if r.images_per_s else r.note
                print(f"  round {round_ + 1}/{args.rounds} done: {r.variant}, batch {r.batch}: {rate}", flush=True)
        if ops:
            args.ops = ops
            for variant, run in plan:
                if variant in ("bare", "ours", "best") and variant not in args.skip:
                    run()
    print()
    print_table(median_rows(rows))
    if args.device.type == "cpu":
        print("peak mem on CPU: this process's peak RSS so far (getrusage cannot be reset), rows in run order")
    print(f"vs bare step: against the bare step at the same batch size. Total wall time: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
