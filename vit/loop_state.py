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


def in_mid_validation(trainer: L.Trainer) -> bool:
    """Whether a fit's validation has started and not finished (a checkpoint now is a Ctrl-C's: the top-k files are
    written once every validation batch is done)."""
    if trainer.sanity_checking or not (trainer.validating and trainer.state.fn == "fit"):
        return False
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress.current
    return progress.completed < sum(trainer.num_val_batches)


def validate_again(checkpoint: dict) -> None:
    """Rewinds a fit checkpoint written in the middle of a validation to that validation's first batch, begun: Lightning
    resumes such a checkpoint by running the validation's remaining batches, counted but not skipped, so the epoch's
    figure would come from its first batches only; from the first batch it runs them all."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    for counts in (progress["total"], progress["current"]):
        counts.update(ready=1, started=1, processed=0, completed=0)
    progress["is_last_batch"] = False
