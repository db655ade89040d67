"""A sweep trains no epoch twice: a job that is another job of its sweep trained for more epochs starts where that one ended.

The design card's sweep ``trainer.max_epochs=10,20 data.batch_size=32,64 optim.lr=1e-3,1e-4`` holds four pairs of jobs
that differ only in ``trainer.max_epochs``. Without a schedule over the epochs (``scheduler=none``), progressive resizing
(``data.train_sizes``) or an early stop, nothing in a run depends on its epoch count, and the batches of an epoch come
from the seed: the 20-epoch job's first 10 epochs are the 10-epoch job. So the longer job copies the shorter job's dir
(its checkpoints, TensorBoard events) into its own and resumes from its ``last.ckpt``; it ends as it would have alone
(``tests/test_sharing.py`` compares them exactly), with a complete job dir of its own. ``share_epochs=false`` trains
every job on its own.

A sweep run again into its dir (``hydra.sweep.dir=DIR``, after Ctrl-C or a crash) trains nothing twice either: a job
that finished is read back, a job that stopped resumes from where it stopped (``checkpoints.resume_point``).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vit.checkpoints import load, settings_that_differ, stop_points
from vit.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that may differ between two jobs that share: where they write, and the epoch count itself.
UNSHARED_KEYS = ("paths", "trainer.max_epochs", "ckpt_path")
# Files of the shorter job's dir that the longer job does not take: its own config, log, results and stop points.
NOT_COPIED = (".hydra", "metrics.json", "run.json", "job.json", "train.log", "checkpoints/last.ckpt", "checkpoints/interrupted.ckpt")


def blockers(cfg: DictConfig) -> list[str]:
    """Why a run of ``cfg`` depends on its epoch count, so that a shorter run is no prefix of it; empty when none."""
    reasons = []
    if cfg.get("scheduler"):
        reasons.append("a learning-rate schedule over the run (scheduler=none has none)")
    if (cfg.get("data") or {}).get("train_sizes"):
        reasons.append("progressive resizing (data.train_sizes)")
    if any("EarlyStopping" in str((node or {}).get("_target_", "")) for node in (cfg.get("callbacks") or {}).values()):
        reasons.append("an early stop")
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
    if not isinstance(max_epochs, int) or max_epochs < 1:
        reasons.append("no epoch limit (trainer.max_epochs)")
    if max_steps not in (None, -1):
        reasons.append("a step limit (trainer.max_steps)")
    return reasons


def job_overrides() -> list[str]:
    """The overrides of this job of a multirun (what makes it this job), from Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def share_key(config: DictConfig | dict) -> str:
    """The config as written, less ``UNSHARED_KEYS``: two jobs with the same key differ at most in their epoch count."""
    plain = OmegaConf.to_container(config, resolve=False) if OmegaConf.is_config(config) else json.loads(json.dumps(config))
    for key in UNSHARED_KEYS:
        section, _, name = key.partition(".")
        if name:
            (plain.get(section) or {}).pop(name, None)
        else:
            plain.pop(section, None)
    return json.dumps(plain, sort_keys=True, default=str)


def is_compiled(net: Any) -> bool:
    """Whether ``net`` runs through ``torch.compile`` (``nn.Module.compile``), whose rounding differs from eager's."""
    return getattr(net, "_compiled_call_impl", None) is not None


