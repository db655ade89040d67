"""The design card's sweep end to end, against the manual's loop training the same images.

Why: the command every student of the assignment types is ``python train.py -m trainer.max_epochs=10,20
data.batch_size=32,64 optim.lr=1e-3,1e-4``: 8 jobs of the manual's net and recipe. This script runs that grid, shortened
to fit a session (``--epochs 1,2 --limit 0.25`` by default), as a user would (one ``python train.py -m``: data,
training, validation, each job's test and the sweep report included, the jobs sharing epochs where they can and, on a
CPU, running side by side as the default launcher runs them, ``vit/launcher.py``), and times it whole. The manual's loop as printed (``vit.manual``) is timed in the same run at both batch sizes, before the sweep and
again after it, and the time it would take at the mean of the two speeds to train every job's images (the same number of
images at the same batch size, job by job, with no validation, test or report) is the reference. Figures are printed,
never asserted.

    python bench/sweep.py --root ../shared/data/cifar10-jpeg
    python bench/sweep.py --root ../shared/data/cifar10-jpeg --epochs 10,20 --limit 1.0    # the full grid
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from vit import manual
from vit.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent


def manual_rate(root: Path, batch: int, warmup: int, steps: int, seed: int) -> float:
    """The manual's loop as printed at ``batch``: training images per second over ``steps`` steps after ``warmup``."""
    projection = manual.project(root, torch.device("cpu"), seed, warmup, steps, time.perf_counter, with_test=False, batch_size=batch)
    if projection is None:
        raise SystemExit(f"the manual's epoch at batch {batch} has fewer than {warmup + steps} steps: lower --manual-steps")
    return projection.images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/cifar10-jpeg"), help="the ImageFolder copy of CIFAR-10")
    parser.add_argument("--epochs", default="1,2", help="trainer.max_epochs of the grid (default 1,2; the design card's: 10,20)")
    parser.add_argument("--batches", default="32,64", help="data.batch_size of the grid (default 32,64)")
    parser.add_argument("--lrs", default="1e-3,1e-4", help="optim.lr of the grid (default 1e-3,1e-4)")
    parser.add_argument("--limit", type=float, default=0.25, help="trainer.limit_train_batches (default 0.25 of an epoch)")
    parser.add_argument("--out", type=Path, default=None, help="the sweep dir (default outputs/bench-sweep/<time>)")
    parser.add_argument("--manual-steps", type=int, default=100, help="timed steps of the manual's loop at each batch size (default 100)")
    parser.add_argument("--alone", action="store_true", help="share_epochs=false: every job trains on its own")
    parser.add_argument("overrides", nargs="*", help="more overrides for train.py, e.g. trainer.precision=32-true")
    args = parser.parse_args()
    root = args.root.resolve()
    if not (root / "train").is_dir():
        parser.error(f"--root {root} has no train/ folder: give the ImageFolder copy of CIFAR-10")
    out = (args.out or ROOT / "outputs" / "bench-sweep" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}", flush=True)

    # The manual's loop timed before the sweep and again after it: this CPU's speed drifts by 10-20% over minutes, so the
    # reference is the mean of the two, both shown.
    rates: dict[str, dict[int, float]] = {}

    def time_manual(when: str) -> None:
        rates[when] = {batch: manual_rate(root, batch, 10, args.manual_steps, seed=42) for batch in batches}
        for batch, rate in rates[when].items():
            print(
                f"the manual's loop as printed, batch {batch}, {when} the sweep: {rate:,.1f} images/s ({args.manual_steps} steps after 10)",
                flush=True,
            )

    time_manual("before")
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"trainer.max_epochs={args.epochs}",
        f"data.batch_size={args.batches}",
        f"optim.lr={args.lrs}",
        f"trainer.limit_train_batches={args.limit}",
        "data=folder",
        f"data.root={root}",
        f"hydra.sweep.dir={out}",
        *(["share_epochs=false"] if args.alone else []),
        *args.overrides,
    ]
    print("the sweep: " + " ".join(command[1:]), flush=True)
    began = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    sharing = [line for line in result.stdout.splitlines() if line.startswith(("Sharing epochs", "Jobs "))]
    print("\n".join(sharing))
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the sweep failed (exit {result.returncode}); its dir: {out}")
    time_manual("after")

    mean = {batch: (rates["before"][batch] + rates["after"][batch]) / 2 for batch in batches}
    rows, manual_s = [], 0.0
    for job in sorted((p for p in out.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        config = (job / ".hydra" / "overrides.yaml").read_text().split("\n")
        summary = json.loads((job / "run.json").read_text())
        metrics = json.loads((job / "metrics.json").read_text())
        batch = next(int(line.split("=")[1]) for line in config if "data.batch_size=" in line)
        images = summary["images"]  # every image the job trained, its shared epochs included
        manual_s += images / mean[batch]
        shared = f"from job {Path(summary['shared_from']).name}'s {summary['shared_epochs']}" if summary.get("shared_from") else ""
        overrides = " ".join(line.removeprefix("- ") for line in config if line.startswith("- ") and "=" in line and "root" not in line)
        rows.append(
            (job.name, overrides, str(len(summary["history"])), f"{images:,}", shared, f"{100 * metrics['test/acc']:.2f}%", summary["precision"])
        )
    header = ("job", "overrides", "epochs", "images trained", "shares", "test acc", "precision")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for cells in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    drift = ", ".join(f"batch {b}: {rates['before'][b]:,.1f} -> {rates['after'][b]:,.1f}" for b in batches)
    print(
        f"\nthe sweep, end to end (data, training, validation, tests, report): {seconds:,.0f} s; the manual's loop training the same "
        f"images at the same batch sizes, at the mean of its speeds before and after the sweep ({drift} images/s): {manual_s:,.0f} s "
        f"projected (no validation or test): {manual_s / seconds:.2f}x. Sweep dir: {out}"
    )


if __name__ == "__main__":
    main()
