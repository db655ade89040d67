"""Any result re-run by one command, and compared with what was recorded:

    python -m vit.reproduce --list                  # the results, by name
    python -m vit.reproduce fast                    # the row's command, with its first recorded seed
    python -m vit.reproduce fast seed=0,1           # one run per seed
    python -m vit.reproduce fast data.root=DIR      # other key=value arguments go to train.py as they are

The results live in one registry, ``docs/frontier.json`` (its ``schema`` says what each field holds), which the
README's results table and ``bench/frontier.py``'s picture are checked against / drawn from. For a row whose
command is ``python train.py ...`` this first times a slice of the manual's training loop as printed
(``vit.manual.Recipe.time_slice``, as ``bench/time_to_accuracy.py`` does) on this machine and the row's data, then
runs the command in a subprocess (its output and progress bar shown as they come, run dir ``--out``/seed<N>), timed
from its start to its ``Accuracy on test set`` line, and prints one verdict per seed: the accuracy against the
recorded seeds' spread, and the time against each recorded time scaled by the two machines' speeds of the manual's
loop, then their spread and whether this run is inside it. Where no manual-loop speed was measured with a recorded
time, the verdict says that time can't be scaled. A row recorded on CPUs reruns on the CPU where a GPU is here
(``trainer.accelerator=cpu``, as its ``trainer.precision``); a GPU run gets no time verdict against CPU records. The
``manual`` row (the manual's own code, its time projected) is checked by projecting its time here.

Ctrl-C stops the run as Ctrl-C stops ``train.py`` (a checkpoint to resume from), says in one line what was kept
and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "docs" / "frontier.json"
TRAIN = "python train.py"
MANUAL = "python bench/time_to_accuracy.py"
ACCURACY_LINE = re.compile(rb"Accuracy on test set: ([\d.]+)%")
STOP_GRACE_S = 120  # how long a stopped run may take to write its checkpoint and exit before it is terminated

DEVICES = {"cpu": "CPU", "gpu": "GPU"}  # a machine's device, as a verdict names it

MACHINE_KEYS = ("cpu", "cores", "torch_threads", "manual_images_per_s", "manual_source")
ROW_KEYS = ("name", "what", "command", "results", "frontier")
RESULT_KEYS = ("seed", "accuracy", "seconds", "machine", "source")


# The registry ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    key: str
    cpu: str | None
    cores: int | None
    torch_threads: int | None
    manual_images_per_s: float | None
    manual_source: str
    date: str | None = None
    conditions: str | None = None
    manual_estimate: tuple[float, float] | None = None
    manual_estimate_source: str | None = None
    device: str = "cpu"  # where its figures ran: cpu, or gpu (a machine entry's optional ``device``)

    def describe(self) -> str:
        """``AMD EPYC (2 cores, 2 torch threads, 2026-11-29)``: what the registry knows of it."""
        details = [
            f"{self.cores} cores" if self.cores else None,
            f"{self.torch_threads} torch thread{'s' if self.torch_threads != 1 else ''}" if self.torch_threads else None,
            self.date,
        ]
        inside = ", ".join(d for d in details if d)
        return f"{self.cpu or 'a CPU of unrecorded model'}" + (f" ({inside})" if inside else "")


@dataclass(frozen=True)
class Result:
    seed: int
    accuracy: float  # percent
    seconds: float | None
    machine: Machine
    source: str
    projected: bool = False
    note: str | None = None  # on the result
    time_note: str | None = None  # on its time


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    command: str
    results: tuple[Result, ...]
    frontier: dict[str, Any] | None
    precision: str | None = None  # what its results trained in (trainer.precision), which a rerun keeps

    @property
    def kind(self) -> str:
        """``train``: the command is ``python train.py ...``; ``manual``: the manual's projected time."""
        return "train" if self.command.startswith(TRAIN + " ") or self.command == TRAIN else "manual"

    @property
    def args(self) -> list[str]:
        """The command's arguments after ``python train.py`` (or after the benchmark script)."""
        return shlex.split(self.command)[2:]

    @property
    def headline(self) -> Result:
        return self.results[0]

    @property
    def seeds(self) -> list[int]:
        """The recorded seeds, each once, in the registry's order."""
        return list(dict.fromkeys(r.seed for r in self.results))

    @property
    def device(self) -> str:
        """Where its headline result ran: ``cpu`` (every machine of the registry so far) or ``gpu``."""
        return self.headline.machine.device

    @property
    def spread(self) -> tuple[float, float]:
        accuracies = [r.accuracy for r in self.results]
        return min(accuracies), max(accuracies)


