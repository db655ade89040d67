"""A run's training curve: train accuracy and loss per epoch (from its ``run.json``), and its test accuracy (``metrics.json``).

Why: a preset trained without a validation split (``data.val_size=0``) has no validation curve to show; this
draws what it logged, for the docs, without reading the test split again.

    python bench/run_curve.py outputs/budget/seed42 --png docs/budget_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--title", default=None, help="default: the run dir")
    args = parser.parse_args()
    try:
        history = json.loads((args.run_dir / "run.json").read_text())["history"]
        test_acc = json.loads((args.run_dir / "metrics.json").read_text()).get("test/acc")
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{args.run_dir}: no readable run.json with a history and metrics.json ({e}): give a finished run dir") from None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(epochs, [100 * row["train/acc"] for row in history], "o-", label="train accuracy (augmented batches)")
    if test_acc is not None:
        ax.axhline(100 * test_acc, color="tab:green", linestyle=":", label=f"test accuracy at the end: {100 * test_acc:.2f}%")
    loss_ax = ax.twinx()
    loss_ax.plot(epochs, [row["train/loss_epoch"] for row in history], "s--", color="tab:orange", label="train loss (as trained)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    loss_ax.set_ylabel("loss")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = loss_ax.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="center right", fontsize=8)
    ax.set_title(args.title or str(args.run_dir), fontsize=10)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
