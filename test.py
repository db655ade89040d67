"""Test a checkpoint: python test.py ckpt=outputs/<date>/<time>_<us> (a run dir or a .ckpt file)"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vit.cli import check_command_line, run_reporting_errors


@hydra.main(config_path="conf", config_name="test", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from vit.run import test  # here, not above: a wrong command line is answered before torch and Lightning load

    return run_reporting_errors(test, cfg)


if __name__ == "__main__":
    check_command_line(Path(__file__).parent / "conf", "test", sys.argv[1:])
    main()
