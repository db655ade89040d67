"""python -m vit.reproduce: the registry (docs/frontier.json), the verdicts, and the README and the frontier picture
agreeing with the registry; end to end on a tiny row (slow)."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONF, ROOT, TINY
from vit import registry, reproduce, train_process, verdicts
from vit.cli import check_overrides
from vit.errors import ConfigError

README = ROOT / "README.md"
MACHINES = {
    "race": {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "manual_images_per_s": 199, "manual_source": "the race", "date": "2026-11-29"},
    "busy": {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 1, "manual_images_per_s": None, "manual_source": "not measured"},
    "xeon": {
        "cpu": "Intel Xeon",
        "cores": 2,
        "torch_threads": 2,
        "manual_images_per_s": None,
        "manual_source": "not measured",
        "manual_estimate": [220, 240],
        "manual_estimate_source": "other sessions",
    },
}


def result(seed, accuracy, seconds, machine, **extra):
    return {"seed": seed, "accuracy": accuracy, "seconds": seconds, "machine": machine, "source": "a test", **extra}


def row(name, results, command="python train.py experiment=fast", frontier=None):
    return {"name": name, "what": name, "command": command, "results": results, "frontier": frontier}


def write_registry(path: Path, rows, machines=MACHINES) -> Path:
    path.write_text(json.dumps({"machines": machines, "rows": rows, "anchors": []}))
    return path


@pytest.fixture
def fast(tmp_path) -> registry.Row:
    """A row like fast's: seed 42 timed where the manual's loop was, seeds 0 and 1 timed where it was not."""
    rows = [row("fast", [result(42, 70.13, 321.8, "race"), result(0, 71.01, 602, "busy"), result(1, 69.64, 594, "busy")])]
    return registry.load_registry(write_registry(tmp_path / "registry.json", rows)).row("fast")


# Verdicts -----------------------------------------------------------------------------------------------------------


def test_a_time_is_scaled_by_the_two_machines_manual_loop_speeds(fast):
    assert verdicts.expected_seconds(300, 200, 100) == 600  # a machine half as fast at the manual's loop: twice the time
    assert verdicts.expected_seconds(322, 199, 150.2) == pytest.approx(426.6178, abs=1e-4)  # worked out by hand
    lines = verdicts.time_verdicts(fast, 42, 412, 150.2)
    assert lines[0] == (
        "time 412 s; recorded 322 s (seed 42) on AMD EPYC (2 cores, 2 torch threads, 2026-11-29) at 199 manual images/s, "
        "this machine 150.2 -> expected 426 s: 0.97x"
    )
    # Seeds 0 and 1 were timed where the manual's loop was not: no line for them under seed 42, an unscaled one under seed 0.
    assert len(lines) == 2 and lines[1].startswith("time spread: one recorded run scales to this machine (426 s)")
    lines = verdicts.time_verdicts(fast, 0, 700, 150.2)
    assert "expected 426 s: 1.64x" in lines[0]
    assert lines[1].startswith("time 700 s; recorded 602 s (seed 0) on AMD EPYC (2 cores, 1 torch thread)")
    assert lines[1].endswith("no manual-loop speed was measured there, so that time can't be scaled to this machine")


def test_a_time_without_a_manual_speed_is_not_scaled_but_an_estimate_gives_a_rough_range(tmp_path):
    budget = registry.load_registry(write_registry(tmp_path / "r.json", [row("budget", [result(42, 83.14, 1873, "xeon")])])).row("budget")
    (line,) = verdicts.time_verdicts(budget, 42, 2000, 200.0)
    assert "can't be scaled to this machine" in line
    # 1873 s at 220 and 240 manual images/s there, 200 here: 2,060.3 and 2,247.6 s; 2000 s is 0.97x and 0.89x of them
    assert "at the 220-240 manual images/s measured in other sessions, expected 2,060-2,248 s, 0.89-0.97x)" in line
    assert verdicts.expectation(budget, 42, 200.0) is None


def test_the_accuracy_is_judged_against_the_recorded_seeds_spread(fast):
    assert verdicts.accuracy_verdict(fast, 42, 70.31) == (
        "seed 42: 70.31% (recorded 70.13%; seeds 42, 0, 1 span 69.64-71.01% over 3 runs): within the spread"
    )
    assert verdicts.accuracy_verdict(fast, 42, 68.5).endswith(": 1.14 points below the spread")
    assert verdicts.accuracy_verdict(fast, 0, 71.5).endswith(": 0.49 points above the spread")
    assert verdicts.accuracy_verdict(fast, 7, 70.0).startswith("seed 7: 70.00% (no run of seed 7 recorded; seeds 42, 0, 1 span")
    assert "the run printed none" in verdicts.accuracy_verdict(fast, 42, None)


def test_one_recorded_run_has_no_spread_only_a_difference(tmp_path):
    one = registry.load_registry(write_registry(tmp_path / "r.json", [row("one", [result(42, 76.9, 1543, "busy", note="a note")])])).row("one")
    assert verdicts.accuracy_verdict(one, 42, 77.1) == "seed 42: 77.10% (recorded 76.90% (a note), one run: no spread): 0.20 points above it"
    assert verdicts.accuracy_verdict(one, 3, 76.9).endswith("(no run of seed 3 recorded; seed 42's one run: 76.90%): the same")


def test_the_expected_time_is_said_before_the_run(fast):
    assert verdicts.expectation(fast, 0, 150.2) == "expect about 426 s here (322 s recorded on AMD EPYC at 199 manual images/s)"


def test_the_time_verdict_gives_the_recorded_runs_spread_after_scaling_and_whether_this_run_is_inside_it(tmp_path):
    machines = {**MACHINES, "slow": {**MACHINES["race"], "manual_images_per_s": 100}, "quick": {**MACHINES["race"], "manual_images_per_s": 180}}
    rows = [row("two", [result(42, 70.0, 150, "slow"), result(0, 71.0, 100, "quick"), result(1, 70.5, 500, "busy")])]
    two = registry.load_registry(write_registry(tmp_path / "r.json", rows, machines)).row("two")
    # At 150 manual images/s here, 150 s at 100 moves to 100 s and 100 s at 180 to 120 s; the unscaled 500 s is no part of it.
    span = "time spread: the row's 2 runs with a manual-loop speed, scaled to this machine, span 100-120 s (20% apart); "
    assert verdicts.time_verdicts(two, 42, 110, 150.0)[-1] == span + "this run's 110 s is inside it"
    assert verdicts.time_verdicts(two, 42, 132, 150.0)[-1] == span + "this run's 132 s is 10% above it"
    assert verdicts.time_verdicts(two, 42, 90, 150.0)[-1] == span + "this run's 90 s is 10% below it"
    one = registry.load_registry(write_registry(tmp_path / "o.json", [row("one", [result(42, 70.0, 150, "slow")])], machines)).row("one")
    assert verdicts.time_verdicts(one, 42, 90, 150.0)[-1].endswith("one recorded run scales to this machine (100 s): no spread to judge this run by")


# One row's rerun, its child train.py faked ----------------------------------------------------------------------------


@pytest.fixture
def fake_train(monkeypatch):
    """reproduce's child ``python train.py`` faked: in 110 s it writes what train.py writes (metrics.json with 70%,
    run.json with its precision) where train.py would (the last paths.output_dir, else hydra.run.dir, relative to the
    root); the manual's loop here runs at 150 images/s. Returns each child's arguments."""
    started = []

    def stream(run) -> int:
        value = lambda key: reproduce.last_value(run.args, key)  # noqa: E731
        out = Path(value("paths.output_dir") or value("hydra.run.dir"))
        out = out if out.is_absolute() else ROOT / out
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"test/acc": 0.7}))
        (out / "run.json").write_text(json.dumps({"precision": value("trainer.precision") or "bf16-mixed"}))
        run.seconds = 110.0
        return 0

    monkeypatch.setattr(train_process.Run, "start", lambda run: started.append(run.args))
    monkeypatch.setattr(train_process.Run, "stream", stream)
    monkeypatch.setattr(reproduce, "manual_images_per_s", lambda *args, **kwargs: 150.0)
    return started


def cpu_row(tmp_path: Path) -> Path:
    """A CPU row recorded in 32-true, its two times 100 and 120 s once scaled to 150 manual images/s."""
    machines = {**MACHINES, "slow": {**MACHINES["race"], "manual_images_per_s": 100}, "quick": {**MACHINES["race"], "manual_images_per_s": 180}}
    entry = {
        **row("cpu", [result(42, 70.0, 150, "slow"), result(0, 71.0, 100, "quick")], command="python train.py data=fake"),
        "precision": "32-true",
    }
    return write_registry(tmp_path / "registry.json", [entry], machines)


def verdict_lines(out: str) -> list[str]:
    """The lines after the run that judge it: the accuracy (``seed N: ...``) and the indented ones under it but the run dir."""
    lines = out.split("\nseed 42: ", 1)[1].splitlines()
    return ["seed 42: " + lines[0], *(line for line in lines[1:] if line.startswith("  ") and not line.startswith("  run dir:"))]


def test_with_a_gpu_here_a_cpu_row_is_rerun_on_the_cpu_as_recorded(tmp_path, fake_train, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reproduce.main(["cpu", "--registry", str(cpu_row(tmp_path)), "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    (args,) = fake_train
    assert "trainer.accelerator=cpu" in args and "trainer.precision=32-true" in args
    assert "device: cpu, as recorded (a CUDA GPU is here, the row's results ran on CPUs; trainer.accelerator=cpu added to the command)" in out
    assert "this run's 110 s is inside it" in out


def test_a_gpu_run_against_cpu_records_gets_no_time_verdict(tmp_path, fake_train, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = ["cpu", "trainer.accelerator=gpu", "--registry", str(cpu_row(tmp_path)), "--out", str(tmp_path / "runs")]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    times = [line for line in verdict_lines(out) if line.startswith("  time")]
    assert times == [
        "  time 110 s on a GPU; the row's times were recorded on CPUs: no time verdict (a GPU run is not compared with CPU records)"
        " (with trainer.accelerator=gpu: not the recorded command)"
    ]
    assert "expected" not in out and "expect about" not in out
    assert "the manual's loop not timed: no time of this row on a GPU can be scaled by it" in out  # no work spent on it


def test_the_not_the_recorded_command_note_stands_on_every_line_it_touches(tmp_path, fake_train, capsys):
    argv = ["cpu", "trainer.max_epochs=1", "--registry", str(cpu_row(tmp_path)), "--out", str(tmp_path / "runs")]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    note = " (with trainer.max_epochs=1: not the recorded command)"
    lines = verdict_lines(out)
    assert [line for line in lines if not line.endswith(note)] == []
    assert len(lines) == 5  # accuracy, precision, 2 times, their spread
    assert re.search(r"^expect about [\d,]+ s here .*" + re.escape(note) + "$", out, flags=re.MULTILINE)


def test_a_users_paths_output_dir_holds_the_runs_and_their_verdicts_read_them(tmp_path, fake_train, capsys):
    assert reproduce.main(["cpu", f"paths.output_dir={tmp_path / 'mine'}", "--registry", str(cpu_row(tmp_path))]) == 0
    out = capsys.readouterr().out
    (args,) = fake_train
    assert (tmp_path / "mine" / "seed42" / "metrics.json").is_file() and f"hydra.run.dir={tmp_path / 'mine' / 'seed42'}" in args
    assert "\nseed 42: 70.00% (recorded 70.00%; seeds 42, 0 span 70.00-71.00% over 2 runs): within the spread\n" in out  # no note
    assert "  precision: 32-true, the same as the row's (32-true)" in out
    with pytest.raises(ConfigError, match=r"^--out .* and paths.output_dir=.* name two places for the runs: give one of them$"):
        reproduce.output_dir(tmp_path / "elsewhere", [f"paths.output_dir={tmp_path / 'mine'}"])


def test_the_manual_rows_time_lines_say_they_compare_two_projections(tmp_path, monkeypatch, capsys):
    machines = {"slow": {**MACHINES["race"], "manual_images_per_s": 100}, "quick": {**MACHINES["race"], "manual_images_per_s": 180}}
    results = [result(42, 67.09, 6000, "slow", projected=True), result(42, 67.09, 3000, "quick", projected=True)]
    path = write_registry(tmp_path / "m.json", [row("manual", results, command="python bench/time_to_accuracy.py --data fake")], machines)
    monkeypatch.setattr(reproduce, "manual_projection", lambda *args, **kwargs: (3900.0, 150.0))
    assert reproduce.main(["manual", "--registry", str(path)]) == 0
    times = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  time")]
    label = " (a projection on both sides: the manual's 20 epochs projected from its timed steps, here as recorded)"
    assert [line for line in times if not line.endswith(label)] == []
    assert len(times) == 3  # two recorded projections, then their spread: 3,600-4,000 s here
    assert times[0].startswith("  time projected 3,900 s; recorded projected 6,000 s (seed 42)")
    assert "span 3,600-4,000 s (11% apart); this run's projected 3,900 s is inside it" in times[-1]


# The command line ---------------------------------------------------------------------------------------------------


def test_an_unknown_name_is_one_line_listing_the_names(capsys):
    assert reproduce.main(["nope"]) == 1
    err = capsys.readouterr().err
    names = ", ".join(r.name for r in registry.load_registry().rows)
    assert err == f"Error: no result named 'nope': use one of {names} (python -m vit.reproduce --list)\n"
    assert reproduce.main([]) == 1
    assert capsys.readouterr().err.startswith(f"Error: name a result: python -m vit.reproduce NAME, NAME one of {names}")


def test_list_prints_every_row_with_its_command(capsys):
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    for r in registry.load_registry().rows:
        assert re.search(rf"^{r.name} +{r.headline.accuracy:.2f}%", out, flags=re.MULTILINE)
        assert r.command in out


def test_seeds_and_overrides_are_split_and_a_run_dir_override_refused(fast, tmp_path):
    assert reproduce.split_seeds(fast, []) == ([42], [])
    assert reproduce.split_seeds(fast, ["seed=0,1", "trainer.max_epochs=1"]) == ([0, 1], ["trainer.max_epochs=1"])
    with pytest.raises(ConfigError, match=r"^seed=x is not a seed: give an integer"):
        reproduce.split_seeds(fast, ["seed=x"])
    with pytest.raises(ConfigError, match=r"give --out DIR instead of hydra.run.dir="):
        reproduce.split_seeds(fast, ["hydra.run.dir=/tmp/x"])
    manual = registry.load_registry(
        write_registry(
            tmp_path / "m.json", [row("manual", [result(42, 67.09, 5029, "race")], command="python bench/time_to_accuracy.py --data fake")]
        )
    ).row("manual")
    assert manual.kind == "manual" and reproduce.row_data(manual, []) == ("fake", None)
    with pytest.raises(ConfigError, match=r"takes seed=N and data.root=DIR only, not trainer.max_epochs=1$"):
        reproduce.split_seeds(manual, ["trainer.max_epochs=1"])


def test_a_broken_registry_is_one_line_naming_what_is_missing(tmp_path):
    path = write_registry(tmp_path / "r.json", [{"name": "x", "command": "python train.py"}])
    with pytest.raises(ConfigError, match=r"row 0 lacks what, results, frontier: give it name, what, command, results, frontier$"):
        registry.load_registry(path)
    path = write_registry(tmp_path / "r.json", [row("x", [result(42, 70.0, 10, "nowhere")])])
    with pytest.raises(ConfigError, match=r"row x, result 0 names the machine 'nowhere': define it under machines$"):
        registry.load_registry(path)
    path = write_registry(tmp_path / "r.json", [row("x", [result(42, 70.0, 10, "race")], command="python other.py")])
    with pytest.raises(ConfigError, match=r"row x's command must start with 'python train.py'"):
        registry.load_registry(path)


# The registry against the project, the README and the picture -----------------------------------------------------------

REGISTRY = registry.load_registry()
TIME = re.compile(r"(?<![\d.,-])(?:(\d+) min (\d+) s\b|(\d[\d,]*(?:\.\d+)?) (s|min)\b)")
ACCURACY = re.compile(r"(\d+\.\d\d)(?:-(\d+\.\d\d))?%")


def times(text: str) -> list[tuple[float, float]]:
    """(seconds, tolerance) of each single time said in ``text`` ("8 min 43 s", "1,873 s", "5.4 min", "118 min"),
    the tolerance its rounding; a range ("53-56 min") is a derived figure and not read."""
    found = []
    for minutes, secs, number, unit in TIME.findall(text):
        if minutes:
            found.append((60 * int(minutes) + int(secs), 0.5))
            continue
        value, decimals = float(number.replace(",", "")), len(number.partition(".")[2])
        scale = 60 if unit == "min" else 1
        found.append((value * scale, 0.5 * 10**-decimals * scale))
    return found


def said(seconds: float, mentions: list[tuple[float, float]]) -> bool:
    return any(abs(seconds - value) <= tolerance + 1e-6 for value, tolerance in mentions)


def accuracies(text: str) -> set[str]:
    return {a for pair in ACCURACY.findall(text) for a in pair if a}


def table(heading_cells: str, page: Path = README) -> list[list[str]]:
    """The cells of the table on ``page`` whose header row starts with ``heading_cells``."""
    lines = page.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading_cells)), None)
    assert start is not None, f"{page.name} has no table starting {heading_cells!r}"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


# docs/results.md, the registry's full table, is written from it (tests/test_results_page.py); these are the tables
# that quote it by hand: the README's presets and docs/experiments.md's presets by hardware.
PRESETS = table("| preset | for what | test accuracy | time on a 2-core CPU | re-check |")
HARDWARE = table("| hardware | command | time | check it |", ROOT / "docs" / "experiments.md")
# (row label, the text its figures are in, the rows it names)
PRESETS_CHECKED = [(cells[0], f"{cells[2]}; {cells[3]}", cells[4]) for cells in PRESETS if "vit.reproduce" in cells[4]]
HARDWARE_CHECKED = [(cells[0], cells[2], cells[3]) for cells in HARDWARE if "vit.reproduce" in cells[3]]
CHECKED = PRESETS_CHECKED + HARDWARE_CHECKED
PROJECTED = re.compile(r"([\d,]+) s projected")
SHARE = re.compile(r"\b1/(\d+(?:\.\d+)?)\b")


def test_the_tables_times_name_the_rows_they_come_from():
    assert len(PRESETS_CHECKED) >= 5, "the README's presets no longer name their rows (python -m vit.reproduce NAME)"
    assert len(HARDWARE_CHECKED) >= 4, "docs/experiments.md's hardware table no longer names its rows"
    untimed = [cells[0] for cells in PRESETS if "vit.reproduce" not in cells[4] and times(cells[3])]
    assert untimed == []
    timed = [cells[0] for cells in HARDWARE if times(cells[2]) and "vit.reproduce" not in cells[3]]
    assert timed == ["any machine, to check the setup"]  # the one time not from the registry: a smoke run on fake data


@pytest.mark.parametrize(("label", "text", "names"), CHECKED, ids=[c[0] for c in CHECKED])
def test_each_quoted_time_and_accuracy_is_the_registrys(label, text, names):
    entries = [REGISTRY.row(name) for name in re.findall(r"vit\.reproduce (\w+)", names)]
    mentions = times(text)
    results = [r for entry in entries for r in entry.results]
    for entry in entries:
        assert said(entry.headline.seconds, mentions), f"{entry.name}'s {entry.headline.seconds:,.0f} s is not said"
        if entry.headline.machine.cpu:
            assert entry.headline.machine.cpu in text
        if entry.headline.machine.manual_images_per_s:
            assert f"{entry.headline.machine.manual_images_per_s:g} manual images/s" in text
    timed = [r.seconds for r in results if r.seconds is not None]
    assert [value for value, tolerance in mentions if not said(value, [(s, tolerance) for s in timed])] == []
    assert accuracies(text) <= {f"{r.accuracy:.2f}" for r in results}


@pytest.mark.parametrize("cells", [c for c in PRESETS if "vit.reproduce" in c[4]], ids=lambda cells: cells[0])
def test_each_preset_says_its_headline_accuracy_and_its_share_of_the_manuals_time(cells):
    """The share ("1/4.67") is worked out here from the registry: the manual's projected time on the result's machine,
    as its manual_source records it, over the result's time."""
    (entry,) = [REGISTRY.row(name) for name in re.findall(r"vit\.reproduce (\w+)", cells[4])]
    assert f"{entry.headline.accuracy:.2f}%" in cells[2]
    shares = []
    for r in entry.results:
        projected = PROJECTED.search(r.machine.manual_source or "")
        if projected and r.seconds and not r.projected:
            shares.append(float(projected.group(1).replace(",", "")) / r.seconds)
    said_shares = SHARE.findall(cells[3])
    for share in said_shares:
        assert any(abs(float(share) - s) <= 0.5 * 10 ** -len(share.partition(".")[2]) for s in shares), f"1/{share}"
    assert bool(said_shares) == bool(shares), "a preset timed beside the manual's loop says its share, and only such a one"


