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
