"""``bench/throughput.py``'s variants (imported by it, not run): the bare step, the manual's loop and ours through
``Trainer.fit``, each timed over its steady-state steps, then the table of their medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from clock import now, peak_memory, reset_peak_memory, steps_per_s
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from profiles import OpsProfile

from vit import manual
from vit.builders import build_callbacks, build_net, build_trainer, instantiate
from vit.precision import resolve_precision
from vit.run import build_for_fit

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
VARIANTS = ("bare", "reference", "ours", "best", "compile")


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


def timed_steps(args: argparse.Namespace, batch: int) -> int:
    """--steps at --batch; --best-steps at --best-batch, so a large batch does not make the run many times longer."""
    return args.steps if batch == args.batch else args.best_steps
