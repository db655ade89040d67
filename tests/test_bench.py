import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_on_a_cpu_says_so_in_one_line():
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--report", "never-written.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is false): run it on a machine with an NVIDIA GPU"
    ]
    assert not (ROOT / "never-written.md").exists()


def test_frontier_draws_every_point_and_names_a_missing_field(tmp_path):
    points = [
        {"label": "here", "minutes": 5.0, "accuracy": 70.0, "source": "a command", "spread": [69.5, 70.5]},
        {"label": "elsewhere", "minutes": 30, "accuracy": 80, "source": "a paper", "machine": "12 cores"},
    ]
    data = tmp_path / "frontier.json"
    data.write_text(json.dumps(points))
    png = tmp_path / "frontier.png"
    done = subprocess.run([sys.executable, "bench/frontier.py", "--data", str(data), "--png", str(png)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and png.stat().st_size > 10_000
    assert "5.0 min   70.00%  here  [a command]" in done.stdout and "elsewhere" in done.stdout
    data.write_text(json.dumps([{"label": "no time", "accuracy": 70.0}]))
    done = subprocess.run([sys.executable, "bench/frontier.py", "--data", str(data), "--png", str(png)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().endswith("point 0 lacks minutes, source (each point needs label, minutes, accuracy, source)")


def test_run_curve_draws_a_finished_run_and_names_a_missing_one(tmp_path, trained_run):
    png = tmp_path / "curve.png"
    done = subprocess.run([sys.executable, "bench/run_curve.py", str(trained_run), "--png", str(png)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and png.stat().st_size > 10_000
    done = subprocess.run(
        [sys.executable, "bench/run_curve.py", str(tmp_path / "nothing"), "--png", str(png)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 1 and "no readable run.json" in done.stderr and "give a finished run dir" in done.stderr
