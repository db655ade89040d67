"""Several processes and GPUs: Lightning's DDP and Hydra's parallel launchers do the work; here is what they leave to us.

- DDP starts ranks > 0 by running the script again with its own arguments: inside a ``-m`` sweep that
  would start the whole sweep again on every rank, so it is refused there with the way out.
- The joblib launcher runs jobs in worker processes that all see every GPU: ``OneGpuPerJob`` gives each
  worker, and so each job it runs, a GPU of its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig

from vit.errors import ConfigError

log = logging.getLogger(__name__)


def check_no_relaunch_in_sweep(trainer: L.Trainer) -> None:
    """Inside a multirun, a trainer whose ranks Lightning would start by relaunching the script is an error.

    Where the ranks are started from outside (SLURM tasks, torchrun), nothing is relaunched and DDP works.
    """
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    strategy = trainer.strategy
    launcher = strategy.launcher
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not strategy.cluster_environment.creates_processes_externally
    ):
        raise ConfigError(
            f"DDP on {launcher.num_processes} devices cannot run inside a -m sweep (Lightning would relaunch the whole sweep "
            "for every extra rank): run one job per GPU instead, hydra/launcher=joblib hydra.launcher.n_jobs=<GPUs> "
            "trainer.devices=1, or DDP runs one at a time without -m, or hydra/launcher=slurm, where SLURM starts the ranks"
        )


def claim_gpu(lock_dir: Path, count: int) -> tuple[IO, int] | None:
    """The first of ``count`` GPUs whose lock file no live process holds, with the lock now held; None if all are taken.

    The lock goes with the process that holds it, however it ends.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        handle = open(lock_dir / f"gpu{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return handle, index
    return None


class OneGpuPerJob(Callback):
    """Hydra callback: with the joblib launcher and several GPUs visible, pins each worker process to a GPU of its own.

    A worker is pinned when it starts its first job (``CUDA_VISIBLE_DEVICES``, which CUDA reads once per process)
    and keeps its GPU, and the lock on it in the sweep dir, for the later jobs it runs. With more workers
    (``hydra.launcher.n_jobs``) than GPUs, the extra ones share, with a warning.
    """

    gpu: str | None = None  # this process's GPU, once pinned
    lock: IO | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OneGpuPerJob.gpu is not None or not str(config.hydra.launcher.get("_target_", "")).endswith("JoblibLauncher"):
            return
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible is not None else [str(i) for i in range(torch.cuda.device_count())]
        if len(gpus) < 2:
            return
        if torch.cuda.is_initialized():
            log.warning("CUDA was initialised before the job started: job %s is not pinned to a GPU of its own", config.hydra.job.num)
            return
        claimed = claim_gpu(Path(config.hydra.sweep.dir) / ".gpus", len(gpus))
        if claimed is None:
            index = int(config.hydra.job.num) % len(gpus)
            log.warning(
                "More parallel jobs than the %d GPUs: job %s shares GPU %s (set hydra.launcher.n_jobs=%d)",
                len(gpus),
                config.hydra.job.num,
                gpus[index],
                len(gpus),
            )
        else:
            OneGpuPerJob.lock, index = claimed
        OneGpuPerJob.gpu = os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index]
        log.info("Job %s and the later jobs of this worker (pid %d) run on GPU %s", config.hydra.job.num, os.getpid(), gpus[index])
