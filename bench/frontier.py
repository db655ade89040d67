"""The accuracy-per-CPU-minute frontier: test accuracy against wall-clock minutes (log scale), one point per run.

Why: one picture that says which preset to pick for a time budget on a CPU, and where published small-ViT
results on other machines stand. The figures are not measured here: they are read from the results registry
(default ``docs/frontier.json``, which ``python -m vit.results_page`` and ``python -m vit.reproduce`` read too): one
point per row that has a ``frontier`` entry, at its headline result, with a bar over its recorded results, and
the published anchors with their sources. A plain JSON list of points (label, minutes, accuracy, source) is drawn
as it is. Points of this project's machines are filled; anchors from other machines are hollow and say which machine.

    python bench/frontier.py                       # docs/frontier.json -> docs/frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("label", "minutes", "accuracy", "source")


def load(path: Path) -> list[dict]:
    points = json.loads(path.read_text())
    if isinstance(points, dict):  # the results registry: its rows' headline results, then the anchors
        from vit.errors import ConfigError
        from vit.registry import frontier_points, load_registry

        try:
            points = frontier_points(load_registry(path))
        except ConfigError as e:
            raise SystemExit(str(e)) from None
    for i, point in enumerate(points):
        missing = [k for k in KEYS if k not in point]
        if missing:
            raise SystemExit(f"{path}: point {i} lacks {', '.join(missing)} (each point needs {', '.join(KEYS)})")
    return points


def plot(points: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    for point in points:
        here = point.get("machine") is None
        color = point.get("color", "tab:blue" if here else "tab:gray")
        marker = point.get("marker", "o" if here else "D")
        ax.plot(
            [point["minutes"]],
            [point["accuracy"]],
            marker,
            color=color,
            markersize=9,
            fillstyle="full" if here else "none",
            label=f"{point['label']}" + ("" if here else f" ({point['machine']})"),
        )
        if point.get("spread"):
            low, high = point["spread"]
            ax.vlines(point["minutes"], low, high, color=color, linewidth=2)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    ax.text(0.01, target + 0.4, f"the manual's {target:.2f}%", color="gray", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("minutes from the command's start to the printed test accuracy (log scale)")
    ax.set_ylabel("test accuracy on CIFAR-10 (%)")
    ax.set_title("Accuracy against CPU time: filled = this project's 2-core CPU, hollow = published, other machines", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7.5, frameon=False)  # below the axes: no point hidden
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "docs" / "frontier.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "frontier.png")
    parser.add_argument("--target", type=float, default=67.09)
    args = parser.parse_args()
    points = load(args.data)
    plot(points, args.png, args.target)
    for point in sorted(points, key=lambda p: p["minutes"]):
        print(f"{point['minutes']:8.1f} min  {point['accuracy']:6.2f}%  {point['label']}  [{point['source']}]")
    print(f"picture: {args.png}")


if __name__ == "__main__":
    main()