@dataclass(frozen=True)
class Registry:
    path: Path
    machines: dict[str, Machine]
    rows: tuple[Row, ...]
    anchors: tuple[dict[str, Any], ...]

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise ConfigError(f"no result named {name!r}: use one of {', '.join(r.name for r in self.rows)} (python -m vit.reproduce --list)")


def _missing(entry: Any, keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {where} is not an object: give it {', '.join(keys)}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ConfigError(f"{path}: {where} lacks {', '.join(missing)}: give it {', '.join(keys)}")


def load_registry(path: Path = REGISTRY) -> Registry:
    """The registry at ``path``; a field missing or a machine not defined is one ConfigError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the results registry {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("machines"), dict):
        raise ConfigError(f"{path} is not a results registry: it needs machines and rows (see the schema in docs/frontier.json)")
    machines = {}
    for key, entry in data["machines"].items():
        _missing(entry, MACHINE_KEYS, f"machine {key}", path)
        estimate = entry.get("manual_estimate")
        machines[key] = Machine(
            key=key,
            cpu=entry["cpu"],
            cores=entry["cores"],
            torch_threads=entry["torch_threads"],
            manual_images_per_s=entry["manual_images_per_s"],
            manual_source=entry["manual_source"],
            date=entry.get("date"),
            conditions=entry.get("conditions"),
            manual_estimate=tuple(estimate) if estimate else None,
            manual_estimate_source=entry.get("manual_estimate_source"),
            device=entry.get("device", "cpu"),
        )
    rows, names = [], set()
    for i, entry in enumerate(data["rows"]):
        _missing(entry, ROW_KEYS, f"row {i}", path)
        name = entry["name"]
        if name in names:
            raise ConfigError(f"{path}: two rows are named {name}: give each row its own name")
        names.add(name)
        if not (entry["command"].startswith((TRAIN + " ", MANUAL + " ")) or entry["command"] == TRAIN):
            raise ConfigError(f"{path}: row {name}'s command must start with '{TRAIN}' (or '{MANUAL}' for the manual's projection)")
        if not entry["results"]:
            raise ConfigError(f"{path}: row {name} has no results: give it at least one")
        results = []
        for j, result in enumerate(entry["results"]):
            _missing(result, RESULT_KEYS, f"row {name}, result {j}", path)
            if result["machine"] not in machines:
                raise ConfigError(f"{path}: row {name}, result {j} names the machine {result['machine']!r}: define it under machines")
            results.append(
                Result(
                    seed=int(result["seed"]),
                    accuracy=float(result["accuracy"]),
                    seconds=None if result["seconds"] is None else float(result["seconds"]),
                    machine=machines[result["machine"]],
                    source=result["source"],
                    projected=bool(result.get("projected", False)),
                    note=result.get("note"),
                    time_note=result.get("time_note"),
                )
            )
        rows.append(
            Row(
                name=name,
                what=entry["what"],
                command=entry["command"],
                results=tuple(results),
                frontier=entry["frontier"],
                precision=entry.get("precision"),
            )
        )
    return Registry(path=Path(path), machines=machines, rows=tuple(rows), anchors=tuple(data.get("anchors", [])))


def frontier_points(registry: Registry) -> list[dict[str, Any]]:
    """The picture's points (``bench/frontier.py``): each drawn row's headline result, a bar over its recorded
    results, then the published anchors."""
    points = []
    for row in registry.rows:
        if not row.frontier or row.headline.seconds is None:
            continue
        low, high = row.spread
        point = {
            "label": row.frontier["label"],
            "minutes": round(row.headline.seconds / 60, 2),
            "accuracy": row.headline.accuracy,
            "source": f"{row.command} ({row.headline.source}): {row.headline.seconds:,.0f} s",
            "name": row.name,
            **{k: row.frontier[k] for k in ("color", "marker") if k in row.frontier},
        }
        if low != high:
            point["spread"] = [low, high]
        points.append(point)
    return points + [dict(anchor) for anchor in registry.anchors]


# Verdicts ----------------------------------------------------------------------------------------------------------


def seconds_text(seconds: float) -> str:
    return f"{seconds:,.0f} s"


def expected_seconds(recorded_s: float, recorded_images_per_s: float, here_images_per_s: float) -> float:
    """A recorded time moved to this machine: the manual's loop runs ``here/recorded`` as fast here, so should this."""
    return recorded_s * recorded_images_per_s / here_images_per_s


def accuracy_verdict(row: Row, seed: int, accuracy: float | None) -> str:
    """``seed 42: 70.31% (recorded 70.13%, 70.25%; seeds 42, 0, 1 span 69.64-71.01% over 5 runs): within the spread``."""
    recorded = [f"{r.accuracy:.2f}%" + (f" ({r.note})" if r.note else "") for r in row.results if r.seed == seed]
    low, high = row.spread
    if len(row.results) == 1:
        only = row.headline
        context = (
            f"recorded {recorded[0]}, one run: no spread"
            if recorded
            else f"no run of seed {seed} recorded; seed {only.seed}'s one run: {only.accuracy:.2f}%"
        )
    else:
        said = f"recorded {', '.join(recorded)}" if recorded else f"no run of seed {seed} recorded"
        context = f"{said}; seeds {', '.join(map(str, row.seeds))} span {low:.2f}-{high:.2f}% over {len(row.results)} runs"
    if accuracy is None:
        return f"seed {seed}: no test accuracy ({context}): the run printed none (test=false?)"
    accuracy = round(accuracy, 2)
    if len(row.results) == 1:
        difference = accuracy - low
        judged = "the same" if abs(difference) < 0.005 else f"{abs(difference):.2f} points {'below' if difference < 0 else 'above'} it"
    elif accuracy < low:
        judged = f"{low - accuracy:.2f} points below the spread"
    elif accuracy > high:
        judged = f"{accuracy - high:.2f} points above the spread"
    else:
        judged = "within the spread"
    return f"seed {seed}: {accuracy:.2f}% ({context}): {judged}"


def time_verdicts(row: Row, seed: int, seconds: float | None, here_images_per_s: float, device: str = "cpu", projected: bool = False) -> list[str]:
    """One line per recorded time this run is compared with: every one whose machine's manual-loop speed is known
    (scaled to this machine; seeds barely change the time), and this seed's own where it is not (not scaled); then the
    spread of the scaled times, and whether this run is inside it. Times recorded on another device than this run's
    (``device``: cpu or gpu) are not compared: a GPU run says nothing of a CPU's time. ``projected``: the manual's row,
    whose times here and recorded are both projections, labelled so on every line."""
    label = " (a projection on both sides: the manual's 20 epochs projected from its timed steps, here as recorded)" if projected else ""
    measured = "no time (no accuracy line)" if seconds is None else seconds_text(seconds)
    measured = f"projected {measured}" if projected else measured
    recorded_times = [r for r in row.results if r.seconds is not None]
    comparable = [r for r in recorded_times if r.machine.device == device]
    if recorded_times and not comparable:
        elsewhere = " and ".join(sorted({DEVICES[r.machine.device] + "s" for r in recorded_times}))
        return [
            f"time {measured} on a {DEVICES[device]}; the row's times were recorded on {elsewhere}: no time verdict "
            f"(a {DEVICES[device]} run is not compared with {elsewhere}' records)"
        ]
    timed = [r for r in comparable if r.machine.manual_images_per_s or r.seed == seed]
    if not timed:
        return ["time: none recorded for this row's runs"]
    lines = []
    for r in timed:
        what = "projected " if r.projected else ""
        recorded = f"recorded {what}{seconds_text(r.seconds)} (seed {r.seed}) on {r.machine.describe()}"
        if r.time_note:
            recorded += f" ({r.time_note})"
        speed = r.machine.manual_images_per_s
        if speed:
            expected = expected_seconds(r.seconds, speed, here_images_per_s)
            ratio = f": {seconds / expected:.2f}x" if seconds is not None else ""
            lines.append(
                f"time {measured}; {recorded} at {speed:g} manual images/s, this machine {here_images_per_s:.1f} "
                f"-> expected {seconds_text(expected)}{ratio}"
            )
            continue
        line = f"time {measured}; {recorded}: no manual-loop speed was measured there, so that time can't be scaled to this machine"
        if r.machine.manual_estimate:
            low, high = r.machine.manual_estimate
            fast_s, slow_s = (expected_seconds(r.seconds, s, here_images_per_s) for s in (low, high))
            line += (
                f" (rough: at the {low:g}-{high:g} manual images/s measured in {r.machine.manual_estimate_source or 'other sessions'}, "
                f"expected {fast_s:,.0f}-{slow_s:,.0f} s" + (f", {seconds / slow_s:.2f}-{seconds / fast_s:.2f}x)" if seconds is not None else ")")
            )
        lines.append(line)
    spread = time_spread(comparable, seconds, here_images_per_s, measured)
    return [line + label for line in [*lines, *([spread] if spread else [])]]


def time_spread(results: list[Result], seconds: float | None, here_images_per_s: float, measured: str) -> str | None:
    """The recorded runs' times scaled to this machine (those whose machine's manual-loop speed is known): their spread,
    which machines and sessions alone make 14-22% wide within one row, and whether this run's time (``measured``, as
    said) is inside it."""
    scaled = sorted(expected_seconds(r.seconds, r.machine.manual_images_per_s, here_images_per_s) for r in results if r.machine.manual_images_per_s)
    if not scaled:
        return None
    if len(scaled) == 1:
        return f"time spread: one recorded run scales to this machine ({seconds_text(scaled[0])}): no spread to judge this run by"
    low, high = scaled[0], scaled[-1]
    if seconds is None:
        judged = "this run has no time"
    elif seconds < low:
        judged = f"this run's {measured} is {100 * (1 - seconds / low):.0f}% below it"
    elif seconds > high:
        judged = f"this run's {measured} is {100 * (seconds / high - 1):.0f}% above it"
    else:
        judged = f"this run's {measured} is inside it"
    return (
        f"time spread: the row's {len(scaled)} runs with a manual-loop speed, scaled to this machine, span "
        f"{low:,.0f}-{high:,.0f} s ({100 * (high / low - 1):.0f}% apart); {judged}"
    )


def expectation(row: Row, seed: int, here_images_per_s: float, device: str = "cpu") -> str | None:
    """Before a run: how long it should take here, from the first scalable recorded time on this run's device (this seed's first)."""
    scalable = sorted(
        (r for r in row.results if r.seconds is not None and r.machine.manual_images_per_s and r.machine.device == device),
        key=lambda r: r.seed != seed,
    )
    if not scalable:
        return None
    r = scalable[0]
    expected = expected_seconds(r.seconds, r.machine.manual_images_per_s, here_images_per_s)
    return (
        f"expect about {seconds_text(expected)} here ({seconds_text(r.seconds)} recorded on {r.machine.cpu or 'a CPU'} "
        f"at {r.machine.manual_images_per_s:g} manual images/s)"
    )


def list_rows(registry: Registry) -> str:
    lines = []
    for row in registry.rows:
        head = row.headline
        accuracy = f"{head.accuracy:.2f}%"
        if len(row.results) > 1:
            low, high = row.spread
            accuracy += f" ({len(row.results)} runs: {low:.2f}-{high:.2f}%)"
        speed = head.machine.manual_images_per_s
        when = (
            "time not recorded"
            if head.seconds is None
            else f"{'projected ' if head.projected else ''}{seconds_text(head.seconds)} on {head.machine.cpu or 'a 2-core CPU'}"
            + (f" ({speed:g} manual images/s)" if speed else " (manual loop not timed there)")
        )
        lines.append(f"{row.name:<21} {accuracy:<30} {when}\n{'':<22}{row.command}")
    return "\n".join(lines)


# This machine ------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def core_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def last_value(args: list[str], key: str) -> str | None:
    """The value the last ``key=value`` (or ``key value`` for a ``--flag``) in ``args`` gives, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
        elif key.startswith("--") and arg == key and i + 1 < len(args):
            value = args[i + 1]
    return value


def row_data(row: Row, overrides: list[str]) -> tuple[str, Path | None]:
    """(the data's name, the ImageFolder root or None): where the manual's loop is timed, as the row's run reads it."""
    args = [*row.args, *overrides]
    if row.kind == "manual":
        kind, root = last_value(row.args, "--data") or "folder", last_value(row.args, "--root")
        root = last_value(overrides, "data.root") or root
    else:
        kind, root = last_value(args, "data") or "cifar10", last_value(args, "data.root")
    if kind != "folder":
        return kind, None
    if not root:
        raise ConfigError(f"{row.name} reads data=folder without data.root: add data.root=DIR (a folder with train/ and test/)")
    path = Path(root) if Path(root).is_absolute() else ROOT / root
    if not (path / "train").is_dir():
        raise ConfigError(f"data.root={root} has no train/ folder: give the ImageFolder copy of CIFAR-10 with data.root=DIR")
    return kind, path.resolve()


def manual_images_per_s(root: Path | None, seed: int, warmup: int, steps: int, device: str = "cpu") -> float:
    """The manual's loop as printed (``vit.manual``) on ``root`` (an ImageFolder; None: torchvision's FakeData),
    timed over ``steps`` steps after ``warmup``: its training images per second on this machine."""
    return _projection(root, seed, warmup, steps, device, with_test=False).images_per_s


def manual_projection(root: Path | None, seed: int, warmup: int, steps: int, device: str = "cpu") -> tuple[float, float]:
    """(projected seconds of the manual's 20 epochs, its images/s) as ``bench/time_to_accuracy.py`` projects them:
    set-up and test pass timed whole, the epoch from a timed slice."""
    from vit import manual

    p = _projection(root, seed, warmup, steps, device)
    print(
        f"the manual: set-up {p.setup_s:.1f} s, {steps} timed steps at {p.images_per_s:.1f} images/s -> {p.epoch_s:,.0f} s per epoch of "
        f"{p.steps_per_epoch:,} steps, test pass {p.test_s:.1f} s: {manual.NUM_EPOCHS} epochs = {seconds_text(p.total_s)} projected",
        flush=True,
    )
    return p.total_s, p.images_per_s


def _projection(root: Path | None, seed: int, warmup: int, steps: int, device: str, with_test: bool = True) -> Any:
    import torch

    from vit import manual

    p = manual.project(root, torch.device(device), seed, warmup, steps, time.perf_counter, with_test)
    if p is None:
        raise ConfigError(f"the manual's epoch has fewer than {warmup + steps} steps: lower --manual-warmup/--manual-steps")
    return p


def warm_cache(root: Path, data_dir: Path) -> None:
    """Decodes the image files into the project's cache before the clock starts, as the race did (once per machine)."""
    from vit.data import FolderDataModule

    began = time.perf_counter()
    FolderDataModule(root=str(root), data_dir=str(data_dir), val_size=0).setup()
    print(f"decode cache warm in {data_dir / 'cache'} ({time.perf_counter() - began:.1f} s, outside the clock)", flush=True)


# The run -----------------------------------------------------------------------------------------------------------


class Stopped(Exception):
    """SIGTERM, handled as Ctrl-C is."""


@dataclass
class Run:
    """One seed's ``python train.py`` in a subprocess: started, streamed, timed, and stopped cleanly when asked."""

    args: list[str]  # after python train.py, hydra.run.dir included
    run_dir: Path
    process: subprocess.Popen | None = None
    seconds: float | None = None  # from its start to its accuracy line
    interrupted: bool = False
    started: float = 0.0
    stderr_lines: list[bytes] = field(default_factory=list)
    stderr_thread: threading.Thread | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines as they come, the accuracy line when it is printed
        if sys.stdout.isatty():
            env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))  # the progress bar's width through the pipe
        # Its own process group: a Ctrl-C in the terminal reaches this process only, which passes exactly one on.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *self.args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **group,
        )
        self.stderr_thread = threading.Thread(target=self._pass_stderr, daemon=True)
        self.stderr_thread.start()

    def _pass_stderr(self) -> None:
        """The child's stderr to ours as it comes; once stopped, kept back (a traceback of the interrupt says nothing)."""
        for line in iter(self.process.stderr.readline, b""):
            if self.interrupted:
                self.stderr_lines.append(line)
            else:
                write(sys.stderr, line)

    def stream(self) -> int:
        """Passes its stdout through byte by byte (the progress bar's carriage returns too) and times its accuracy line."""
        fd, tail = self.process.stdout.fileno(), b""
        while chunk := os.read(fd, 65536):
            write(sys.stdout, chunk)
            if self.seconds is None:
                tail = (tail + chunk)[-4096:]
                if ACCURACY_LINE.search(tail):
                    self.seconds = time.perf_counter() - self.started
        code = self.process.wait()
        self.stderr_thread.join()
        return code

    def stop(self) -> None:
        """As Ctrl-C stops ``train.py``: one SIGINT (Lightning writes ``interrupted.ckpt`` and exits), then SIGTERM
        after ``STOP_GRACE_S`` or at a second Ctrl-C; its traceback, if the interrupt came before training, not shown."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self.interrupted = True
        process.send_signal(signal.SIGINT)
        deadline, fd = time.monotonic() + STOP_GRACE_S, process.stdout.fileno()
        try:
            while (left := deadline - time.monotonic()) > 0:  # its last lines (what it saved) as they come
                if select.select([fd], [], [], min(left, 1.0))[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    write(sys.stdout, chunk)
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except (subprocess.TimeoutExpired, KeyboardInterrupt, Stopped):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.stderr_thread.join(timeout=5)
        kept = b"".join(self.stderr_lines).decode(errors="replace")
        kept = kept.split("Traceback (most recent call last)")[0].rstrip()
        if kept:
            print(kept, file=sys.stderr)

    def kept(self) -> str:
        """One line: what the stopped run left, and how to go on from it."""
        checkpoints = self.run_dir / "checkpoints"
        for name in ("interrupted.ckpt", "last.ckpt"):
            if (checkpoints / name).is_file():
                resume = " ".join(shlex.quote(a) for a in self.args if not a.startswith("hydra.run.dir="))
                return f"Stopped: {self.run_dir} kept, with checkpoints/{name}: go on with python train.py {resume} ckpt_path={self.run_dir}"
        if self.run_dir.is_dir():
            return f"Stopped: {self.run_dir} kept, with no checkpoint yet (nothing to resume)"
        return "Stopped before the run wrote anything: nothing kept"


def write(stream: Any, data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode(errors="replace"))
        stream.flush()


def read_accuracy(run_dir: Path) -> float | None:
    """The run's test accuracy in percent, from the ``metrics.json`` that ``train.py`` writes into its run dir."""
    try:
        value = json.loads((run_dir / "metrics.json").read_text()).get("test/acc")
    except (OSError, json.JSONDecodeError):
        return None
    return None if value is None else 100 * float(value)


