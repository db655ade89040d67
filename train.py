"""Train a ViT on CIFAR-10: python train.py [overrides]; a sweep: python train.py -m optim.lr=1e-3,1e-4"""

import sys
from functools import partial
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vit.cli import check_command_line, result_for_sweeper, run_reporting_errors


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    from vit.run import train  # here, not above: a wrong command line is answered before torch and Lightning load

    return run_reporting_errors(partial(result_for_sweeper, train), cfg)


if __name__ == "__main__":
    check_command_line(Path(__file__).parent / "conf", "train", sys.argv[1:])
    main()
