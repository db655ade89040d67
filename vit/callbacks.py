"""Callbacks that keep runs safe: checkpoints that survive resuming and Ctrl-C, a stop on a diverged loss, RNG state."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from torch import Tensor

from vit import loop_state
from vit.errors import ConfigError

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted.ckpt"


class TrainingDiverged(ConfigError):
    """The loss became NaN or infinite; usually the learning rate is too high."""


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, made safe for runs that resume into a new run dir.

    - Resuming carries the best-checkpoint record (score and path) over even though the new run
      writes to another dir, so the final test uses the true best epoch, whichever run wrote it.
    - Files outside this run's own dir (an earlier run's best) are never deleted.
    - Ctrl-C saves ``interrupted.ckpt`` (mid-epoch) before the run exits; one that lands in a validation is resumed by
      validating again from that validation's first batch (``loop_state.validate_again``; ``RngState`` keeps the RNG).
    - ``last.ckpt`` is written at the end of every training epoch, after ``RunStats`` has recorded it (Lightning
      writes it at validation end when validating every n-th epoch, and skips it when the top-k did not change).
    - A run without validation (``trainer.limit_val_batches=0``) has no score to monitor: it keeps the last
      epoch, named ``WITHOUT_VALIDATION``.
    """

    WITHOUT_VALIDATION = "epoch{epoch:03d}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.limit_val_batches == 0 and self.monitor is not None:
            self.monitor, self.filename = None, self.WITHOUT_VALIDATION
        super().setup(trainer, pl_module, stage)

    def _should_save_on_train_epoch_end(self, trainer: L.Trainer) -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        return getattr(trainer, "_val_check_time_interval", None) is None and trainer.val_check_interval == 1.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or not self._should_save_on_train_epoch_end(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        validated = self.monitor is None or (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0
        if validated and self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        # A sweep's job that started from another (vit.sharing) holds copies of that job's checkpoints: the record
        # names its own copies, so its dir is complete and the files it tests are its own.
        own = self._own_copy
        self.best_model_path, self.kth_best_model_path = own(self.best_model_path), own(self.kth_best_model_path)
        self.best_k_models = {own(path): score for path, score in self.best_k_models.items()}
        last = own(state_dict.get("last_model_path", ""))
        if state_dict.get("dirpath") == self.dirpath or (last and self.dirpath and Path(last).parent == Path(self.dirpath)):
            self.last_model_path = last or self.last_model_path  # written over, not versioned (last-v1.ckpt)

    def _own_copy(self, path: str) -> str:
        """``path``, or the file of the same name in this run's checkpoint dir where there is one."""
        if not path or self.dirpath is None:
            return path
        copy = Path(self.dirpath) / Path(path).name
        return str(copy) if copy.is_file() else path

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        if self.dirpath is None or Path(previous).resolve().parent != Path(self.dirpath).resolve():
            return False
        return super()._should_remove_checkpoint(trainer, previous, current)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if loop_state.in_mid_validation(trainer):
            loop_state.validate_again(checkpoint)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and self.dirpath is not None and trainer.global_step > 0:
            path = str(Path(self.dirpath) / INTERRUPTED)
            trainer.save_checkpoint(path)
            print(f"\nInterrupted: saved {path}; resume with ckpt_path={path} (or the end of the last epoch: last.ckpt)")


class StopOnNonFiniteLoss(Callback):
    """Stops at the first NaN/inf training loss, before its gradients reach the weights or a checkpoint.

    Asking a GPU whether a loss is finite waits for the step to finish (a host sync), so there the
    check only flags the loss on the device and reads the flag every ``trainer.log_every_n_steps``
    steps (Lightning syncs there anyway to log) and at the end of every epoch, before any checkpoint
    is written: a diverged GPU run may take up to that many more steps before it stops, and no
    checkpoint ever holds its weights. On a CPU the check costs nothing and runs every step.
    ``every_step`` (None: on a CPU only) forces one way or the other.
    """

    def __init__(self, every_step: bool | None = None) -> None:
        self.every_step = every_step
        self._first_bad_step: torch.Tensor | None = None  # on the device: the first step with a non-finite loss, or -1

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if (loss.device.type == "cpu") if self.every_step is None else self.every_step:
            if not torch.isfinite(loss).all():
                self._stop(trainer, float(loss.detach().reshape(-1)[0]), trainer.global_step)
            return
        if self._first_bad_step is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all() & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, trainer.global_step, self._first_bad_step)
        if (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)  # Lightning runs checkpoint callbacks after the others

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            self._stop(trainer, float("nan"), int(self._first_bad_step))

    def _stop(self, trainer: L.Trainer, loss: float, step: int) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        fp32 = ", or train in fp32 (trainer.precision=32-true)" if "bf16" in str(trainer.precision) else ""
        raise TrainingDiverged(
            f"the training loss became {loss} at step {step} (epoch {trainer.current_epoch}): "
            f"lower optim.lr (now {lr:g}) or set trainer.gradient_clip_val=1.0{fp32}; the checkpoints saved before it are kept"
        )


def ema_with_warmup(decay: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """AveragedModel's ``avg_fn``: an exponential moving average whose decay grows as min(decay, (1 + n) / (10 + n))
    with the n updates so far (timm's ModelEma warmup), so the average forgets the random initial weights. A fixed
    decay of 0.999 keeps 0.999^n of them: 12% after 2,100 steps, where a run of ours had 38% on validation against
    73% without the average."""

    def update(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        n = num_averaged.to(averaged.dtype)
        return torch.lerp(averaged, current, 1 - torch.clamp((1 + n) / (10 + n), max=decay))

    return update


class WeightEMA(WeightAveraging):
    """An exponential moving average of the weights (``callbacks=ema``), updated after every optimizer step and
    validated, checkpointed and tested in place of the raw weights: the speed runs' cheap lever against the noise of
    the last steps. Its decay warms up (``ema_with_warmup``).

    Lightning's ``WeightAveraging``, with one fix: Lightning keeps the average after fitting, so the test that follows
    in the same Trainer would load the checkpoint's raw weights (its ``current_model_state``) over the averaged ones,
    and the run's ``test/acc`` would not be the average's. Here the average ends with the fit, and a checkpoint read
    outside fitting keeps the averaged ``state_dict``, as ``test.py`` reads it.
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay must be between 0 and 1 (0.999: an average over about 1,000 steps), got {decay!r}")
        super().__init__(avg_fn=ema_with_warmup(decay))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # resuming a fit: the average and the raw weights both come back
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class RngState(Callback):
    """Stores the RNG states in each checkpoint, so a resumed run draws what the uninterrupted one would.

    A checkpoint written in the middle of a validation (a Ctrl-C there) is resumed by validating again from the start
    (``RunCheckpoint``), and starting a validation draws from the RNG (its DataLoader's seed): such a checkpoint gets the
    CPU state from before the validation began, so the resumed run draws that once more.
    """

    def __init__(self) -> None:
        self._before_validation: Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._before_validation = torch.get_rng_state()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._before_validation is not None and loop_state.in_mid_validation(trainer):
            checkpoint["callbacks"][self.state_key]["torch"] = self._before_validation

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the CUDA states of the GPUs visible now (a run saved on more GPUs resumes on fewer)."""
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            states, visible = state_dict["cuda"], torch.cuda.device_count()
            for device, state in enumerate(states[:visible]):
                torch.cuda.set_rng_state(state, device)
            if len(states) > visible:
                log.warning("The checkpoint has the CUDA RNG states of %d GPUs, %d are visible: restored the first %d", len(states), visible, visible)


class RunStats(Callback):
    """Training time, throughput and the per-epoch validation curve, for reports; kept across resumes.

    A batch's time runs from the end of the one before it (or the start of its epoch, or the end of a validation)
    to its own end: fetching it, moving it to the device and preparing it there (``on_after_batch_transfer``:
    normalise, augment, resize), forward, backward and the optimizer step.
    """

    def __init__(self) -> None:
        self.train_time_s = 0.0  # wall time of the training batches (data, forward, backward, optimizer)
        self.images = 0
        self.history: list[dict[str, float]] = []
        self._batch_start = 0.0
        self._val: dict[str, float] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.train_time_s += now - self._batch_start
        self._batch_start = now
        self.images += len(batch[1]) * trainer.world_size  # DDP: every rank trains on a batch this size

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_start = time.perf_counter()  # a validation inside the epoch is not training time
        if not trainer.sanity_checking:
            self._val = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/loss", "val/acc")}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The val metrics of this epoch's validation only: callback_metrics keeps the last ones on epochs without one.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss_epoch", "train/acc")}
        self.history.append({"epoch": trainer.current_epoch, **metrics, **self._val})
        self._val = {}

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.train_time_s if self.train_time_s > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"train_time_s": self.train_time_s, "images": self.images, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_time_s, self.images, self.history = state_dict["train_time_s"], state_dict["images"], list(state_dict["history"])