# The command line --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vit.reproduce",
        description="Re-run one result of the README (a row of docs/frontier.json) and compare it with what was recorded.",
        epilog="Other key=value arguments go to train.py as they are (paths relative to the repository root).",
    )
    parser.add_argument("name", nargs="?", help="the row (python -m vit.reproduce --list)")
    parser.add_argument("overrides", nargs="*", help="seed=N or seed=N,M,... (default: the row's first recorded seed), key=value for train.py")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--out", type=Path, default=None, help="run dirs go to OUT/seed<N> (default: outputs/reproduce/NAME/<date>_<time>)")
    parser.add_argument("--registry", type=Path, default=REGISTRY, help="the results registry (default: docs/frontier.json)")
    parser.add_argument("--manual-steps", type=int, default=200, help="timed steps of the manual's loop (default 200, as the race)")
    parser.add_argument("--manual-warmup", type=int, default=10, help="untimed steps before them (default 10)")
    return parser.parse_intermixed_args(argv)


def split_seeds(row: Row, overrides: list[str]) -> tuple[list[int], list[str]]:
    """The seeds to run (``seed=42,0,1``; default the row's first recorded one) and the other overrides."""
    seeds, rest = None, []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "seed" and value:
            try:
                seeds = [int(s) for s in value.split(",")]
            except ValueError:
                raise ConfigError(f"seed={value} is not a seed: give an integer or a comma list, e.g. seed=42,0,1") from None
        elif key.lstrip("+~") == "hydra.run.dir":
            raise ConfigError("vit.reproduce names each seed's run dir itself: give --out DIR instead of hydra.run.dir= (runs go to DIR/seed<N>)")
        elif key.lstrip("+~") == "paths.output_dir" and row.kind == "train":
            continue  # where the runs go, as --out (output_dir): not what they train
        else:
            rest.append(arg)
    if row.kind == "manual" and any(not a.startswith("data.root=") for a in rest):
        raise ConfigError(f"the manual row runs the manual's own code: it takes seed=N and data.root=DIR only, not {' '.join(rest)}")
    return seeds or [row.headline.seed], rest


