"""What the entry points share: a bad-input error is one line and exit code 1, not a traceback."""

from __future__ import annotations

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
