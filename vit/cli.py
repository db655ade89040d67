"""What the entry points share: bad input, a mistyped key or option, or a preset without its plugin is one line
and exit code 1, not a traceback; Lightning's known noise is filtered; and what train.py returns to a sweeper."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vit import search
from vit.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def run_reporting_errors(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Runs ``task(cfg)``; a ConfigError ends a single run with one line on stderr and exit code 1.

    The line also goes into the run's log (``train.log``), so a failed run dir says why it failed.
    Inside a multirun the error is re-raised instead: Hydra records the failed job
    and goes on with the others, where ``sys.exit`` would end the whole sweep.
    """
    quiet_known_noise()
    try:
        return task(cfg)
    except ConfigError as e:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", e)
            raise e.with_traceback(None) from None  # the sweep report has the message; no traceback wall
        log_to_files(f"Error: {e}")
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def log_to_files(message: str) -> None:
    """An ERROR record for the log files only: the console already gets the one line on stderr."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# Lightning's messages that say nothing about this run: advertising, the defaults it was given, a deprecation inside Lightning.
NOISE_LOG = (r"💡 Tip: ", r"`Trainer\(limit_\w+_batches=1\.0\)` was configured so 100% ")
NOISE_WARNINGS = (
    r".*LeafSpec.* is deprecated",
    r"Precision bf16-mixed is not supported by the model summary",  # only its size estimate, in MB
    r"The number of training batches .* is smaller than the logging interval",
)


class DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


NOISE_FILTER = DropMessages(NOISE_LOG)


def quiet_known_noise() -> None:
    """Filters the known-noise messages (only those) out of a run's console and log; idempotent."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NOISE_FILTER)
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# A preset on the command line -> the module its Hydra plugin installs, and the plugin's package.
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


def require_plugins(args: list[str]) -> None:
    """A scale-out preset whose plugin is not installed ends with one line naming the extra, before Hydra's "Could not find"."""
    for arg in args:
        module, package = PLUGINS.get(arg, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            print(f'Error: {arg} needs the Hydra plugin {package}: pip install -e ".[scale]"', file=sys.stderr)
            raise SystemExit(1)


def check_command_line(config_dir: Path, config_name: str, args: list[str]) -> None:
    """Before ``hydra.main``: a missing plugin, an unknown key or option, an unreadable override ends with one
    line naming the fix and exit code 1 (Hydra's own answer is a hint to add the key, or a screen of lines)."""
    require_plugins(args)
    try:
        check_overrides(config_dir, config_name, args)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


# Hydra's flags that take a value, and those that load another config or none (then Hydra alone checks).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}
OTHER_CONFIG_FLAGS = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
}


def check_overrides(config_dir: Path, config_name: str, args: list[str]) -> None:
    """Composes the config as a run (or a sweep's first job) would; where Hydra refuses, a ConfigError that says why in one line.

    Only what Hydra itself refuses is an error: this explains its refusal, it adds no rules of its own.
    """
    overrides = override_args(args)
    if not overrides:
        return
    parser = OverridesParser.create()
    parsed: list[Override] = []
    for arg in overrides:
        try:
            parsed += parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise ConfigError(
                f"cannot read the override {arg}: {first_line(e)} (see https://hydra.cc/docs/advanced/override_grammar/basic)"
            ) from None
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        groups = _group_overrides(parsed)  # every value of a sweep: Hydra would refuse a bad one only when its job starts
        try:
            compose(config_name, overrides=[line for o in parsed if (line := _one_value(o))], return_hydra_config=True)
            return
        except ConfigCompositionException as e:
            refusal = e
        _explain_unknown_key(config_name, parsed, groups)
        raise ConfigError(first_line(refusal).removeprefix(f"In '{config_name}': ")) from None