def output_dir(out: Path | None, overrides: list[str]) -> Path | None:
    """Where the runs go: ``--out DIR``, or the user's ``paths.output_dir=DIR`` (relative to the repository root, as
    train.py reads it), which means the same here: each seed's run dir is DIR/seed<N>, its hydra.run.dir and output_dir."""
    given = last_value([a.lstrip("+") for a in overrides], "paths.output_dir")
    if given is None:
        return out
    path = Path(given) if Path(given).is_absolute() else ROOT / given
    if out is not None and out.resolve() != path.resolve():
        raise ConfigError(f"--out {out} and paths.output_dir={given} name two places for the runs: give one of them")
    return path


def run_dirs(name: str, out: Path | None, seeds: list[int]) -> dict[int, Path]:
    out = out if out is not None else ROOT / "outputs" / "reproduce" / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    dirs = {seed: (out / f"seed{seed}").resolve() for seed in seeds}
    for run_dir in dirs.values():
        if (run_dir / "metrics.json").exists() or (run_dir / "checkpoints").exists():
            raise ConfigError(f"{run_dir} already holds a run: give another --out DIR")
    return dirs


def here_description(images_per_s: float, data: str) -> str:
    import torch

    threads = torch.get_num_threads()
    return (
        f"this machine: {cpu_name()} ({core_count()} cores, {threads} torch thread{'s' if threads != 1 else ''}); "
        f"the manual's loop: {images_per_s:.1f} images/s on {data}"
    )


