"""The results registry, ``docs/frontier.json``: every recorded result of the project (its command, its runs per seed
and the machine of each), read into one shape and checked as it is read, in one line naming what is wrong.

``python -m vit.reproduce`` reruns its rows and ``bench/frontier.py`` draws them; the ``schema`` in the file says what
each field holds.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit.errors import ConfigError

REGISTRY = Path(__file__).resolve().parents[1] / "docs" / "frontier.json"
TRAIN = "python train.py"  # a row's command: what a rerun runs
MANUAL = "python bench/time_to_accuracy.py"  # or the manual's projected time

MACHINE_KEYS = ("cpu", "cores", "torch_threads", "manual_images_per_s", "manual_source")
ROW_KEYS = ("name", "what", "command", "results", "frontier")
RESULT_KEYS = ("seed", "accuracy", "seconds", "machine", "source")


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


def read_registry(path: Path = REGISTRY) -> dict[str, Any]:
    """The registry at ``path`` as plain JSON (machines and rows), for readers that render it as it stands."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the results registry {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("machines"), dict):
        raise ConfigError(f"{path} is not a results registry: it needs machines and rows (see the schema in docs/frontier.json)")
    return data


def load_registry(path: Path = REGISTRY) -> Registry:
    """The registry at ``path``; a field missing or a machine not defined is one ConfigError naming it."""
    data = read_registry(path)
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
