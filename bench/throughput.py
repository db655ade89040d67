"""Training throughput: this project's Lightning run against the course manual's loop and a bare step.

Why: the project replaces the manual's per-image PIL pipeline and hand-written loop with an in-memory
uint8 data set, batched preprocessing on the device and ``lightning.Trainer.fit``. This script shows
what that buys, and what Lightning and the data path still cost, by timing in one process, one after
the other and from the same seed:

- bare step: the same net and Adam on one pre-made batch already on the device, no Lightning and no
  DataLoader; the ceiling for ``ours`` at the same batch size;
- reference: the manual's code as printed, ``vit.manual`` (its classes, torchvision data set with its PIL
  transform, ``DataLoader(batch_size=32, shuffle=True, num_workers=2)``, Adam 1e-3, ``CrossEntropyLoss``,
  ``running_loss += loss.item()``; fp16 autocast and a GradScaler on CUDA);
- ours: the DataModule, net, LightningModule and Trainer built from the project's Hydra config the
  way ``python train.py`` builds them (TensorBoard logger, progress bar and the default callbacks
  included, into a temporary directory), with checkpoint files and validation off;
- ours with ``model.compile=true`` (``torch.compile``), at the manual's batch and at a larger one;
- ours at best settings: a larger batch.

The reference's net is the manual's own classes: its attention formula by einsum and softmax. Ours and
the bare step use the config's attention: correct, through ``F.scaled_dot_product_attention`` (the fused kernels).

Only steady-state steps are timed: the clock is read at the start of step ``warmup`` and of step
``warmup + steps``, so start-up, worker spawn, allocator growth and compilation are left out (the
warm-up column shows what they took). Figures are printed, never asserted.

    python bench/throughput.py --device cpu --steps 100 --warmup 10 --data folder
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vit import manual
from vit.builders import build_callbacks, build_net, build_trainer, instantiate
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
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def steps_per_s(start: float | None, end: float | None, steps: int, what: str) -> float:
    if start is None or end is None:
        raise RuntimeError(f"{what} stopped before its timed steps ended: lower --warmup/--steps")
    return steps / (end - start)


class Stopwatch(L.Callback):
    """Reads the clock at the start of batch ``warmup`` and of batch ``warmup + steps`` (one epoch, so batch_idx counts steps).

    ``on_train_batch_start`` runs after the batch was fetched, moved and preprocessed, so the interval
    covers exactly ``steps`` whole iterations of Lightning's loop.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.fit_start: float | None = None
        self.start: float | None = None
        self.end: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start = now(self.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = now(self.device)
        elif batch_idx == self.warmup + self.steps:
            self.end = now(self.device)


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
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net.train()
    reset_peak_memory(device)
    begin = now(device)
    start = end = None
    for i in range(args.warmup + timed_steps(args, batch) + 1):
        if i == args.warmup:
            start = now(device)
        if i == args.warmup + timed_steps(args, batch):
            end = now(device)
            break
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
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
    stopwatch = Stopwatch(args.warmup, steps, device)
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


def print_table(rows: list[Row]) -> None:
    """variant | batch | images/s | vs reference | vs bare step (same batch) | peak mem | warm-up | note."""
    reference = next((r.images_per_s for r in rows if r.variant.startswith("reference")), None)
    bare = {r.batch: r.images_per_s for r in rows if r.variant == "bare step"}

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}x" if value and base else "-"

    header = ("variant", "batch", "images/s", "vs reference", "vs bare step", "peak mem", "warm-up", "note")
    lines = [
        (
            r.variant,
            str(r.batch),
            f"{r.images_per_s:,.0f}" if r.images_per_s else "n/a",
            ratio(r.images_per_s, reference),
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant at --batch (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before the clock starts (default 10)")
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
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's); on a shared CPU, fewer threads than free cores avoids OpenMP stalls",
    )
    parser.add_argument("--skip", nargs="+", choices=VARIANTS, default=[], help="variants to leave out")
    args = parser.parse_args()
    if min(args.steps, args.batch, args.best_batch) < 1 or args.warmup < 0 or (args.best_steps is not None and args.best_steps < 1):
        parser.error("--steps, --batch, --best-batch, --best-steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    args.root = args.root.resolve()
    if args.data == "folder" and not (args.root / "train").is_dir():
        parser.error(f"--root {args.root} has no train/ folder: give the ImageFolder copy of CIFAR-10, or --data fake")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    args.device = torch.device(args.device)
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
    precision = "16-mixed (autocast fp16 + GradScaler)" if args.device.type == "cuda" else "32-true"
    print(f"device: {device_name(args.device)}; precision: {precision}")
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
        if "best" not in args.skip and args.best_batch != args.batch:
            plan += [("bare", lambda: run_bare(args, args.best_batch)), ("best", lambda: run_ours(args, args.best_batch))]
        plan.append(("compile", lambda: run_ours(args, args.batch, compiled=True)))
        if "best" not in args.skip and args.best_batch != args.batch:
            plan.append(("compile", lambda: run_ours(args, args.best_batch, compiled=True)))
        for variant, run in plan:
            if variant in args.skip:
                continue
            rows.append(run())
            r = rows[-1]
            print(f"  done: {r.variant}, batch {r.batch}: {f'{r.images_per_s:,.0f} images/s' if r.images_per_s else r.note}", flush=True)
    print()
    print_table(rows)
    if args.device.type == "cpu":
        print("peak mem on CPU: this process's peak RSS so far (getrusage cannot be reset), rows in run order")
    print(f"vs bare step: against the bare step at the same batch size. Total wall time: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