def reproduce_manual(row: Row, seeds: list[int], overrides: list[str], args: argparse.Namespace) -> int:
    """The ``manual`` row: its 20 epochs projected here as the race projects them, against the recorded projection."""
    kind, root = row_data(row, overrides)
    print(f"{row.name}: {row.what}, as {row.command} projects it (its steps on this machine, {args.manual_steps} timed)", flush=True)
    for seed in seeds:
        total, images_per_s = manual_projection(root, seed, args.manual_warmup, args.manual_steps)
        print(here_description(images_per_s, str(root) if root else "torchvision's FakeData"))
        head = row.headline
        note = not_recorded(overrides)
        print(
            f"seed {seed}: accuracy not checked: {head.accuracy:.2f}% is {head.note or 'the recorded figure'} "
            f"(the manual's recipe run to the end here: python -m vit.reproduce seed){note}"
        )
        for line in time_verdicts(row, head.seed, total, images_per_s, projected=True):
            print(f"  {line}{note}")
    return 0


def not_recorded(overrides: list[str]) -> str:
    """The note each verdict line of a run with the user's overrides carries: what it compares is not the row's command."""
    return f" (with {' '.join(overrides)}: not the recorded command)" if overrides else ""


def verdicts(row: Row, seed: int, run_dir: Path, seconds: float | None, here_images_per_s: float, device: str, note: str) -> list[str]:
    """What a finished run is told, a line each: its accuracy, its precision, its time; each with ``note``."""
    lines = [
        accuracy_verdict(row, seed, read_accuracy(run_dir)),
        *("  " + line for line in [precision_verdict(row, run_dir), *time_verdicts(row, seed, seconds, here_images_per_s, device)]),
    ]
    return [line + note for line in lines]


