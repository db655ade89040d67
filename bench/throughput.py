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

This file is the command line; the variants are timed in ``bench/variants.py``, the distance to the limit in
``bench/flop_limit.py`` (its FLOPs counted by ``vit/flops.py``), the profiles in ``bench/profiles.py``, and
``bench/clock.py`` holds the clock they share.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from clock import device_name
from flop_limit import DTYPE_NAMES, FLOP_NETS, compose_net, matmul_rates, print_flop_table, run_share, time_flop_row, train_sides
from profiles import profile_step
from variants import VARIANTS, Row, median_rows, print_table, run_bare, run_ours, run_reference, timed_steps

from vit.precision import resolve_precision


def run_flops(args: argparse.Namespace) -> None:
    """--flops, --run-dir, --profile: the peak, the table of nets and sizes, the runs' shares, the profile."""
    began = time.perf_counter()
    print(f"device: {device_name(args.device)}; torch {torch.__version__}", flush=True)
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
                    print(
                        f"  done: {name}, {side} px, {DTYPE_NAMES[r.dtype]}: {r.flops_per_image / 1e6:,.1f} MFLOP/image at {r.images_per_s:,.0f} images/s",
                        flush=True,
                    )
        # each dtype's peak, measured after the steps and again (best of the two), so that a drifting CPU is caught near its best
        peaks = {}
        for dtype in sorted({torch.float32, torch.bfloat16, *(r.dtype for r in rows)}, key=str):
            rates = [matmul_rates(args.device, dtype=dtype) for _ in range(2)]
            peaks[dtype] = (max(p for p, _ in rates), max(c for _, c in rates) if args.device.type == "cpu" else None)
            print(
                f"peak: {DTYPE_NAMES[dtype]} torch.mm 2048x2048, best of 5, twice: {' and '.join(f'{p / 1e9:,.1f}' for p, _ in rates)} GFLOP/s "
                f"({torch.get_num_threads()} torch threads)",
                flush=True,
            )
        peak = peaks[torch.float32][0]
        if rows:
            print()
            print_flop_table(rows, peaks)
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
        help="trainer.precision of ours, the bare step and the --flops rows (default: each config's, as resolved for the device: vit/precision.py)",
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