def test_the_frontier_picture_is_drawn_from_the_registry():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "bench" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    points = frontier.load(registry.REGISTRY)
    drawn = [r for r in REGISTRY.rows if r.frontier]
    assert [p["name"] for p in points if "name" in p] == [r.name for r in drawn]
    for point, entry in zip(points, drawn):
        assert point["minutes"] == pytest.approx(entry.headline.seconds / 60, abs=0.01)
        assert point["accuracy"] == entry.headline.accuracy
        assert point.get("spread", [entry.headline.accuracy] * 2) == list(entry.spread)
    assert len(points) == len(drawn) + len(REGISTRY.anchors)


@pytest.mark.parametrize("entry", [r for r in REGISTRY.rows if r.kind == "train"], ids=lambda r: r.name)
def test_every_rows_command_is_a_valid_command_today(entry):
    check_overrides(CONF, "train", entry.args)


# End to end (slow) --------------------------------------------------------------------------------------------------


def tiny_registry(tmp_path: Path, epochs: int) -> Path:
    machines = {"here": {"cpu": "Test CPU", "cores": 2, "torch_threads": 1, "manual_images_per_s": 100.0, "manual_source": "made up"}}
    command = "python train.py " + " ".join([*TINY, f"trainer.max_epochs={epochs}"])
    return write_registry(tmp_path / "registry.json", [row("tiny", [result(42, 10.0, 30, "here")], command=command)], machines)