def finished_epochs(job_dir: Path) -> int | None:
    """The epochs a finished job trained (its run.json's history), or None while it is not finished."""
    try:
        summary = json.loads((job_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not (job_dir / "metrics.json").is_file() or not (job_dir / "checkpoints" / "last.ckpt").is_file():
        return None
    return len(summary.get("history") or []) or None


def longest_prefix(cfg: DictConfig, job_dir: Path, compiled: bool = False) -> tuple[Path, int] | None:
    """The finished job of this sweep (a sibling of ``job_dir``) with the same config but fewer epochs, the most of
    them; with how many. None where there is none, or where ``cfg`` cannot share (``blockers``). ``compiled``: whether
    this job's net is compiled (``model.compile=auto`` decides by the run's length): a sibling that ran the other way
    rounded otherwise, and is no prefix."""
    if blockers(cfg):
        return None
    written = job_dir / ".hydra" / "config.yaml"  # compared as written, like the siblings' own
    key, own = share_key(OmegaConf.load(written) if written.is_file() else cfg), cfg.trainer.max_epochs
    found: tuple[Path, int] | None = None
    for config_file in sorted(job_dir.parent.glob("*/.hydra/config.yaml")):
        sibling = config_file.parent.parent
        if sibling == job_dir:
            continue
        try:
            other = OmegaConf.load(config_file)
        except Exception:  # noqa: BLE001 - a damaged sibling is simply not shared
            continue
        epochs = OmegaConf.select(other, "trainer.max_epochs")  # None for a sibling whose config is still being written
        if not isinstance(epochs, int) or not 0 < epochs < own or share_key(other) != key:
            continue
        if finished_epochs(sibling) == epochs and ran_compiled(sibling) == compiled and (found is None or epochs > found[1]):
            found = (sibling, epochs)
    return found


def ran_compiled(job_dir: Path) -> bool:
    try:
        return bool(json.loads((job_dir / "run.json").read_text()).get("compiled"))
    except (OSError, ValueError):
        return False


def adopt(prefix: Path, job_dir: Path) -> Path:
    """Copies the shorter job's dir into this job's (its checkpoints but ``last.ckpt``, its TensorBoard events and any
    other logger's files), so this job's dir is complete; returns the checkpoint to resume from."""
    for path in sorted(prefix.rglob("*")):
        relative = path.relative_to(prefix)
        if path.is_dir() or any(relative.as_posix() == skip or relative.as_posix().startswith(skip + "/") for skip in NOT_COPIED):
            continue
        target = job_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.startswith("events.out.tfevents."):
            copy_events(path, target)
        else:
            shutil.copy2(path, target)
    return prefix / "checkpoints" / "last.ckpt"


# What a run logs at its end (its test, its hparams summary): the shorter job's, not this job's.
RUN_END_TAGS = ("test/", "hparams/", "_hparams_/")


def copy_events(source: Path, target: Path, drop: tuple[str, ...] = RUN_END_TAGS) -> None:
    """A TensorBoard event file without the points tagged ``drop``: the shorter job's test figures and run summary are not
    this job's, whose curves end at the shorter job's last epoch until its own training goes on."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    with open(target, "wb") as f:
        writer = RecordWriter(f)
        for record in RawEventFileLoader(str(source)).Load():
            event = Event.FromString(record)
            if event.HasField("summary"):
                kept = [value for value in event.summary.value if not value.tag.startswith(drop)]
                if not kept:
                    continue
                del event.summary.value[:]
                event.summary.value.extend(kept)
            writer.write(event.SerializeToString())
        writer.flush()


def alone_command(overrides: list[str]) -> str:
    return "python train.py " + " ".join(shlex.quote(o) for o in [*overrides, "share_epochs=false"])


def plan(cfg: DictConfig, stored: dict, compiled: bool = False) -> dict[str, Any] | None:
    """For a job of a multirun with ``share_epochs`` on: where it starts. ``{"resume": ckpt}`` when its own dir holds a
    stop point (a sweep run again), ``{"done": metrics}`` when it finished already, ``{"resume": ckpt, "from": dir,
    "epochs": n}`` when it starts from a shorter job; None: it trains from scratch. ``stored``: this run's stored config
    (``checkpoints.stored_config``), which a finished job's must match; ``compiled``: see ``longest_prefix``."""
    if not in_sweep() or cfg.get("ckpt_path"):
        return None
    job_dir = Path(cfg.paths.output_dir)
    if (job_dir / "metrics.json").is_file() and finished_epochs(job_dir) == cfg.trainer.get("max_epochs"):
        differ = settings_that_differ(load(job_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"], stored)
        if differ:
            raise ConfigError(
                f"job {job_dir.name} of this sweep dir finished with {', '.join(differ)}: run the changed sweep into a new dir "
                "(leave out hydra.sweep.dir)"
            )
        log.info("Job %s finished in an earlier run of this sweep: its results are kept, not trained again", job_dir.name)
        return {"done": json.loads((job_dir / "metrics.json").read_text())}
    stops = stop_points(job_dir)
    if stops:
        ckpt = max(stops, key=lambda f: f.stat().st_mtime)
        log.info("Job %s stopped in an earlier run of this sweep: resuming from %s", job_dir.name, ckpt)
        return {"resume": str(ckpt)}
    if not cfg.get("share_epochs", True):
        return None
    found = longest_prefix(cfg, job_dir, compiled)
    if found is None:
        return None
    prefix, epochs = found
    ckpt = adopt(prefix, job_dir)
    log.info(
        "Job %s is job %s trained on: it starts from that job's epoch %d (%s) instead of training those epochs again. Alone: %s",
        job_dir.name,
        prefix.name,
        epochs,
        ckpt,
        alone_command(job_overrides()),
    )
    return {"resume": str(ckpt), "from": str(prefix), "epochs": epochs}


EPOCHS = "trainer.max_epochs="


def epoch_groups(jobs: Sequence[Sequence[str]]) -> list[list[tuple[int, int | None]]]:
    """The jobs of a sweep (their overrides) grouped by all but ``trainer.max_epochs``, in the order given: each job as
    (its position, its epoch count, None where it sets none): the jobs that may share epochs, and the launcher's chains."""
    groups: dict[tuple[str, ...], list[tuple[int, int | None]]] = {}
    for number, job in enumerate(jobs):
        epochs = next((o[len(EPOCHS) :] for o in reversed(job) if o.startswith(EPOCHS)), "")
        groups.setdefault(tuple(o for o in job if not o.startswith(EPOCHS)), []).append((number, int(epochs) if epochs.isdigit() else None))
    return list(groups.values())


def sharing_lines(task_overrides: list[str], cfg: DictConfig, launcher: str) -> list[str]:
    """What the sweep's first lines say: which jobs share epochs, and why the others don't (for Hydra's basic sweeper,
    whose job list is the product of the overrides' values in the order given)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(task_overrides), None) for job in batch]
    if not cfg.get("share_epochs", True):
        return ["Sharing epochs: off (share_epochs=false): every job trains on its own."]
    reasons = blockers(cfg)
    if reasons:
        return [f"Sharing epochs: none; a job is no prefix of a longer one with {' and '.join(reasons)}: every job trains on its own."]
    if not launcher.endswith(("BasicLauncher", "ChainLauncher")):
        return [
            f"Sharing epochs: the jobs run side by side ({launcher.rsplit('.', 1)[-1]}): a job starts from a shorter one only if that "
            "one finished before it started; the others train on their own."
        ]
    shared, backwards = [], []
    for group in epoch_groups(jobs):
        members = [(number, epochs) for number, epochs in group if epochs is not None]
        for i, (number, epochs) in enumerate(members):
            earlier = [(n, e) for n, e in members[:i] if e < epochs]
            if earlier:
                n, e = max(earlier, key=lambda m: m[1])
                shared.append(f"job {number} ({epochs} epochs) starts from job {n}'s {e}")
            elif any(e > epochs for _, e in members[:i]):
                backwards.append(str(number))
    lines = [
        f"Sharing epochs: {'; '.join(shared)} (share_epochs=false: each on its own)."
        if shared
        else "Sharing epochs: no job is another trained for fewer epochs."
    ]
    if backwards:
        lines.append(
            f"Jobs {', '.join(backwards)} run after a longer job of the same config: list trainer.max_epochs in increasing order to share them."
        )
    return lines


class ShareReport(Callback):
    """Hydra callback: the sweep's first lines say which jobs share epochs and why the others don't."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = str(config.hydra.sweeper.get("_target_", ""))
        if not sweeper.endswith("BasicSweeper"):
            return
        try:
            lines = sharing_lines(list(config.hydra.overrides.task), config, str(config.hydra.launcher.get("_target_", "")))
        except Exception as e:  # noqa: BLE001 - a plan that cannot be told must not stop the sweep
            lines = [f"Sharing epochs: could not tell which jobs share ({e}); each job says so in its log."]
        for line in lines:
            print(line, flush=True)
