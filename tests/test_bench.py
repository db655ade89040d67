import importlib.util
import json
import os
import subprocess
import sys
import time
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


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_limits_fit_in_8_minutes():
    gpu_check = load_gpu_check()
    assert gpu_check.BUDGET_S == 8 * 60
    assert sum(gpu_check.LIMITS_S.values()) <= gpu_check.BUDGET_S, gpu_check.LIMITS_S
    presets = {f"One short epoch of experiment={p}" for p in gpu_check.PRESETS}
    assert len(presets) >= 6 and presets <= set(gpu_check.LIMITS_S)  # every step main runs takes its limit from the table
    assert {"Throughput, 16-mixed", "Race to 67.09%", "test.py on the fast run", "vit.predict on the fast run"} <= set(gpu_check.LIMITS_S)


def test_gpu_check_writes_the_report_as_each_step_ends_and_stops_a_hung_one(tmp_path):
    gpu_check = load_gpu_check()
    path = tmp_path / "gpu_check.md"
    report = gpu_check.Report(path, ["# GPU check: test", ""], time.monotonic())
    far = time.monotonic() + 600
    code, _ = gpu_check.step(report, "Quick", [sys.executable, "-c", "print('| a | b |'); print('no' + 'ise')"], 30, far)
    assert code == 0
    text = path.read_text()
    assert "## Quick" in text and ": ok, " in text and "| a | b |" in text and "noise" not in text  # only the lines that carry figures
    assert text.strip().endswith("s of the 480 s bound used._") and "cut short or still running" in text.splitlines()[-1]
    # hangs, with a child of its own holding the output open: stopped at its limit, both of them, and the report written
    hang = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('child', c.pid, 'accuracy 1%'); time.sleep(60)"
    began = time.monotonic()
    code, output = gpu_check.step(report, "Hangs", [sys.executable, "-c", hang], 3, far)
    assert code is None and time.monotonic() - began < 15
    text = path.read_text()
    assert "## Quick" in text and "## Hangs" in text and "timed out (limit 3 s)" in text and "accuracy 1%" in text
    stat = Path(f"/proc/{output.split()[1]}/stat")
    for _ in range(50):  # killed with its group: gone, or a zombie until it is reaped
        try:
            if stat.read_text().split(")")[-1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the hung step's child is still running")


def test_gpu_check_stops_at_the_bound_and_runs_nothing_after_it(tmp_path):
    gpu_check = load_gpu_check()
    path = tmp_path / "gpu_check.md"
    report = gpu_check.Report(path, ["# GPU check: test", ""], time.monotonic())
    began = time.monotonic()
    code, _ = gpu_check.step(report, "Long", [sys.executable, "-c", "import time; time.sleep(60)"], 100, began + 2)  # its limit is past the bound
    assert code is None and time.monotonic() - began < 12
    never = tmp_path / "never"
    code, _ = gpu_check.step(report, "After", [sys.executable, "-c", f"open({str(never)!r}, 'w')"], 100, began + 2)
    assert code is None and not never.exists()
    text = path.read_text()
    assert "`: stopped at the 480 s bound, " in text and "not run, the 480 s bound was spent" in text


def run_gpu_check(gpu_check, tmp_path: Path, monkeypatch, fake_step) -> str:
    """gpu_check's main on a faked GPU, its steps run by ``fake_step`` and its run dirs under tmp_path/out: the report."""
    import torch

    monkeypatch.setattr(gpu_check, "step", fake_step)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "a test GPU")
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True, exist_ok=True)
    (root / "test" / "cat" / "0.png").write_bytes(b"")
    report = tmp_path / "gpu_check.md"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--root", str(root), "--report", str(report), "--out", str(tmp_path / "out")])
    assert gpu_check.main() == 0
    return report.read_text()


def test_gpu_check_runs_every_step_under_its_limit_from_the_table(tmp_path, monkeypatch):
    """main's steps, their commands not run: each takes its limit from LIMITS_S and the bound; the report is finished."""
    gpu_check = load_gpu_check()
    ran = []

    def fake_step(report, title, command, limit, deadline):
        assert limit == gpu_check.LIMITS_S[title] and deadline - time.monotonic() <= gpu_check.BUDGET_S
        ran.append(title)
        report.add([f"## {title}", ""])
        return 0, ""

    text = run_gpu_check(gpu_check, tmp_path, monkeypatch, fake_step)
    assert sorted(ran) == sorted(gpu_check.LIMITS_S)  # every step once, every limit used
    assert text.startswith("# GPU check: a test GPU") and text.strip().endswith("s of the 480 s bound used._") and "_finished;" in text
    assert text.count("| 0 | ") == len(gpu_check.PRESETS)  # a row in the presets' table for each