def recorded_precision(row: Row, overrides: list[str]) -> str | None:
    """``trainer.precision=P`` where the row records the precision P its results trained in and neither its command nor the
    user's overrides set one: a rerun trains as the row did, not in today's default for this machine (``vit.precision``)."""
    if not row.precision or last_value([*row.args, *overrides], "trainer.precision") is not None:
        return None
    return f"trainer.precision={row.precision}"


def recorded_device(row: Row, overrides: list[str]) -> str | None:
    """``trainer.accelerator=cpu`` where a CUDA GPU is here, the row's results ran on CPUs and neither its command nor the
    user's overrides choose the accelerator: a rerun trains where the row did, and its time can be judged."""
    if row.device != "cpu" or last_value([*row.args, *overrides], "trainer.accelerator") is not None:
        return None
    return "trainer.accelerator=cpu" if run_device(row.args) == "gpu" else None


def run_device(args: list[str]) -> str:
    """``gpu`` where a ``python train.py`` of ``args`` trains on a CUDA GPU (one is here, trainer.accelerator auto or gpu), else ``cpu``."""
    from vit.precision import on_cuda

    return "gpu" if on_cuda({"accelerator": last_value(args, "trainer.accelerator") or "auto"}) else "cpu"


def precision_verdict(row: Row, run_dir: Path) -> str:
    """What the rerun trained in (its run.json), against what the row's results trained in."""
    try:
        here = json.loads((run_dir / "run.json").read_text()).get("precision")
    except (OSError, ValueError):
        here = None
    recorded = row.precision or "not recorded"
    if here is None:
        return f"precision: not in {run_dir / 'run.json'} (the row's: {recorded})"
    same = "the same as" if here == row.precision else "not"
    return f"precision: {here}, {same} the row's ({recorded})"


