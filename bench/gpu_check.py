"""Every GPU figure of the project in one command, for the rare session with a CUDA GPU at hand (at most ~8 minutes).

Why: the project is developed on CPUs; a GPU comes now and then, for minutes. This runs, one after the
other and each under its own time limit, what the README's GPU rows need, and writes them to one Markdown
report (each step with its command, exit status, wall time and the lines that carry its figures):

1. ``bench/throughput.py --device cuda``: the manual's loop against ours at 16-mixed, images/s;
2. ``bench/time_to_accuracy.py --device cuda``: the race to 67.09% (``experiment=fast`` against the manual's recipe);
3. one short epoch of each preset under ``conf/experiment`` (but the sweep and the fine-tuning): its images/s;
4. ``test.py`` and ``vit.predict`` on the ``fast`` run of step 3.

    python bench/gpu_check.py --root ../shared/data/cifar10-jpeg --report gpu_check.md

On a machine without a CUDA GPU it says so in one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every preset but the sweep (assignment) and the one that downloads pretrained weights (finetune).
PRESETS = tuple(sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem not in ("assignment", "finetune")))
# Lines worth keeping from each step's output: tables, accuracies, rates, errors.
KEEP = re.compile(r"^\|.*\||images/s|Accuracy on test set|accuracy|reached|error|Error|device:", re.IGNORECASE)


def step(report: list[str], title: str, command: list[str], timeout: int) -> tuple[int | None, str]:
    """Runs ``command`` from the project root under ``timeout`` seconds; appends its section to ``report``."""
    print(f"== {title}: {' '.join(command)}", flush=True)
    began = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - began
    status = "timed out" if code is None else ("ok" if code == 0 else f"failed (exit {code})")
    kept = [line for line in output.splitlines() if KEEP.search(line)][-40:]
    print(f"   {status} in {seconds:.0f} s", flush=True)
    report += [f"## {title}", "", f"`{' '.join(command)}`: {status}, {seconds:.0f} s", "", "```", *kept, "```", ""]
    return code, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/cifar10-jpeg"), help="ImageFolder copy of CIFAR-10")
    parser.add_argument("--report", type=Path, default=Path("gpu_check.md"), help="the Markdown report to write")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="run dirs of the short preset epochs")
    parser.add_argument("--steps", type=int, default=60, help="training batches of each preset's short epoch (default 60)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is false): run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 1
    root, out = args.root.resolve(), args.out.resolve()
    if not (root / "train").is_dir():
        parser.error(f"--root {root} has no train/ folder: give the ImageFolder copy of CIFAR-10")
    python = sys.executable
    report = [f"# GPU check: {torch.cuda.get_device_name(0)}", "", f"torch {torch.__version__}, data {root}", ""]
    data = ["data=folder", f"data.root={root}", "trainer.accelerator=gpu"]
    step(
        report,
        "Throughput, 16-mixed",
        [python, "bench/throughput.py", "--device", "cuda", "--data", "folder", "--root", str(root), "--steps", "200"],
        120,
    )
    step(
        report,
        "Race to 67.09%",
        [
            python,
            "bench/time_to_accuracy.py",
            "--device",
            "cuda",
            "--data",
            "folder",
            "--root",
            str(root),
            "--png",
            str(out / "time_to_accuracy.png"),
        ],
        180,
    )
    rows = ["| preset | exit | wall s | images/s | test acc (short epoch) |", "|---|---|---|---|---|"]
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
        began = time.perf_counter()
        code, output = step(report, f"One short epoch of experiment={preset}", command, 60)
        stats = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        accuracy = re.search(r"Accuracy on test set: ([\d.]+%)", output)
        rows.append(
            f"| {preset} | {code} | {time.perf_counter() - began:.0f} | {stats.get('images_per_s', '-')} | {accuracy.group(1) if accuracy else '-'} |"
        )
    report += ["## Presets, one short epoch each", "", *rows, ""]
    step(report, "test.py on the fast run", [python, "test.py", f"ckpt={out / 'fast'}", *data[:2]], 60)
    image = next(iter(sorted((root / "test").glob("*/*"))), None)
    step(report, "vit.predict on the fast run", [python, "-m", "vit.predict", f"ckpt={out / 'fast'}", f"image={image}", "attention=true"], 60)
    args.report.write_text("\n".join(report) + "\n")
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
