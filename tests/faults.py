"""Faults injected through config (``+callbacks.NAME._target_=tests.faults....``), for the reliability tests."""

import os
import signal

import lightning as L
import torch


class KillAtStep(L.Callback):
    """kill -9 of the own process after ``step`` optimizer steps: a crash mid-epoch."""

    def __init__(self, step: int, sig: str = "SIGKILL"):
        self.step, self.sig = step, getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


class PoisonAtEpoch(L.Callback):
    """Fills the first weight with NaN when ``epoch`` starts, so the next loss is NaN."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))
