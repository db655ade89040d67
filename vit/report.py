"""The sweep report (assignment step 5): one row per job, best validation accuracy first, as CSV, Markdown and a plot.

Jobs are ranked by validation accuracy only, never by a test figure: without a validation split
(``data.val_size=0``) the rows stay in job order and no job is marked best.

Each job leaves ``metrics.json`` and ``run.json`` in its dir; the Hydra callback ``SweepReport``
adds ``job.json`` (ok / failed) when a job ends and rebuilds the report from all job dirs, so it is
complete after every job, also when a later job fails or the sweep is killed.
``python -m vit.report SWEEP_DIR`` rebuilds it for any sweep dir, old or interrupted ones too.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vit.errors import first_line

log = logging.getLogger(__name__)

COLUMNS = [
    "job",
    "max_epochs",
    "batch_size",
    "lr",
    "status",
    "val_acc",
    "test_acc",
    "test_loss",
    "epochs",
    "train_time_s",
    "images_per_s",
    "params",
    "ckpt",
]
SWEPT_BY_COLUMNS = {"trainer.max_epochs", "data.batch_size", "optim.lr"}
NO_RESULT = "failed: no result (interrupted, or still running)"
NO_VAL_NOTE = "No job has a validation split (data.val_size=0): rows in job order, no best chosen (the test split is never used to choose)."


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    jobs = [p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "config.yaml").exists()]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def is_sweep_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and not (path / ".hydra").is_dir() and ((path / "multirun.yaml").exists() or bool(job_dirs(path)))


def _read_json(path: Path) -> dict[str, Any]:
    """The file's contents; {} where there is none, also where it is damaged (with a warning naming it)."""
    if not path.exists():
        return {}
    try:
        contents = json.loads(path.read_text())
        if not isinstance(contents, dict):
            raise ValueError(f"a JSON {type(contents).__name__}, not an object")
        return contents
    except (OSError, ValueError) as e:
        log.warning(
            "%s is damaged (%s): the sweep report leaves out what it held; run job %s again to write it", path, first_line(e), path.parent.name
        )
        return {}


def _read_yaml(path: Path) -> Any:
    """The file's contents; None where it is damaged (with a warning naming it)."""
    try:
        return OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        log.warning("%s is damaged (%s): the sweep report leaves out what it held", path, first_line(e))
        return None


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    lines = (_read_yaml(path) if path.exists() else None) or []
    return dict(str(line).split("=", 1) for line in lines if "=" in str(line) and not str(line).startswith("hydra."))


def job_row(job: Path) -> dict[str, Any]:
    config = _read_yaml(job / ".hydra" / "config.yaml")
    setting = (lambda key: OmegaConf.select(config, key, default=None)) if isinstance(config, DictConfig) else (lambda key: None)
    metrics, summary, status = _read_json(job / "metrics.json"), _read_json(job / "run.json"), _read_json(job / "job.json")
    return {
        "job": job.name,
        "max_epochs": setting("trainer.max_epochs"),
        "batch_size": setting("data.batch_size"),
        "lr": setting("optim.lr"),
        "status": status.get("status") or ("ok" if metrics else NO_RESULT),
        "val_acc": metrics.get("val/acc"),
        "test_acc": metrics.get("test/acc"),
        "test_loss": metrics.get("test/loss"),
        "epochs": metrics.get("epochs"),
        "train_time_s": summary.get("train_time_s"),
        "images_per_s": summary.get("images_per_s"),
        "params": summary.get("params"),
        "ckpt": summary.get("ckpt"),
        "history": summary.get("history", []),  # for the plot, not a column
    }


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows sorted best first by val_acc only (jobs without one last, in job order; never by a test figure), and the
    extra columns: every other override whose value differs between jobs."""
    jobs = job_dirs(sweep_dir)
    rows = [job_row(job) for job in jobs]
    overrides = [_overrides(job) for job in jobs]
    keys = sorted({k for o in overrides for k in o} - SWEPT_BY_COLUMNS)
    extra = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    for row, o in zip(rows, overrides):
        row.update({k: o.get(k) for k in extra})
    rows.sort(key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0)))  # stable: ties and jobs without val_acc keep job order
    return rows, extra


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished job with the highest val_acc (the first of equals); None where no finished job has one:
    the test split never chooses."""
    ranked = [r for r in rows if r["status"] == "ok" and r.get("val_acc") is not None]
    return max(ranked, key=lambda r: r["val_acc"]) if ranked else None