def run_reproduce(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vit.reproduce", *args, "--manual-steps", "2", "--manual-warmup", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_a_tiny_row_is_run_timed_and_judged(tmp_path):
    out = tmp_path / "runs"
    process = run_reproduce("tiny", "--registry", str(tiny_registry(tmp_path, 1)), "--out", str(out))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    accuracy = 100 * json.loads((out / "seed42" / "metrics.json").read_text())["test/acc"]
    assert f"Accuracy on test set: {accuracy:.2f}%" in stdout  # the run's own output, passed through
    assert f"\nseed 42: {accuracy:.2f}% (recorded 10.00%, one run: no spread): " in stdout
    assert re.search(
        r"\n  time \d+ s; recorded 30 s \(seed 42\) on Test CPU .* at 100 manual images/s, this machine [\d.]+ -> expected [\d,]+ s: [\d.]+x\n",
        stdout,
    )
    assert "the manual's loop: " in stdout and f"run dir: {out / 'seed42'}" in stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_run_keeps_its_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "runs"
    process = run_reproduce("tiny", "--registry", str(tiny_registry(tmp_path, 500)), "--out", str(out))
    last = out / "seed42" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"Stopped: {out / 'seed42'} kept, with checkpoints/")
    assert "ckpt_path=" in stderr.strip().splitlines()[-1]
    left = [p for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]
    assert left == [], "the training run outlived vit.reproduce"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
