"""What the README and docs/ quote, checked against the project: links, config options, the quoted option lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF, ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]

# [text](target) and ![alt](target); the target up to a space or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# group=option as a command names it: experiment=fast, hydra/launcher=joblib, model=vit_cifar,resnet18_cifar,
# 'logger=[csv,wandb]'. Not model.name=... (a key, not a group).
GROUPS = (
    "experiment",
    "model",
    "data",
    "logger",
    "optim",
    "scheduler",
    "module",
    "trainer",
    "callbacks",
    "paths",
    "hparams_search",
    "hydra/launcher",
)
OPTION = re.compile(r"(?<![\w./+-])(" + "|".join(re.escape(g) for g in GROUPS) + r")=\[?([A-Za-z_][\w,]*)")
# The one-line answer to an option that does not exist (vit/cli.py), as quoted: "X=Y is not an option: use one of A, B, C".
QUOTED_OPTIONS = re.compile(r"([\w/]+)=\w+ is not an option: use one of ([\w, ]+?)(?: \(|`|$)", re.MULTILINE)
# Values the docs name on purpose because they are not options (an example of the error that answers them).
NOT_OPTIONS = {("experiment", "sed"), ("data", "fakes")}


def without_code_blocks(text: str) -> str:
    """The Markdown outside ``` fences: a link inside a code block is text, not a link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code_blocks(page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(without_code_blocks(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.fixture(scope="module")
def group_options():
    """Each config group's options as Hydra lists them (conf/ and the installed Hydra plugins), as vit/cli.py checks them."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        options = {group: set(loader.get_group_options(group)) for group in GROUPS}
    GlobalHydra.instance().clear()
    return options


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    assert PAGES, "docs/ has no pages"
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_exist(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_options_named_in_the_docs_exist(page, group_options):
    named = {(group, value) for group, values in OPTION.findall(page.read_text()) for value in values.split(",") if value}
    unknown = sorted((g, v) for g, v in named - NOT_OPTIONS if v not in group_options[g])
    assert unknown == []


def test_the_deliberate_non_options_are_not_options(group_options):
    assert [(g, v) for g, v in NOT_OPTIONS if v in group_options[g]] == []


def test_quoted_option_lists_are_the_groups_options(group_options):
    quoted = [(group, options) for page in DOCS for group, options in QUOTED_OPTIONS.findall(page.read_text())]
    assert quoted, "no quoted option list found: the pattern no longer matches the docs"
    for group, options in quoted:
        assert options.split(", ") == sorted(group_options[group]), group


def test_the_quoted_option_message_is_the_codes():
    """The docs quote vit/cli.py's message for an option that does not exist."""
    source = (ROOT / "vit" / "cli.py").read_text()
    assert "is not an option: use one of {', '.join(options)}{hint}" in source
    assert "(did you mean {close[0]}?)" in source


def test_the_configuration_table_names_every_option(group_options):
    """docs/configuration.md's table of groups: each group's row names each of its options."""
    rows = re.findall(r"^\| `([\w/]+)` \| (.*?) \|", (ROOT / "docs" / "configuration.md").read_text(), flags=re.MULTILINE)
    assert {group for group, _ in rows} >= {"experiment", "model", "data", "logger", "optim", "scheduler", "trainer"}
    missing = sorted((group, o) for group, cell in rows for o in group_options[group] if f"`{o}`" not in cell)
    assert missing == []


def test_the_readmes_preset_list_is_conf_experiment(group_options):
    listed = re.search(r"\(`conf/experiment/`: ([^)]*)\)", README.read_text())
    assert listed, "the README no longer lists the presets as (`conf/experiment/`: ...)"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == group_options["experiment"]


def test_the_slow_test_table_names_every_file_with_slow_tests():
    """docs/testing.md's table of slow tests: one row per test file that marks a test ``@pytest.mark.slow``, and no other."""
    text = (ROOT / "docs" / "testing.md").read_text()
    listed = re.findall(r"^\| `(tests/\w+\.py)` \|", text.split("## The slow tests", 1)[1], flags=re.MULTILINE)
    marked = sorted(
        f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if re.search(r"^\s*@pytest\.mark\.slow\b", p.read_text(), re.MULTILINE)
    )
    assert marked, "no slow tests found: the pattern no longer matches the tests"
    assert sorted(listed) == marked


def test_the_results_rows_the_docs_name_are_rows_of_the_registry():
    """``python -m vit.reproduce NAME`` and "the row `NAME`" in the README and docs/: NAME is a row of docs/frontier.json."""
    rows = {row["name"] for row in json.loads((ROOT / "docs" / "frontier.json").read_text())["rows"]}
    pattern = re.compile(r"vit\.reproduce (?:--\S+ )*([a-z]\w*)|the (?:registry )?row `(\w+)`")
    named = {(page.name, a or b) for page in DOCS for a, b in pattern.findall(page.read_text())}
    assert len(named) >= 10, "the pattern no longer finds the rows the docs name"
    assert sorted((page, name) for page, name in named if name not in rows) == []


FINAL_PRESETS = ("fast", "budget", "budget_max")  # the presets with figures of their own in docs/frontier.json


def test_each_final_preset_says_how_often_the_test_split_was_read():
    """In its config and in docs/speedrun.md's table, with a count."""
    table = (ROOT / "docs" / "speedrun.md").read_text().split("## How often the test split was read", 1)
    assert len(table) == 2, "docs/speedrun.md has no section on the test split's reads"
    rows = dict(re.findall(r"^\| `(\w+)`[^|]*\| (\d+)[^|]* \|", table[1].split("\n## ", 1)[0], flags=re.MULTILINE))
    assert sorted(rows) == sorted(FINAL_PRESETS)
    for name in FINAL_PRESETS:
        config = (CONF / "experiment" / f"{name}.yaml").read_text()
        said = re.search(r"test split was read (\d+) times", " ".join(line.lstrip("# ") for line in config.splitlines()))
        assert said and said.group(1) == rows[name], name


def test_budgets_length_says_what_it_rested_on():
    """budget's 12 epochs were set by the time a quarter of the manual's allows, before any run; the 80% preset's 11
    over 10 (budget_11epochs) on a test margin predicted from another preset: the preset and the notes say so."""
    config = " ".join(line.lstrip("# ") for line in (CONF / "experiment" / "budget.yaml").read_text().splitlines())
    assert "set by the time a quarter of the manual's allows" in config
    notes = (ROOT / "docs" / "speedrun.md").read_text()
    assert "What the length rested on: not on validation alone." in notes and "The length was set so, before any run" in notes


def test_the_readmes_test_command_is_what_ci_runs():
    """The README's "set up and run the tests" command, step by step, is .ci/run's (which adds ruff before the tests)."""
    block = re.search(r"Set up and run the tests.*?```bash\n(.*?)\n```", README.read_text(), flags=re.DOTALL)
    assert block, "the README no longer has its test command"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = [step.strip() for step in block.group(1).split("&&")]
    assert [step for step in steps if step not in ci] == []
    assert ci.index(steps[0]) < ci.index(steps[-1])


def test_the_layout_page_names_every_module_and_bench_script():
    listed = {line.split()[0] for line in (ROOT / "docs" / "layout.md").read_text().splitlines() if line.strip()}
    files = {str(p.relative_to(ROOT)) for folder in ("vit", "bench") for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
    assert files - listed == set(), "docs/layout.md should say what each of these files does"
    assert {name for name in listed if name.endswith(".py") and "/" in name} - files == set(), "docs/layout.md names files that are gone"


def misquoted_commands(text: str, rows: dict) -> list[str]:
    """Table rows quoting ``python train.py experiment=NAME ...`` (no seed of their own) beside a bold accuracy that is
    not one the registry row NAME recorded: today's command named for a run of what the preset was before."""
    wrong = []
    for line in text.splitlines():
        command = re.search(r"`python train\.py experiment=(\w+)([^`]*)`", line)
        figures = set(re.findall(r"\*\*(\d+\.\d\d)%\*\*", line))
        if line.startswith("| ") and command and figures and "seed=" not in command.group(2) and command.group(1) in rows:
            if not figures <= {f"{result['accuracy']:.2f}" for result in rows[command.group(1)]["results"]}:
                wrong.append(line)
    return wrong


def test_a_speedrun_table_gives_a_presets_command_only_beside_that_presets_recorded_figures():
    """A run of a preset that has changed since is named by its registry row, not by today's command, which would rerun
    something else."""
    rows = {row["name"]: row for row in json.loads((ROOT / "docs" / "frontier.json").read_text())["rows"]}
    assert misquoted_commands((ROOT / "docs" / "speedrun.md").read_text(), rows) == []
    before = "| `python train.py experiment=fast data=folder data.root=../shared/data/cifar10-jpeg` (seed 42) | 7 | **322 s** | **70.13%** |"
    assert misquoted_commands(before, rows) == [before]  # the line as it stood before fast changed: caught


def test_the_readme_is_read_in_two_minutes():
    """At most 150 lines, and no table cell over 25 words."""
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    cells = [cell for line in text.splitlines() if line.startswith("|") for cell in line.strip("|").split("|")]
    assert cells and max(len(cell.split()) for cell in cells) <= 25


def test_one_idea_per_file_no_module_or_bench_script_over_450_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for d in ("vit", "bench") for p in (ROOT / d).glob("*.py")}
    assert len(sizes) > 20 and {name: n for name, n in sizes.items() if n > 450} == {}


def test_the_optimizers_know_no_model_class():
    """vit/optim.py routes by what a net says of itself (``output_layers``, ``qkv_projections``), not by its classes."""
    import ast

    tree = ast.parse((ROOT / "vit" / "optim.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert "torch" in imported and not imported & {"vit.model", "vit.zoo", "timm"}