def ranking_note(rows: list[dict[str, Any]]) -> str | None:
    """One line saying why rows are not ranked (or not all of them); None where every finished job has a val_acc."""
    unranked = [r["job"] for r in rows if r["status"] == "ok" and r.get("val_acc") is None]
    if not unranked:
        return None
    if not any(r.get("val_acc") is not None for r in rows):
        return NO_VAL_NOTE
    jobs = f"Job {unranked[0]} has" if len(unranked) == 1 else f"Jobs {', '.join(unranked)} have"
    return f"{jobs} no validation split (data.val_size=0): listed after the ranked jobs, in job order, not ranked."


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if column in ("val_acc", "test_acc", "test_loss"):
        return f"{value:.4f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], extra: list[str], title: str) -> str:
    columns = COLUMNS + extra
    note = ranking_note(rows)
    chosen = best(rows)
    lines = [f"# {title}", "", *([note, ""] if note else []), "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c), c) for c in columns]
        if row is chosen:
            cells[0] = f"**{cells[0]} (best)**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], extra: list[str], out_dir: Path, title: str) -> str:
    """summary.csv, summary.md and summary.png in ``out_dir``; returns the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # one temporary file per process: a sweep's side-by-side jobs (vit.launcher) may write the report at once
    temporary = {name: out_dir / f"{name}.{os.getpid()}.tmp" for name in ("summary.csv", "summary.md")}
    with open(temporary["summary.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, extra, title)
    temporary["summary.md"].write_text(table)
    for name, path in temporary.items():
        os.replace(path, out_dir / name)  # a kill mid-write leaves the previous report whole
    plot(rows, extra, out_dir / "summary.png", title)
    return table


def _label(row: dict[str, Any], extra: list[str]) -> str:
    parts = [
        f"job {row['job']}",
        f"ep {row['max_epochs']}",
        f"bs {row['batch_size']}",
        f"lr {row['lr']:g}" if isinstance(row["lr"], float) else f"lr {row['lr']}",
    ]
    return ", ".join(parts + [f"{k.rsplit('.', 1)[-1]} {row.get(k)}" for k in extra])


def plot(rows: list[dict[str, Any]], extra: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, extra, title)
    fig.savefig(path)
    plt.close(fig)


# Jobs with a single epoch are single points, often at the same place: each gets its own open marker, drawn larger.
SINGLE_POINT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
# The right panel's curve, the first that some job's per-epoch history (run.json) holds: key, name, scale to the axis.
CURVES = (("val/acc", "val accuracy (%)", 100), ("train/acc", "train accuracy (%)", 100), ("train/loss_epoch", "train loss", 1))


def figure(rows: list[dict[str, Any]], extra: list[str], title: str) -> Any:
    """Left: test accuracy per job, in the rows' order (green: the best by val acc, where one is chosen); right: val accuracy
    per epoch of every job, or where no job has one, its training curve (train accuracy, else train loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(14, 1.5 + 0.45 * max(len(rows), 4)), dpi=100)
    labels = [_label(r, extra) for r in rows][::-1]
    values = [100 * (r["test_acc"] or 0) for r in rows][::-1]
    chosen = best(rows)
    colors = ["tab:green" if r is chosen else ("tab:blue" if r["status"] == "ok" else "tab:red") for r in rows[::-1]]
    bars.barh(labels, values, color=colors)
    for y, (value, row) in enumerate(zip(values, rows[::-1])):
        bars.text(value + 0.5, y, f"{value:.2f}%" if row["test_acc"] is not None else row["status"][:40], va="center", fontsize=8)
    bars.set_xlabel("test accuracy (%)")
    bars.set_xlim(0, 110)
    if chosen is not None:
        bars.set_title("test accuracy per job (green: best by val acc)")
    else:
        bars.set_title("test accuracy per job, in job order (no val acc: no best chosen)")
    histories = [h for r in rows for h in r.get("history") or []]
    key, name, scale = next((curve for curve in CURVES if any(curve[0] in h for h in histories)), (None, None, 1))
    single, last = 0, 1
    for row in rows if key else []:
        points = [(h["epoch"] + 1, scale * h[key]) for h in row.get("history") or [] if h.get(key) is not None]
        last = max([last] + [epoch for epoch, _ in points])
        if len(points) == 1:
            marker = SINGLE_POINT_MARKERS[single % len(SINGLE_POINT_MARKERS)]
            curves.plot(
                *zip(*points), marker=marker, markersize=9, markerfacecolor="none", markeredgewidth=1.5, linestyle="none", label=_label(row, extra)
            )
            single += 1
        elif points:
            curves.plot(*zip(*points), marker="o", markersize=3, label=_label(row, extra))
    if key is None:
        curves.set_axis_off()
        curves.text(0.5, 0.5, "no per-epoch curve\n(no job's run.json holds a history)", ha="center", va="center", transform=curves.transAxes)
    else:
        curves.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        curves.set_xlim(0.5, last + 0.5)  # whole epochs, also where every job ran one
        curves.set_xlabel("epoch")
        curves.set_ylabel(name)
        what = name.removesuffix(" (%)")
        curves.set_title(f"{what} per epoch" if key == "val/acc" else f"{what} per epoch (no job has a val curve)")
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def rebuild(sweep_dir: str | Path) -> str:
    """Rebuilds the report of a sweep dir from its job dirs, under a lock (parallel launchers end jobs at once)."""
    sweep_dir = Path(sweep_dir)
    with open(sweep_dir / ".report.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows, extra = collect(sweep_dir)
        return write(rows, extra, sweep_dir, title=f"Sweep {sweep_dir}")


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


class SweepReport(Callback):
    """Hydra callback: after each job of a multirun, records its status and rebuilds the sweep report.

    The sweep dir is taken from the job's own dir, never by resolving ``hydra.sweep.dir`` again:
    its ``${now:...}`` would give another time in every fresh copy of the config.
    """

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))  # the same config object the launcher resolves

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN or not _is_rank_zero():
            return
        if job_return.status == JobStatus.COMPLETED:
            status = "ok"
        else:
            status = f"failed: {first_line(job_return._return_value)}"
        job_dir = Path(hydra_cfg.runtime.output_dir)
        (job_dir / "job.json").write_text(json.dumps({"status": status}) + "\n")
        sweep_dir = job_dir.parent  # job dirs are sweep_dir/<hydra.job.num>
        try:
            rebuild(sweep_dir)
            log.info("Job %s %s; sweep report updated: %s", job_dir.name, status, sweep_dir / "summary.md")
        except Exception as e:  # noqa: BLE001 - a broken report must never take a sweep down
            log.warning("Could not rebuild the sweep report: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir
        if sweep_dir is not None and sweep_dir.is_dir() and _is_rank_zero():
            print(rebuild(sweep_dir))
            print(f"Sweep report: {sweep_dir / 'summary.md'} (also summary.csv, summary.png)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not is_sweep_dir(args[0]):
        print("usage: python -m vit.report SWEEP_DIR  (a dir of job dirs, e.g. outputs/multirun/<date>/<time>_<us>)", file=sys.stderr)
        return 2
    print(rebuild(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