def test_gpu_check_starts_each_call_in_fresh_run_dirs_so_a_cut_step_shows_no_earlier_figures(tmp_path, monkeypatch):
    """The first call's preset steps write their run.json (123.4 images/s); the second call's are cut before they write
    anything: its table shows no figure, and its test.py step names none of the first call's run dirs."""
    gpu_check = load_gpu_check()
    commands = []

    def writes(report, title, command, limit, deadline):
        commands.append(command)
        run_dir = next((Path(arg.partition("=")[2]) for arg in command if arg.startswith("hydra.run.dir=")), None)
        if run_dir is not None:
            run_dir.mkdir(parents=True)
            (run_dir / "run.json").write_text(json.dumps({"images_per_s": 123.4}))
        return 0, ""

    def cut(report, title, command, limit, deadline):
        commands.append(command)
        return None, ""

    first = run_gpu_check(gpu_check, tmp_path, monkeypatch, writes)
    assert first.count("| 123.4 |") == len(gpu_check.PRESETS)
    earlier = {arg.partition("=")[2] for command in commands for arg in command if arg.startswith(("hydra.run.dir=", "ckpt="))}
    commands.clear()
    second = run_gpu_check(gpu_check, tmp_path, monkeypatch, cut)
    assert "123.4" not in second and second.count("| None | ") == len(gpu_check.PRESETS)
    now = {arg.partition("=")[2] for command in commands for arg in command if arg.startswith(("hydra.run.dir=", "ckpt="))}
    assert now and not now & earlier


def load_bench(*names: str):
    """bench/NAME.py as modules, each loaded once under its own name, in the order given: a script imports its siblings
    by name (bench/ is first on its path when it runs), and its dataclasses look their module up in sys.modules."""
    for name in names:
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
    return sys.modules[names[-1]]


def test_throughput_is_put_together_from_its_sibling_modules_and_reads_every_flag(monkeypatch, tmp_path):
    """bench/throughput.py imports its parts as it does when run, and its command line reads each of its flags."""
    throughput = load_bench("clock", "flop_limit", "profiles", "variants", "throughput")
    variants = ["--device", "cpu", "--steps", "7", "--warmup", "2", "--batch", "16", "--best-batch", "64", "--best-steps", "3", "--data", "fake"]
    variants += ["--seed", "5", "--precision", "32-true", "--threads", "1", "--skip", "compile", "best", "--rounds", "2", "--ops", "4"]
    monkeypatch.setattr(sys, "argv", ["throughput.py", *variants, "--data-dir", str(tmp_path)])
    args = throughput.parse_args()
    assert (args.steps, args.warmup, args.batch, args.best_batch, args.best_steps, args.seed, args.rounds, args.ops) == (7, 2, 16, 64, 3, 5, 2, 4)
    assert (args.data, args.precision, args.threads, args.skip, args.data_dir, args.flop_mode) == (
        "fake",
        "32-true",
        1,
        ["compile", "best"],
        tmp_path,
        False,
    )
    flops = ["--flops", "--nets", "budget", "--run-dir", str(tmp_path), "--profile", "fast"]
    monkeypatch.setattr(sys, "argv", ["throughput.py", *flops])
    args = throughput.parse_args()
    assert (args.flop_mode, args.nets, args.run_dir, args.profile, args.steps, args.warmup) == (True, ["budget"], [tmp_path], ["fast"], 20, 5)