def override_args(args: list[str]) -> list[str] | None:
    """The overrides among the command line's arguments; None where a flag selects another config."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in OTHER_CONFIG_FLAGS:
            return None
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _one_value(override: Override) -> str | None:
    """The override as one job sees it: a list sweep (a,b / choice(a,b)) by its first value; other sweeps left to the sweeper."""
    if not override.is_sweep_override():
        return override.input_line
    if override.is_discrete_sweep():
        return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
    return None


def _values(override: Override) -> list[Any]:
    if not override.is_sweep_override():
        return [override.value()]
    return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []


def _group_overrides(parsed: list[Override]) -> list[Override]:
    """The overrides that choose a config group's option (``experiment=seed``); an option that does not exist is a ConfigError."""
    loader = GlobalHydra.instance().config_loader()
    groups = []
    for o in parsed:
        options = loader.get_group_options(o.key_or_group) if o.type != OverrideType.DEL and o.package is None else []
        if not options:
            continue
        groups.append(o)
        for value in _values(o):
            if isinstance(value, str) and value not in options:
                close = difflib.get_close_matches(value, options, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{o.key_or_group}={value} is not an option: use one of {', '.join(options)}{hint}")
    return groups


def _explain_unknown_key(config_name: str, parsed: list[Override], groups: list[Override]) -> None:
    """Raises the one-line answer where Hydra refused a key the config does not have; returns otherwise."""
    cfg = compose(config_name, overrides=[line for o in groups if (line := _one_value(o))], return_hydra_config=True)
    keys = _flat_keys(OmegaConf.to_container(cfg, resolve=False))
    for o in parsed:
        if o.type == OverrideType.CHANGE and o not in groups and o.key_or_group not in keys:
            parent = o.key_or_group.rpartition(".")[0]
            options = GlobalHydra.instance().config_loader().get_group_options(parent) if parent else []
            if parent in keys and keys[parent] is None and options:  # scheduler.warmup_fraction=0.1 with scheduler=none
                raise ConfigError(
                    f"{o.key_or_group} is not a config key: {parent} is null here; choose it first ({parent}=<one of {', '.join(options)}>)"
                )
            raise ConfigError(_unknown_key(o.key_or_group, keys))


def _flat_keys(node: dict, prefix: str = "") -> dict[str, Any]:
    keys = {}
    for name, value in node.items():
        keys[f"{prefix}{name}"] = value
        if isinstance(value, dict):
            keys.update(_flat_keys(value, f"{prefix}{name}."))
    return keys


def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def _unknown_key(key: str, keys: dict[str, Any]) -> str:
    """``optim.learning_rate is not a config key: did you mean optim.lr?``: the keys it most likely meant."""
    candidates = [k for k in keys if k.startswith("hydra.") == key.startswith("hydra.")]
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in candidates if k.rpartition(".")[0] == parent}
    found = [k for name, k in siblings.items() if len(name) > 1 and (name == _initials(leaf) or _initials(name) == leaf)]
    found += [siblings[name] for name in difflib.get_close_matches(leaf, list(siblings), n=3)]
    found += [k for k in candidates if k.rpartition(".")[2] == leaf]
    found += difflib.get_close_matches(key, candidates, n=3, cutoff=0.8)
    found = [k for k in dict.fromkeys(found) if not key.startswith(f"{k}.")][:3]  # not the key's own parents
    if found:
        return f"{key} is not a config key: did you mean {' or '.join(found)}?"
    if parent in keys and isinstance(keys[parent], dict):
        names = sorted(name for name in siblings if not name.startswith("_"))
        if not names:  # an open mapping such as hydra.job.env_set: new entries are added with '+'
            return f"{key} is not a config key: {parent} has no keys yet; add one with +{key}=..."
        return f"{key} is not a config key: {parent} has {', '.join(names)}"
    return f"{key} is not a config key: the config has {', '.join(sorted(k for k in candidates if '.' not in k))}"


def result_for_sweeper(task: Callable[[DictConfig], dict], cfg: DictConfig) -> Any:
    """``task(cfg)``'s metrics; with ``optimized_metric`` set, that one metric as a float, which a sweeper (Optuna) optimises.

    A single run ends with its run dir and the command that tests it again, as the last lines a user can paste.
    """
    name = cfg.get("optimized_metric")
    cannot = search.problems(cfg)  # before training: a run that cannot return its metric spends nothing
    if cannot:
        raise ConfigError(cannot[0])
    metrics = task(cfg)
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        run_dir = Path(cfg.paths.output_dir).resolve()
        shown = run_dir.relative_to(Path.cwd()) if run_dir.is_relative_to(Path.cwd()) else run_dir
        print(f"Test it again: python test.py ckpt={shown}")
        print(f"Run dir: {shown}")
    if name is None:
        return metrics
    if metrics.get(name) is None:
        raise ConfigError(f"optimized_metric={name} has no value in this run: val/acc needs data.val_size > 0")
    return float(metrics[name])
