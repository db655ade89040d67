"""Test a checkpoint: python test.py ckpt=outputs/<date>/<time> (a run dir or a .ckpt file)"""

import sys

import hydra
from omegaconf import DictConfig

from vit.cli import require_plugins, run_reporting_errors
from vit.run import test


@hydra.main(config_path="conf", config_name="test", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_reporting_errors(test, cfg)


if __name__ == "__main__":
    require_plugins(sys.argv[1:])
    main()
