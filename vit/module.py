"""The LightningModule: trains any classifier net given to it with cross-entropy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vit import loop_state
from vit.augment import batch_generator, mix
from vit.errors import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
TRAIN_METRICS = ("train_acc", "train_loss")


def _takes_module(factory: OptimizerFactory) -> bool:
    """Whether the optimizer wants the net itself rather than its parameters (``vit.optim.MuonAdamW`` routes them by the
    module that holds each: a Linear's weight, a table, the output layer)."""
    return getattr(getattr(factory, "func", factory), "takes_module", False)


class ClassifierModule(L.LightningModule):
    """Wraps ``net`` ((b, c, h, w) -> (b, n_classes) logits) for training, validation and test.

    ``optimizer`` is a partial taking the parameters (``_partial_: true`` in config);
    ``scheduler`` a partial taking the optimizer and ``total_steps`` and stepped every batch.
    ``label_smoothing``, ``mixup_alpha`` and ``cutmix_alpha`` change the training loss only:
    validation and test report plain cross-entropy, comparable across runs. On a mixed batch
    ``train/acc`` counts a prediction right when it is the label that dominates the image.
    ``tta_flip`` (test-time augmentation) averages the logits of each image and its mirror image
    in validation and test: one more forward pass for a steadier prediction. ``tta_shift`` > 0 adds
    the image moved by that many pixels down-right and up-left (edges reflected), and with
    ``tta_flip`` their mirror images too: 3 or 6 views, as the CNN speed runs evaluate.
    ``config`` (the run's resolved config as plain containers) is stored in every
    checkpoint so ``test.py`` can rebuild the net and the data from the file alone.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        config: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        tta_flip: bool = False,
        tta_shift: int = 0,
    ):
        super().__init__()
        if not isinstance(tta_shift, int) or tta_shift < 0:
            raise ConfigError(f"module.tta_shift must be an integer >= 0 (pixels; 0 = off), got {tta_shift!r}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"module.label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError(f"module.mixup_alpha and module.cutmix_alpha must be >= 0 (0 = off), got {mixup_alpha} and {cutmix_alpha}")
        self.label_smoothing, self.mixup_alpha, self.cutmix_alpha = label_smoothing, mixup_alpha, cutmix_alpha
        self.tta_flip, self.tta_shift = tta_flip, tta_shift
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if optimizer is not None:
            self._check_optimizer(optimizer)
        num_classes = num_classes or getattr(net, "n_classes", None)
        if num_classes is None:
            raise ValueError("num_classes is needed when the net has no n_classes attribute")
        self.save_hyperparameters({"config": config}, logger=False)
        # validate_args=False: the checks call torch.unique on every batch, a host sync on a GPU
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        # Evaluation losses as metric objects too: under DDP they sync exactly even when the ranks saw different
        # numbers of images (Lightning's sync_dist mean truncates the summed batch sizes to an integer).
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # The epoch's mean as a metric object, so a mid-epoch checkpoint can carry it; no NaN check (a host sync
        # every step on a GPU): StopOnNonFiniteLoss ends the run at the first non-finite loss.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self._train_metrics_to_log = False  # restored from a checkpoint written inside an epoch's validation

    def _check_optimizer(self, optimizer: OptimizerFactory) -> None:
        """Build it once (on a dummy parameter, or on the net for one that ``takes_module``), so bad settings fail now
        rather than after the data has loaded."""
        lr = getattr(optimizer, "keywords", {}).get("lr")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"optim.lr must be > 0, got {lr}")
        try:
            optimizer(self.net if _takes_module(optimizer) else [nn.Parameter(torch.zeros(1))])
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad optimizer settings (optim.*): {e}") from None

    def setup(self, stage: str) -> None:
        """One example image of the data's shape, so Lightning's model summary counts the FLOPs of a forward pass over it
        (without one it prints "Total FLOPs: 0")."""
        image_shape = getattr(self._trainer.datamodule if self._trainer else None, "image_shape", None)
        if self.example_input_array is None and callable(image_shape):
            self.example_input_array = torch.zeros(1, *image_shape())

    def forward(self, x: Tensor) -> Tensor:
        """The net's logits, run eagerly and with attention as plain matmuls: the model summary counts FLOPs through here,
        and a compiled graph would be compiled again for its one image, and the CPU's fused attention kernel counts as 0
        FLOPs. Training and evaluation call the net itself."""
        with torch.compiler.set_stance("force_eager"), sdpa_kernel(SDPBackend.MATH):
            return self.net(x)

    def evaluation_logits(self, x: Tensor) -> Tensor:
        """The logits validation, test and ``vit.predict`` judge by: averaged over ``test_views`` (``tta_flip``, ``tta_shift``)."""
        views = self.test_views(x)
        return sum(self.net(view) for view in views) / len(views)

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self.evaluation_logits(x)
        return F.cross_entropy(logits, y), logits.argmax(dim=1), y

    def test_views(self, x: Tensor) -> list[Tensor]:
        """The views of a batch that validation and test average over (``tta_flip``, ``tta_shift``); b c h w each."""
        views = [x]
        if self.tta_shift:
            s = self.tta_shift
            padded = F.pad(x, (s, s, s, s), mode="reflect")
            h, w = x.shape[-2:]
            views += [padded[..., :h, :w], padded[..., 2 * s :, 2 * s :]]  # moved down-right, up-left
        if self.tta_flip:
            views += [view.flip(-1) for view in views]  # the last axis is the width
        return views

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        target = y
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            seed = (self.hparams.get("config") or {}).get("seed") or 0
            generator = batch_generator(seed, self.global_rank, self.current_epoch, batch_idx, "cpu", purpose="mix")
            x, y_own, y_partner, weight = mix(x, y, self.mixup_alpha, self.cutmix_alpha, generator)
            logits = self.net(x)
            loss = weight * F.cross_entropy(logits, y_own, label_smoothing=self.label_smoothing) + (1 - weight) * F.cross_entropy(
                logits, y_partner, label_smoothing=self.label_smoothing
            )
            target = y_own if weight >= 0.5 else y_partner  # the image is mostly its partner: that is the right answer
        else:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        preds = logits.argmax(dim=1)
        self.train_acc.update(preds, target)  # update, not forward: no per-batch accuracy nobody logs
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y), sync_dist=True)
        self._log_train_metrics()
        return loss

    def _log_train_metrics(self) -> None:
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """In the middle of an epoch (Ctrl-C), the epoch's training metrics so far, so the resumed epoch reports all of it.

        One process's only: under DDP a mid-epoch resume's train metrics for that epoch cover the batches after it.
        """
        trainer = self._trainer
        if trainer is not None and trainer.world_size == 1 and loop_state.in_mid_epoch(trainer):
            checkpoint["train_metrics"] = {name: dict(getattr(self, name).metric_state) for name in TRAIN_METRICS}
            checkpoint["train_metrics_complete"] = loop_state.in_mid_validation(trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, states in checkpoint.get("train_metrics", {}).items():
            metric = getattr(self, name)
            for key, value in states.items():
                setattr(metric, key, value.to(metric.device))
            metric._update_count = max(metric._update_count, 1)  # what update() would have counted
        self._train_metrics_to_log = checkpoint.get("train_metrics_complete", False)

    def on_train_start(self) -> None:
        """A run resumed inside an epoch's validation trains no batch of that epoch (no ``training_step`` logs): its
        restored training metrics are logged here, for that epoch's end, which also resets them for the next."""
        if self._train_metrics_to_log:
            self._log_train_metrics()
            self._train_metrics_to_log = False

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.val_acc.update(preds, y)
        self.val_loss.update(loss, weight=len(y))
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss, preds, y = self._step(batch)
        self.test_acc.update(preds, y)
        self.test_loss.update(loss, weight=len(y))
        self.log("test/loss", self.test_loss, on_epoch=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        return {"preds": preds}  # for callbacks that draw test figures

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("this module was built for evaluation only (no optimizer)")
        optimizer = self.optimizer_factory(params=self.net if _takes_module(self.optimizer_factory) else self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
