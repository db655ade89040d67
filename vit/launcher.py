"""The default sweep launcher: on a CPU, the sweep's chains of jobs side by side, each chain in its own process.

Why: a small net's step does not keep two CPU cores busy. The manual's net trains 1.56x as many images a second at batch
32 (1.16x at batch 64), and evaluates 1.8x as many, as two one-thread processes side by side than as one two-thread
process (2-core AMD EPYC, docs/measurements.md). A chain is the jobs of a sweep that differ only in
``trainer.max_epochs``: in one process, one after another by epoch count, the longer job starts where the shorter
ended (``vit.sharing``), so a chain trains no epoch twice. Chains go to ``n_jobs`` worker processes (forked), each with
its share of the torch threads, set in each job as ``torch_threads=N`` so that a job's dir and its command say how it
ran (the thread count changes the rounding).

With one worker (a CUDA GPU, one chain, one thread, ``n_jobs=1``, or no ``fork`` here) the jobs run one after another in
this process, exactly as Hydra's basic launcher runs them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from vit.errors import ConfigError

# torch and vit.sharing (Lightning) are imported where used: Hydra imports this module on every start of train.py and
# test.py (it looks for plugins), and a wrong command line is answered before they load.

log = logging.getLogger(__name__)

# Set in every worker but the first: two progress bars redrawn by two processes garble one terminal, so only the
# first worker's jobs show theirs (and the model summary); the others' say each epoch in their log lines.
QUIET = "VIT_QUIET_WORKER"


def quiet_worker() -> bool:
    """Whether this process is a side-by-side worker that shows no progress bar or model summary (``QUIET``)."""
    return os.environ.get(QUIET) == "1"


def chains(job_overrides: Sequence[Sequence[str]]) -> list[list[int]]:
    """The jobs (their positions) grouped into chains: jobs whose overrides differ only in ``trainer.max_epochs``
    (``sharing.epoch_groups``), each chain in increasing epoch count, the chains in the order of their first job."""
    from vit.sharing import epoch_groups

    return [[n for n, _ in sorted(group, key=lambda job: (job[1] or 0, job[0]))] for group in epoch_groups(job_overrides)]


def workers_for(n_chains: int, n_jobs: int | None) -> int:
    """How many processes run the chains: ``n_jobs`` if set, else one per torch thread (no more than the chains); 1 on a
    CUDA machine (its GPU is one) and where processes cannot be forked."""
    import torch

    if n_jobs is not None:
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise ConfigError(f"hydra.launcher.n_jobs must be null (one per torch thread on a CPU) or an integer >= 1, got {n_jobs!r}")
        wanted = n_jobs
    elif torch.cuda.is_available():
        wanted = 1
    else:
        wanted = torch.get_num_threads()
    if "fork" not in multiprocessing.get_all_start_methods():
        wanted = 1
    return max(1, min(wanted, n_chains))


class ChainLauncher(Launcher):
    """Hydra launcher (``hydra/launcher=chains``, the default): see the module's docstring."""

    def __init__(self, n_jobs: int | None = None) -> None:
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        groups = chains(job_overrides)
        workers = workers_for(len(groups), self.n_jobs)
        if workers == 1:
            basic = BasicLauncher()
            basic.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
            return basic.launch(job_overrides, initial_job_idx)
        import torch

        threads = max(1, torch.get_num_threads() // workers)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            "Launching %d jobs in %d chains, %d at a time, %d torch thread%s each (hydra.launcher.n_jobs=1: one after another)",
            len(job_overrides),
            len(groups),
            workers,
            threads,
            "s" if threads != 1 else "",
        )
        for chain in groups:
            log.info("\tchain: %s", "; ".join(f"#{initial_job_idx + n} {' '.join(filter_overrides(job_overrides[n]))}" for n in chain))
        jobs = [[(initial_job_idx + n, with_threads(job_overrides[n], threads)) for n in chain] for chain in groups]
        return self._run_side_by_side(jobs, workers, threads)

    def _run_side_by_side(self, jobs: list[list[tuple[int, list[str]]]], workers: int, threads: int) -> list[JobReturn]:
        """Forked workers take chains from a queue and send back each job's ``JobReturn``; in the order of the jobs."""
        context = multiprocessing.get_context("fork")
        queue = context.SimpleQueue()
        for chain in jobs:
            queue.put(chain)
        for _ in range(workers):
            queue.put(None)
        results = context.SimpleQueue()
        processes = [context.Process(target=self._work, args=(queue, results, threads, index > 0), daemon=False) for index in range(workers)]
        for process in processes:
            process.start()
        returns: dict[int, JobReturn] = {}
        expected = sum(len(chain) for chain in jobs)
        try:
            while len(returns) < expected:
                if not results.empty():
                    number, ret = results.get()
                    returns[number] = ret
                elif any(process.is_alive() for process in processes):
                    time.sleep(0.1)
                elif results.empty():
                    break
        except KeyboardInterrupt:
            for process in processes:  # each worker saw the Ctrl-C too: it saves its job's interrupted.ckpt and stops
                process.join()
            sweep_dir = self.config.hydra.sweep.dir
            print(
                f"\nInterrupted: the sweep's finished jobs are kept in {sweep_dir}; to go on, run the same command with "
                f"hydra.sweep.dir={sweep_dir} (finished jobs are read back, stopped ones resume where they stopped)",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        for process in processes:
            process.join()
        for chain in jobs:
            for number, overrides in chain:
                if number not in returns:
                    returns[number] = failed(overrides, f"job {number}'s worker process ended without a result (exit code {exit_codes(processes)})")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [returns[number] for number in sorted(returns)]

    def _work(self, queue: Any, results: Any, threads: int, quiet: bool) -> None:
        """A worker: one chain after another from ``queue``, each job as the basic launcher runs it; ``quiet``: without
        progress bar and model summary (``quiet_worker``)."""
        import torch

        signal.signal(signal.SIGINT, signal.default_int_handler)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for any process a job starts
        if quiet:
            os.environ[QUIET] = "1"
        state = Singleton.get_state()
        try:
            self._work_chains(queue, results, state)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C (Lightning ends an interrupted fit with SystemExit): the
            return  # launching process says how to go on; the jobs this worker did not finish get no result

    def _work_chains(self, queue: Any, results: Any, state: Any) -> None:
        """One chain after another from ``queue`` until its end mark; each job's ``JobReturn`` to ``results``."""
        while (chain := queue.get()) is not None:
            for number, overrides in chain:
                setup_globals()
                Singleton.set_state(state)
                try:
                    sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                    with open_dict(sweep_config):
                        sweep_config.hydra.job.id = number
                        sweep_config.hydra.job.num = number
                    ret = run_job(
                        hydra_context=self.hydra_context,
                        task_function=self.task_function,
                        config=sweep_config,
                        job_dir_key="hydra.sweep.dir",
                        job_subdir_key="hydra.sweep.subdir",
                    )
                except Exception as e:  # noqa: BLE001 - Hydra's own steps failed: this job fails, the worker goes on
                    ret = failed(overrides, f"job {number}: {e}")
                results.put((number, portable(ret)))


def with_threads(overrides: Sequence[str], threads: int) -> list[str]:
    """A job's overrides with its share of the threads, unless the sweep sets ``torch_threads`` itself."""
    given = any(o.startswith(("torch_threads=", "+torch_threads=", "++torch_threads=")) for o in overrides)
    return list(overrides) if given else [*overrides, f"torch_threads={threads}"]


def portable(ret: JobReturn) -> JobReturn:
    """``ret`` as it can cross to the launching process: its configs as plain ones (Hydra's hold classes that do not
    pickle), a return value that does not pickle as its text."""
    slim = JobReturn(overrides=ret.overrides, working_dir=ret.working_dir, task_name=ret.task_name, status=ret.status)
    slim.cfg, slim.hydra_cfg = (
        OmegaConf.create(OmegaConf.to_container(c, resolve=False)) if c is not None else None for c in (ret.cfg, ret.hydra_cfg)
    )
    value = ret._return_value
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - whatever it holds, the sweep gets its text
        value = RuntimeError(repr(value)) if ret.status == JobStatus.FAILED else repr(value)
    slim.return_value = value
    return slim


def failed(overrides: list[str], why: str) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = RuntimeError(why)
    return ret


def exit_codes(processes: list) -> str:
    return ", ".join(str(p.exitcode) for p in processes)
