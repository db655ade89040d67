"""What the entry points share: bad input, or a preset without its plugin, is one line and exit code 1, not a
traceback; and what train.py returns to a sweeper."""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vit.errors import ConfigError

log = logging.getLogger(__name__)


def run_reporting_errors(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Runs ``task(cfg)``; a ConfigError ends a single run with one line on stderr and exit code 1.

    Inside a multirun the error is re-raised instead: Hydra records the failed job
    and goes on with the others, where ``sys.exit`` would end the whole sweep.
    """
    try:
        return task(cfg)
    except ConfigError as e:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", e)
            raise e.with_traceback(None) from None  # the sweep report has the message; no traceback wall
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


OPTIMIZABLE = ("val/acc", "test/acc", "test/loss")

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


def objective(task: Callable[[DictConfig], dict], cfg: DictConfig) -> Any:
    """``task(cfg)``'s metrics; with ``optimized_metric`` set, that one metric as a float, which a sweeper (Optuna) optimises."""
    name = cfg.get("optimized_metric")
    if name is not None and name not in OPTIMIZABLE:
        raise ConfigError(f"optimized_metric={name} is not a metric of a run: use one of {', '.join(OPTIMIZABLE)}")
    metrics = task(cfg)
    if name is None:
        return metrics
    if metrics.get(name) is None:
        raise ConfigError(f"optimized_metric={name} has no value in this run: val/acc needs data.val_size > 0, test/* needs test=true")
    return float(metrics[name])
