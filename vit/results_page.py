"""docs/results.md, written from the results registry (docs/frontier.json), so the page of results cannot drift from it.

    python -m vit.results_page            # docs/frontier.json -> docs/results.md
    python -m vit.results_page --check    # exit 1 when docs/results.md is not what the registry gives

A new result goes into docs/frontier.json only; this page is rewritten from it (``tests/test_results_page.py`` fails
while the committed page differs).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from vit.errors import ConfigError
from vit.registry import REGISTRY, read_registry

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "results.md"

INTRO = """\
# Results

<!-- Written by python -m vit.results_page from docs/frontier.json: edit the registry, then run it. -->

Back to the [README](../README.md).

Every result of this project, from the one registry `docs/frontier.json`: test accuracy on all 10,000 test images of
the JPEG copy of CIFAR-10 (`../shared/data/cifar10-jpeg`; lossy, so figures differ a little from the original
CIFAR-10), each from a run of its command made here (the manual's printed 67.09% aside). A time runs from the
command's start to its printed accuracy. `python -m vit.reproduce NAME` runs a row again on your machine and compares
([how](speedrun.md#check-any-result-python--m-vitreproduce)); all rows on one picture, with published figures from
other machines: [accuracy against CPU minutes](frontier.png) (`python bench/frontier.py`). How each preset was found,
its races and the pictures of accuracy against time: [Speed run and ablations](speedrun.md). Not measured yet: any
GPU figure, and the full-length runs of `seed_fixed`, `small_strong`, `cifar_best` and `finetune`.
"""


def duration(seconds: float | None, projected: bool = False) -> str:
    if seconds is None:
        return "not timed"
    text = f"{seconds:,.1f} s" if seconds % 1 else f"{seconds:,.0f} s"
    if seconds >= 60:
        text += f" ({math.floor(seconds / 6 + 0.5) / 10:.1f} min)"  # half up, as the docs round (2,535 s: 42.3 min)
    return text + (", projected" if projected else "")


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def machine_label(machine: dict[str, Any]) -> str:
    parts = [machine.get("cpu") or "CPU not recorded", f"{machine['cores']} cores"]
    if machine.get("manual_images_per_s"):
        parts.append(f"{machine['manual_images_per_s']:g} manual images/s")
    return ", ".join(parts)


def row_section(row: dict[str, Any], machines: dict[str, Any]) -> list[str]:
    check = f"Re-run it: `python -m vit.reproduce {row['name']}`"
    if row.get("precision"):
        check += f" (it keeps the precision its results trained in, `trainer.precision={row['precision']}`)"
    lines = [f"### `{row['name']}`", "", f"What: {row['what']}. {check}.", "", "```bash", row["command"], "```", ""]
    lines += ["| seed | test accuracy | time | machine | how it was measured |", "|---|---|---|---|---|"]
    for result in row["results"]:
        machine = machines[result["machine"]]
        how = "; ".join(result[key] for key in ("source", "note", "time_note") if result.get(key))
        accuracy = f"{result['accuracy']:.2f}%"
        lines.append(
            f"| {result['seed']} | {accuracy} | {duration(result['seconds'], result.get('projected', False))} "
            f"| {cell(machine_label(machine))} (`{result['machine']}`) | {cell(how)} |"
        )
    return [*lines, ""]


def machines_table(machines: dict[str, Any]) -> list[str]:
    lines = ["| id | CPU | cores | torch threads | date | conditions | the manual's loop there |", "|---|---|---|---|---|---|---|"]
    for name, m in machines.items():
        threads = m["torch_threads"] if m.get("torch_threads") is not None else "not recorded"
        manual = f"{m['manual_images_per_s']:g} images/s: " if m.get("manual_images_per_s") else ""
        manual += m["manual_source"]
        if m.get("manual_estimate"):
            low, high = m["manual_estimate"]
            manual += f"; {low:g}-{high:g} images/s from {m['manual_estimate_source']}"
        lines.append(
            f"| `{name}` | {m.get('cpu') or 'not recorded'} | {m['cores']} | {threads} | {m.get('date') or 'not recorded'} "
            f"| {cell(m['conditions'])} | {cell(manual)} |"
        )
    return lines


def render(data: dict[str, Any]) -> str:
    """The whole page: a summary table (each row's headline, its first result), a section per row, the machines."""
    machines = data["machines"]
    try:
        lines = [INTRO, "## All rows", "", "| row | what | test accuracy, each result | headline time | machine |", "|---|---|---|---|---|"]
        for row in data["rows"]:
            headline = row["results"][0]
            accuracies = ", ".join(f"{r['accuracy']:.2f}%" for r in row["results"])
            lines.append(
                f"| [`{row['name']}`](#{row['name']}) | {cell(row['what'])} | {accuracies} "
                f"| {duration(headline['seconds'], headline.get('projected', False))} | {cell(machine_label(machines[headline['machine']]))} |"
            )
        lines += ["", "## Each row", ""]
        for row in data["rows"]:
            lines += row_section(row, machines)
        lines += ["## The machines", "", *machines_table(machines)]
    except (KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"the results registry lacks a field this page needs: {e!r} (see its schema)") from None
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/results.md from the results registry (docs/frontier.json).")
    parser.add_argument("--registry", type=Path, default=REGISTRY)
    parser.add_argument("--out", type=Path, default=PAGE)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page differs from the registry")
    args = parser.parse_args(argv)
    try:
        page = render(read_registry(args.registry))
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != page:
            print(f"{args.out} differs from {args.registry}: run python -m vit.results_page", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(page)
    print(f"wrote {args.out} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
