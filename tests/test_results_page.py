"""docs/results.md against the registry it is written from (python -m vit.results_page)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from tests.conftest import ROOT
from vit import results_page
from vit.registry import read_registry

REGISTRY = ROOT / "docs" / "frontier.json"
PAGE = ROOT / "docs" / "results.md"


def registry() -> dict:
    return json.loads(REGISTRY.read_text())


def sections(page: str) -> dict[str, str]:
    """Each row's section of the page, by the row's name (its ``### `name` `` heading up to the next heading)."""
    parts = re.split(r"^### `(\w+)`$", page.split("\n## The machines")[0], flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_committed_page_is_what_the_registry_gives():
    assert PAGE.read_text() == results_page.render(read_registry(REGISTRY)), (
        "docs/results.md differs from docs/frontier.json: run python -m vit.results_page"
    )


def test_each_registry_row_has_a_section_with_its_command_and_every_result():
    data = registry()
    found = sections(PAGE.read_text())
    assert list(found) == [row["name"] for row in data["rows"]]
    for row in data["rows"]:
        text = found[row["name"]]
        assert f"\n{row['command']}\n" in text
        table = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
        said = [(int(cells[0]), float(cells[1].rstrip("%"))) for cells in (line.strip("|").split(" | ") for line in table)]
        assert said == [(r["seed"], r["accuracy"]) for r in row["results"]], row["name"]


def test_a_changed_registry_changes_the_page(tmp_path):
    """A new figure in the registry shows on the page, and ``--check`` refuses the page written before it."""
    data = copy.deepcopy(registry())
    data["rows"][0]["results"][0]["accuracy"] = 12.34
    data["rows"][0]["results"][0]["seconds"] = 4321
    changed = tmp_path / "frontier.json"
    changed.write_text(json.dumps(data))
    page = tmp_path / "results.md"
    page.write_text(PAGE.read_text())
    assert results_page.main(["--registry", str(changed), "--out", str(page), "--check"]) == 1
    assert results_page.main(["--registry", str(changed), "--out", str(page)]) == 0
    section = sections(page.read_text())[data["rows"][0]["name"]]
    assert "| 12.34% | 4,321 s (72.0 min) |" in section
    assert results_page.main(["--registry", str(changed), "--out", str(page), "--check"]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "cannot read the results registry"),
        ('{"rows": []}', "is not a results registry"),
        ('{"rows": [{}], "machines": {}}', "lacks a field"),
    ],
)
def test_a_bad_registry_is_one_line(tmp_path, capsys, text, message):
    bad = tmp_path / "frontier.json"
    bad.write_text(text)
    assert results_page.main(["--registry", str(bad), "--out", str(tmp_path / "results.md")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results.md").exists()
