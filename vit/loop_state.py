"""What this project reads of Lightning's loop state, in one place: the counts live in the fit loop's attributes,
which are not a public API and may move between Lightning releases (tests/test_loop_state.py says when they do)."""

from __future__ import annotations

import lightning as L


def batches_before_this_one(trainer: L.Trainer) -> int:
    """In ``on_after_batch_transfer`` of a training batch: this epoch's training batches before it (its index,
    also in an epoch resumed in the middle)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def batches_trained(trainer: L.Trainer) -> int:
    """This epoch's training batches trained so far, as Lightning stores and restores them with a checkpoint."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def in_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether a training epoch has started and not finished (a checkpoint now is a Ctrl-C's, not an epoch end's)."""
    epochs = trainer.fit_loop.epoch_progress.total
    return epochs.processed < epochs.started
