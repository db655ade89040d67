"""Faults and probes injected through config (``+callbacks.NAME._target_=tests.faults....``), for the reliability tests."""

import os
import signal
from pathlib import Path

import lightning as L
import torch


class KillAtStep(L.Callback):
    """``sig`` (kill -9 by default: a crash mid-epoch) to the own process after ``step`` optimizer steps, or, with
    ``validation_batch``, in the validation that follows ``step`` steps: inside that batch's forward pass (where a
    Ctrl-C mostly lands) or, with ``after_batch``, once the batch is done. ``group``: to the whole process group, as a
    terminal's Ctrl-C does (only for a run started in a session of its own)."""

    def __init__(self, step: int, sig: str = "SIGKILL", group: bool = False, validation_batch: int | None = None, after_batch: bool = False):
        self.step, self.sig, self.group = step, getattr(signal, sig), group
        self.validation_batch, self.after_batch = validation_batch, after_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.validation_batch is None and trainer.global_step == self.step:
            self._kill()

    def _this_batch(self, trainer, batch_idx: int) -> bool:
        return not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == self.validation_batch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not self.after_batch and self._this_batch(trainer, batch_idx):
            pl_module.net.register_forward_pre_hook(lambda *_: self._kill())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.after_batch and self._this_batch(trainer, batch_idx):
            self._kill()

    def _kill(self) -> None:
        if self.group:
            os.killpg(os.getpgrp(), self.sig)
        else:
            os.kill(os.getpid(), self.sig)


def kill_at(step: int, sig: str = "SIGKILL", group: bool = False, validation_batch: int | None = None, after_batch: bool = False) -> list[str]:
    """The overrides that add ``KillAtStep`` to a run as ``callbacks.stop``."""
    return [
        "+callbacks.stop._target_=tests.faults.KillAtStep",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.sig={sig}",
        *(["+callbacks.stop.group=true"] if group else []),
        *([f"+callbacks.stop.validation_batch={validation_batch}"] if validation_batch is not None else []),
        *(["+callbacks.stop.after_batch=true"] if after_batch else []),
    ]


class PoisonAtEpoch(L.Callback):
    """Fills the first weight with NaN when ``epoch`` starts, so the next loss is NaN."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class SaveAugmentation(L.Callback):
    """Augments one fixed batch as the first training batch is, and saves the result as ``augment_rank<rank>.pt``.

    The same images on every rank: what differs is only the random draws, per rank.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            images = torch.arange(4 * 3 * 32 * 32).remainder(251).to(torch.uint8).view(4, 3, 32, 32)
            augmented, _ = trainer.datamodule.on_after_batch_transfer((images, torch.zeros(4, dtype=torch.long)), 0)
            torch.save(augmented, self.out_dir / f"augment_rank{trainer.global_rank}.pt")


def truncate(path: Path, keep: int | None = None) -> None:
    """Cuts a file short, as a copy or a disk fault can: to ``keep`` bytes, half of it by default."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2 if keep is None else keep])
