"""Every GPU figure of the project in one command, for the rare session with a CUDA GPU at hand (8 minutes at most).

Why: the project is developed on CPUs; a GPU comes now and then, for minutes. This runs, one after the
other and each under its own time limit, what the README's GPU rows need, and writes them to one Markdown
report (each step with its command, exit status, wall time and the lines that carry its figures):

1. ``bench/throughput.py --device cuda``: the manual's loop against ours at 16-mixed, images/s;
2. ``bench/time_to_accuracy.py --device cuda``: the race to 67.09% (``experiment=fast`` against the manual's recipe);
3. one short epoch of each preset under ``conf/experiment`` (but the sweep, the fine-tuning and ``budget_max``): its images/s;
4. ``test.py`` and ``vit.predict`` on the ``fast`` run of step 3.

    python bench/gpu_check.py --root ../shared/data/cifar10-jpeg --report gpu_check.md

The 8 minutes are a hard bound (``BUDGET_S``): the steps' limits (``LIMITS_S``) sum to at most it, and a step
still running when it is spent is stopped there (its whole process group), the steps after it not run. The
report is rewritten as each step ends, so a run cut short (the bound, Ctrl-C, a lost machine) leaves what
finished. Each call writes its runs into a new folder under ``--out`` (``<date>_<time>_<random>``), so a step cut short
shows nothing of an earlier call's runs. On a machine without a CUDA GPU it says so in one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every preset but the sweep (assignment), the one that downloads pretrained weights (finetune) and budget_max (budget's
# net and recipe with one more stem conv: budget's short epoch covers its path, and the 8 minutes hold no more).
SKIPPED = ("assignment", "finetune", "budget_max")
PRESETS = tuple(sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem not in SKIPPED))
# Lines worth keeping from each step's output: tables, accuracies, rates, errors.
KEEP = re.compile(r"^\|.*\||images/s|Accuracy on test set|accuracy|reached|error|Error|device:", re.IGNORECASE)
# The whole run, seconds, from its start: a hard bound. Steps are stopped STOP_MARGIN_S before it, for the report.
BUDGET_S = 480
STOP_MARGIN_S = 2
# Each step's time limit in seconds, by its title in the report; they sum to at most BUDGET_S. A preset's short
# epoch is mostly start-up and data loading; cifar_best compiles its net first.
LIMITS_S: dict[str, int] = {
    "Throughput, 16-mixed": 75,
    "Race to 67.09%": 150,
    **{f"One short epoch of experiment={p}": 45 if p == "cifar_best" else 27 for p in PRESETS},
    "test.py on the fast run": 35,
    "vit.predict on the fast run": 35,
}


class Report:
    """The Markdown report, rewritten whole (atomically) after every step, with a last line saying how far the run got."""

    def __init__(self, path: Path, header: list[str], began: float):
        self.path, self.began = path, began
        self.sections: list[list[str]] = [header]
        self.done = False

    def add(self, lines: list[str]) -> list[str]:
        """Appends a section (a list the caller may extend later, then ``write``) and writes the report."""
        self.sections.append(lines)
        self.write()
        return lines

    def write(self) -> None:
        used = time.monotonic() - self.began
        state = "finished" if self.done else "cut short or still running: what is above finished"
        lines = [line for section in self.sections for line in section]
        lines.append(f"_{state}; {used:.0f} s of the {BUDGET_S} s bound used._")
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("\n".join(lines) + "\n")
        os.replace(partial, self.path)


def step(report: Report, title: str, command: list[str], limit: float, deadline: float) -> tuple[int | None, str]:
    """Runs ``command`` from the project root for at most ``limit`` seconds and never past ``deadline`` (``time.monotonic``);
    adds its section to ``report`` (written at once). Returns its exit status (None: stopped, or not run) and output.

    The command runs in its own process group, its output to a file: stopping it stops its children too (data loader
    workers), and none of them can hold the step open after it.
    """
    shown = " ".join(command)
    timeout = min(limit, deadline - time.monotonic())
    if timeout <= 0:
        print(f"== {title}: not run (the {BUDGET_S} s bound is spent)", flush=True)
        report.add([f"## {title}", "", f"`{shown}`: not run, the {BUDGET_S} s bound was spent", ""])
        return None, ""
    print(f"== {title}: {shown}", flush=True)
    began = time.monotonic()
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        # unbuffered: what a step printed before it was stopped is in the file
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop_group(process)
        log.seek(0)
        output = log.read()
    seconds = time.monotonic() - began
    if code is None:
        status = f"timed out (limit {timeout:.0f} s)" if timeout == limit else f"stopped at the {BUDGET_S} s bound"
    else:
        status = "ok" if code == 0 else f"failed (exit {code})"
    kept = [line for line in output.splitlines() if KEEP.search(line)][-40:]
    print(f"   {status} in {seconds:.0f} s", flush=True)
    report.add([f"## {title}", "", f"`{shown}`: {status}, {seconds:.0f} s", "", "```", *kept, "```", ""])
    return code, output


def _stop_group(process: subprocess.Popen) -> None:
    """Kills the step's process group (what is left of it) and reaps the step."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def fresh_dir(parent: Path) -> Path:
    """A new, empty folder under ``parent`` for this call's runs: what a cut step left unwritten is absent, never an earlier
    call's figure (``run.json``, a checkpoint for test.py) read as this one's."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S_"), dir=parent))


def main() -> int:
    began = time.monotonic()
    deadline = began + BUDGET_S - STOP_MARGIN_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/cifar10-jpeg"), help="ImageFolder copy of CIFAR-10")
    parser.add_argument("--report", type=Path, default=Path("gpu_check.md"), help="the Markdown report to write (after every step)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/gpu_check"), help="each call's run dirs go to a new folder OUT/<date>_<time>_<random>"
    )
    parser.add_argument("--steps", type=int, default=60, help="training batches of each preset's short epoch (default 60)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is false): run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 1
    root = args.root.resolve()
    if not (root / "train").is_dir():
        parser.error(f"--root {root} has no train/ folder: give the ImageFolder copy of CIFAR-10")
    out = fresh_dir(args.out.resolve())
    python = sys.executable
    header = [f"# GPU check: {torch.cuda.get_device_name(0)}", "", f"torch {torch.__version__}, data {root}, run dirs {out}", ""]
    report = Report(args.report, header, began)
    report.write()

    def run(title: str, command: list[str]) -> tuple[int | None, str]:
        return step(report, title, command, LIMITS_S[title], deadline)

    data = ["data=folder", f"data.root={root}", "trainer.accelerator=gpu"]
    run("Throughput, 16-mixed", [python, "bench/throughput.py", "--device", "cuda", "--data", "folder", "--root", str(root), "--steps", "200"])
    race = [python, "bench/time_to_accuracy.py", "--device", "cuda", "--data", "folder", "--root", str(root)]
    run("Race to 67.09%", [*race, "--png", str(out / "time_to_accuracy.png")])
    # the table first, a row added as each preset ends
    rows = report.add(
        ["## Presets, one short epoch each", "", "| preset | exit | wall s | images/s | test acc (short epoch) |", "|---|---|---|---|---|"]
    )
    for preset in PRESETS:
        run_dir = out / preset
        command = [
            python,
            "train.py",
            f"experiment={preset}",
            *data,
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={args.steps}",
            "trainer.limit_val_batches=5",
            "trainer.limit_test_batches=10",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ]
        started = time.monotonic()
        code, output = run(f"One short epoch of experiment={preset}", command)
        stats = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        accuracy = re.search(r"Accuracy on test set: ([\d.]+%)", output)
        rows.append(
            f"| {preset} | {code} | {time.monotonic() - started:.0f} | {stats.get('images_per_s', '-')} | {accuracy.group(1) if accuracy else '-'} |"
        )
        report.write()
    rows.append("")
    run("test.py on the fast run", [python, "test.py", f"ckpt={out / 'fast'}", *data[:2]])
    image = next(iter(sorted((root / "test").glob("*/*"))), None)
    run("vit.predict on the fast run", [python, "-m", "vit.predict", f"ckpt={out / 'fast'}", f"image={image}", "attention=true"])
    report.done = True
    report.write()
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