def reproduce_train(row: Row, seeds: list[int], overrides: list[str], args: argparse.Namespace, session: dict) -> int:
    """A ``python train.py`` row: the manual's slice, then one run per seed, each with its verdict."""
    from vit.cli import check_overrides

    dirs = run_dirs(row.name, output_dir(args.out, args.overrides), seeds)
    print(
        f"{row.name}: {row.what}; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; run dirs under {dirs[seeds[0]].parent}",
        flush=True,
    )
    for seed in seeds:  # a mistyped key stops here, in one line, before minutes of timing
        check_overrides(ROOT / "conf", "train", [*row.args, *overrides, f"seed={seed}", f"hydra.run.dir={dirs[seed]}"])
    kind, root = row_data(row, overrides)
    if root is not None:
        data_dir = last_value([*row.args, *overrides], "paths.data_dir")
        warm_cache(root, Path(data_dir) if data_dir else ROOT / "data")
    print(f"timing the manual's loop ({args.manual_steps} steps after {args.manual_warmup}) ...", flush=True)
    here = manual_images_per_s(root, seeds[0], args.manual_warmup, args.manual_steps)
    print(here_description(here, str(root) if root else f"data={kind} (torchvision's FakeData)"), flush=True)
    note = not_recorded(overrides)
    precision, accelerator = recorded_precision(row, overrides), recorded_device(row, overrides)
    pinned = [p for p in (precision, accelerator) if p]
    if precision:
        print(f"precision: {row.precision}, as recorded (the row's results trained in it; {precision} added to the command)", flush=True)
    if accelerator:
        print(f"device: cpu, as recorded (a CUDA GPU is here, the row's results ran on CPUs; {accelerator} added to the command)", flush=True)
    device = run_device([*row.args, *overrides, *pinned])
    for seed in seeds:
        run = Run([*row.args, *overrides, *pinned, f"seed={seed}", f"hydra.run.dir={dirs[seed]}"], dirs[seed])
        session["run"] = run
        print(f"\n{row.name}, seed {seed}: python train.py {' '.join(shlex.quote(a) for a in run.args)}", flush=True)
        expected = expectation(row, seed, here, device)
        if expected:
            print(expected + note, flush=True)
        run.start()
        code = run.stream()
        session["run"] = None
        session["done"].append(run.run_dir)
        if code != 0:
            print(f"Error: seed {seed}'s run failed (exit {code}; its output is above): fix what it says, then run this again", file=sys.stderr)
            return 1
        print("\n" + "\n".join(verdicts(row, seed, run.run_dir, run.seconds, here, device, note)))
        print(f"  run dir: {run.run_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    session: dict[str, Any] = {"run": None, "done": []}  # the run going on, the run dirs finished

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args = parse_args(argv)
        registry = load_registry(args.registry)
        if args.list:
            print(list_rows(registry))
            return 0
        if not args.name:
            raise ConfigError(f"name a result: python -m vit.reproduce NAME, NAME one of {', '.join(r.name for r in registry.rows)}")
        row = registry.row(args.name)
        seeds, overrides = split_seeds(row, args.overrides)
        if row.kind == "manual":
            return reproduce_manual(row, seeds, overrides, args)
        return reproduce_train(row, seeds, overrides, args, session)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as e:
        run, done = session["run"], session["done"]
        finished = f"; finished and kept: {', '.join(map(str, done))}" if done else ""
        if run is not None:
            run.stop()
            print(run.kept() + finished, file=sys.stderr)
        else:
            print(f"Stopped before a training run started{finished or ': nothing kept'}", file=sys.stderr)
        return 143 if isinstance(e, Stopped) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
