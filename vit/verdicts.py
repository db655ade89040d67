"""A rerun compared with its row of the registry (``vit.registry``), a line of text each, as ``python -m vit.reproduce``
prints them: its accuracy against the recorded seeds' spread, its precision against the row's, its time against each
recorded time moved to this machine by the two machines' speeds of the manual's loop, and the spread of those.
"""

from __future__ import annotations

import json
from pathlib import Path

from vit.registry import Result, Row

DEVICES = {"cpu": "CPU", "gpu": "GPU"}  # a machine's device, as a verdict names it


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


def time_verdicts(
    row: Row, seed: int, seconds: float | None, here_images_per_s: float | None, device: str = "cpu", projected: bool = False
) -> list[str]:
    """One line per recorded time this run is compared with: every one whose machine's manual-loop speed is known
    (scaled to this machine; seeds barely change the time), and this seed's own where it is not (not scaled); then the
    spread of the scaled times, and whether this run is inside it. Times recorded on another device than this run's
    (``device``: cpu or gpu) are not compared: a GPU run says nothing of a CPU's time. ``here_images_per_s`` is None where
    the manual's loop was not timed (``uses_manual_speed``). ``projected``: the manual's row, whose times here and
    recorded are both projections, labelled so on every line."""
    label = " (a projection on both sides: the manual's 20 epochs projected from its timed steps, here as recorded)" if projected else ""
    measured = "no time (no accuracy line)" if seconds is None else seconds_text(seconds)
    measured = f"projected {measured}" if projected else measured
    recorded_times = [r for r in row.results if r.seconds is not None]
    comparable = [r for r in recorded_times if r.machine.device == device]
    if recorded_times and not comparable:
        elsewhere = " and ".join(sorted({DEVICES[r.machine.device] for r in recorded_times}))
        return [
            f"time {measured} on a {DEVICES[device]}; the row's times were recorded on {elsewhere}s: no time verdict "
            f"(a {DEVICES[device]} run is not compared with {elsewhere} records)"
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


def uses_manual_speed(row: Row, device: str) -> bool:
    """Whether a run's time verdict uses this machine's speed of the manual's loop: a time recorded on the run's device
    where that speed (or a rough estimate of it) was measured. Where none was, timing the loop here is work for nothing."""
    return any(
        r.seconds is not None and r.machine.device == device and (r.machine.manual_images_per_s or r.machine.manual_estimate) for r in row.results
    )


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


def expectation(row: Row, seed: int, here_images_per_s: float | None, device: str = "cpu") -> str | None:
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


def not_recorded(overrides: list[str]) -> str:
    """The note each verdict line of a run with the user's overrides carries: what it compares is not the row's command."""
    return f" (with {' '.join(overrides)}: not the recorded command)" if overrides else ""


def verdicts(row: Row, seed: int, run_dir: Path, seconds: float | None, here_images_per_s: float | None, device: str, note: str) -> list[str]:
    """What a finished run is told, a line each: its accuracy, its precision, its time; each with ``note``."""
    lines = [
        accuracy_verdict(row, seed, read_accuracy(run_dir)),
        *("  " + line for line in [precision_verdict(row, run_dir), *time_verdicts(row, seed, seconds, here_images_per_s, device)]),
    ]
    return [line + note for line in lines]


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


def read_accuracy(run_dir: Path) -> float | None:
    """The run's test accuracy in percent, from the ``metrics.json`` that ``train.py`` writes into its run dir."""
    try:
        value = json.loads((run_dir / "metrics.json").read_text()).get("test/acc")
    except (OSError, json.JSONDecodeError):
        return None
    return None if value is None else 100 * float(value)