def test_flops_per_image_of_a_linear_net_and_of_cpu_attention_match_the_hand_count():
    """vit.flops (bench/throughput.py --flops) counts a training step as forward + backward: the hand count of a 2-layer MLP
    (the first layer's backward has no input gradient to make), and the CPU's fused attention, which FlopCounterMode alone
    counts as 0."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from vit.flops import count_step_flops

    batch, n_in, hidden, out = 4, 3 * 4 * 4, 32, 10
    net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, out))
    x, y = torch.randn(batch, 3, 4, 4), torch.randint(0, out, (batch,))
    forward = 2 * (n_in * hidden + hidden * out)
    backward = 2 * (2 * hidden * out) + 2 * n_in * hidden  # layer 2: input and weight gradients; layer 1: weight gradient only
    flops, optimizer_flops = count_step_flops(net, x, y, torch.optim.Adam(net.parameters()))
    assert (flops / batch, optimizer_flops) == (forward + backward, 0)  # Adam is elementwise: nothing counted

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            q = self.proj(x).view(2, 2, 16, 4)  # (b, heads, tokens, head dim)
            return F.scaled_dot_product_attention(q, q, q).flatten(1)[:, :10]

    flops, _ = count_step_flops(Attention(), torch.randn(2, 16, 8), torch.randint(0, 10, (2,)))
    bmm = 2 * (2 * 2) * 16 * 4 * 16  # one (tokens x dim) @ (dim x tokens) per batch and head
    projection = 2 * (2 * 16) * 8 * 8  # 32 token rows through an 8 x 8 map
    assert flops == 2 * projection + 7 * bmm  # the projection's forward and weight gradient; attention's 2 forward and 5 backward products


def test_matmul_peak_is_a_rate_and_a_run_dir_share_adds_its_epochs(trained_run):
    import torch

    flop_limit = load_bench("clock", "flop_limit")
    assert flop_limit.matmul_peak(torch.device("cpu"), n=64, repeats=2) > 0
    share = flop_limit.run_share(trained_run, torch.device("cpu"), peak=1e12)
    assert share["epochs"] == 1 and share["images"] > 0 and list(share["sides"]) == [32]
    assert share["flops"] == share["flops_per_image"][32] * share["images"] > 0
    assert share["share"] == share["flops"] / share["train_time_s"] / 1e12


def test_time_to_accuracy_names_its_experiment_once():
    done = subprocess.run(
        [sys.executable, "bench/time_to_accuracy.py", "--experiment", "budget", "--ours", "experiment=fast"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "--experiment budget and --ours experiment=fast: name the experiment once" in done.stderr


def test_time_to_accuracy_tests_no_epoch_checkpoint_without_a_picture(tmp_path):
    """Each epoch checkpoint tested after the race is one more read of the test split: only --png asks for them."""
    command = [sys.executable, "bench/time_to_accuracy.py", "--data", "fake", "--skip-manual", "--data-dir", str(tmp_path), "--target", "0.99"]
    done = subprocess.run(
        [*command, "--ours", "trainer.max_epochs=2", "data.train_size=256", "data.test_size=64", "data.val_size=64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ours: epoch" not in done.stdout and "Accuracy on test set" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| ours: "))
    assert row.split(" | ")[1] == "2", row  # the epochs it trained, not the checkpoints it tested


def test_a_flops_row_runs_in_its_precision_and_is_judged_against_the_peak_of_its_dtype(capsys, tmp_path):
    """--flops times each net's step in the precision it trains in and gives its share of that dtype's peak, not fp32's."""
    import argparse

    import torch

    flop_limit = load_bench("clock", "flop_limit")
    cfg = flop_limit.compose_net(["model.emb_size=16", "model.depth=1", "model.num_heads=2", "model.patch_size=8"], tmp_path)
    args = argparse.Namespace(device=torch.device("cpu"), seed=0, warmup=1, steps=2, precision="bf16-mixed")
    row = flop_limit.time_flop_row(args, "tiny", cfg, 32)
    assert row.dtype == torch.bfloat16 and row.images_per_s > 0
    args.precision = "32-true"
    assert flop_limit.time_flop_row(args, "tiny", cfg, 32).dtype == torch.float32
    row.images_per_s, row.cpu_images_per_s = 1e9 / row.flops_per_image, 1e9 / row.flops_per_image  # 1 GFLOP/s exactly
    flop_limit.print_flop_table([row], {torch.bfloat16: (4e9, 2e9), torch.float32: (1e9, 1e9)})
    cells = [cell.strip() for cell in capsys.readouterr().out.splitlines()[-1].split("|")]
    assert cells[4] == "bf16" and cells[-2:] == ["25.0%", "50.0%"]
