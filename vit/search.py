"""A search spends no trial on runs that cannot give it its metric: what each run needs to return ``optimized_metric``
(``problems``), checked for every job of a grid and every value an Optuna search may draw before the first one trains
(``SearchCheck``, a Hydra callback), and by each run itself before it trains (``vit.cli.result_for_sweeper``)."""

from __future__ import annotations

import sys
from typing import Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import DictConfig

OPTIMIZABLE = ("val/acc",)  # never a test/* metric: a search that selects on the test split would leave no unbiased test figure
# Jobs composed at most to check a grid; a bigger grid is checked on its first ones (and each job again before it trains).
MAX_CHECKED_JOBS = 64


def problems(cfg: DictConfig) -> list[str]:
    """Why a run of ``cfg`` cannot return ``optimized_metric`` (one line each, naming the fix); empty when it can."""
    name = cfg.get("optimized_metric")
    if name is None:
        return []
    if str(name).startswith("test/"):
        return [f"optimized_metric={name} would choose on the test split: use val/acc (with data.val_size > 0)"]
    if name not in OPTIMIZABLE:
        return [f"optimized_metric={name} is not a metric of a run: use {' or '.join(OPTIMIZABLE)}"]
    found = []
    if not (cfg.get("data") or {}).get("val_size"):
        found.append(f"optimized_metric={name} needs a validation split, and data.val_size=0: set data.val_size > 0 (e.g. 5000)")
    trainer = cfg.get("trainer") or {}
    if trainer.get("limit_val_batches") == 0:
        found.append(f"optimized_metric={name} needs validation, and trainer.limit_val_batches=0: leave it at 1.0")
    every, epochs = trainer.get("check_val_every_n_epoch"), trainer.get("max_epochs")
    if isinstance(every, int) and isinstance(epochs, int) and epochs >= 1 and every > epochs:
        found.append(
            f"optimized_metric={name}: trainer.check_val_every_n_epoch={every} validates none of trainer.max_epochs={epochs}: set it <= {epochs}"
        )
    if trainer.get("fast_dev_run"):
        found.append(f"optimized_metric={name}: trainer.fast_dev_run keeps no best checkpoint: leave it out of a search")
    if trainer.get("enable_checkpointing") is False:
        found.append(f"optimized_metric={name}: trainer.enable_checkpointing=false keeps no best checkpoint: leave it at true")
    found += _checkpoint_problems(cfg, str(name))
    return found


def _checkpoint_problems(cfg: DictConfig, name: str) -> list[str]:
    """A run returns the best ``name`` its checkpoint callback recorded: it must monitor ``name``, the best being the highest."""
    from lightning.pytorch.callbacks import ModelCheckpoint  # here: the scripts check their command line before Lightning loads

    keepers = {}
    for key, node in (cfg.get("callbacks") or {}).items():
        try:
            target = get_object(str((node or {}).get("_target_")))
        except Exception:  # noqa: BLE001 - a callback that cannot be imported fails its run on its own
            continue
        if isinstance(target, type) and issubclass(target, ModelCheckpoint):
            keepers[key] = node
    if not keepers:
        return [f"optimized_metric={name}: no callback keeps the best {name} (callbacks.model_checkpoint is gone): use callbacks=default"]
    key, node = next(iter(keepers.items()))
    if node.get("monitor") != name:
        return [f"optimized_metric={name}: callbacks.{key}.monitor={node.get('monitor')} records another metric's best: set it to {name}"]
    if node.get("mode", "min") != "max":
        return [f"optimized_metric={name}: callbacks.{key}.mode={node.get('mode', 'min')} records the lowest {name}: set it to max"]
    return []


def sweeper_problems(config: DictConfig) -> list[str]:
    """What the sweeper itself needs: an Optuna search a number to optimise, in the direction that makes it better."""
    sweeper = config.hydra.sweeper
    if "Optuna" not in str(sweeper.get("_target_", "")):
        return []
    name = config.get("optimized_metric")
    if name is None:
        return ["an Optuna search needs optimized_metric=val/acc: without it the trials return no number to optimise"]
    direction = sweeper.get("direction")
    if name in OPTIMIZABLE and isinstance(direction, str) and direction != "maximize":
        return [f"hydra.sweeper.direction={direction} would look for the lowest {name}: use maximize"]
    return []


def _values(override: Override) -> list[Any]:
    """The values a sweep override may give a job: each of a list, the ends of an interval."""
    if not override.is_sweep_override():
        return [override.value()]
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    sweep = override.value()
    return [sweep.start, sweep.end] if isinstance(sweep, IntervalSweep) else []


def jobs(config: DictConfig) -> list[tuple[str, list[str]]]:
    """(what names it, its overrides) for jobs standing for the sweep's: a grid's every job (Hydra's basic sweeper);
    for any other sweeper (Optuna), the fixed overrides with each value each searched key may take, one key at a time."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(config.hydra.overrides.task))
    params = parser.parse_overrides([f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()])
    if str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        swept = [o.get_key_element() for o in [*params, *parsed] if o.is_sweep_override()]
        grid = [job for batch in BasicSweeper.split_arguments([*params, *parsed], None) for job in batch]  # params first, as Hydra
        return [(f"job {n} ({' '.join(o for o in job if o.split('=')[0] in swept)})", job) for n, job in enumerate(grid)]
    searched = [o for o in [*parsed, *params] if o.is_sweep_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    found = [("the search's fixed settings", fixed)]
    for override in searched:
        for value in _values(override):
            line = f"{override.get_key_element()}={value}"
            found.append((f"a trial with {line}", [*fixed, line]))
    return found


def first_problem(config: DictConfig) -> str | None:
    """The first reason the sweep of ``config`` (its ``hydra`` node included) would spend trials on nothing, with the
    job it concerns; None where every job checked can return its metric."""
    found = sweeper_problems(config)
    if found:
        return found[0]
    if config.get("optimized_metric") is None:
        return None
    name = config.hydra.job.get("config_name") or "train"
    for label, job in jobs(config)[:MAX_CHECKED_JOBS]:
        try:
            found = problems(compose(config_name=name, overrides=job))
        except Exception:  # noqa: BLE001 - a job that cannot be composed fails at its own start, with its own line
            continue
        if found:
            return f"{found[0]} ({label})"
    return None


class SearchCheck(Callback):
    """Hydra callback: a sweep with ``optimized_metric`` (or an Optuna search) whose runs cannot produce that metric
    ends with one line on stderr and exit code 1 before its first trial."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = first_problem(config)
        if problem:
            print(f"Error: {problem}; no trial was run", file=sys.stderr, flush=True)
            raise SystemExit(1)
