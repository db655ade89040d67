"""TensorBoard figures drawn at test time: the confusion matrix and a grid of predictions."""

from __future__ import annotations

from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

MAX_COUNTED_CLASSES = 20  # beyond this (CIFAR-100) the cells are too small to hold their counts


def confusion_figure(matrix: Tensor, classes: list[str]) -> plt.Figure:
    """Rows: true class, columns: predicted; counts written in the cells for up to 20 classes, a bounded heat map beyond."""
    n = len(classes)
    side = min(1 + 0.6 * n, 16)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(matrix.numpy(), cmap="Blues")
    labels = None if n <= MAX_COUNTED_CLASSES else 4  # tick label font size (None: the default)
    ax.set_xticks(range(n), classes, rotation=45 if n <= MAX_COUNTED_CLASSES else 90, ha="right", fontsize=labels)
    ax.set_yticks(range(n), classes, fontsize=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = float(matrix.max()) if matrix.numel() else 0.0
    for i in range(n if n <= MAX_COUNTED_CLASSES else 0):
        for j in range(n):
            value = int(matrix[i, j])
            ax.text(j, i, value, ha="center", va="center", fontsize=7, color="white" if value > top / 2 else "black")
    accuracy = float(matrix.diag().sum() / matrix.sum().clamp(min=1))
    ax.set_title(f"test confusion matrix, accuracy {100 * accuracy:.2f}%")
    fig.tight_layout()
    return fig


def predictions_figure(images: Tensor, labels: Tensor, preds: Tensor, classes: list[str], columns: int = 8) -> plt.Figure:
    """images: float (b, c, h, w) in [0, 1]. Wrong predictions are titled in red with the true class."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, pred in zip(axes.flat, images, labels.tolist(), preds.tolist()):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ok = label == pred
        ax.set_title(classes[pred] if ok else f"{classes[pred]}\n(true: {classes[label]})", fontsize=7, color="green" if ok else "red")
    fig.suptitle("test predictions (red: wrong)", fontsize=9)
    fig.tight_layout()
    return fig


class LogTestFigures(Callback):
    """Logs ``test/confusion_matrix`` and ``test/predictions`` (the first ``num_images`` test images) to TensorBoard."""

    def __init__(self, num_images: int = 32):
        self.num_images = num_images
        self.confusion: MulticlassConfusionMatrix | None = None
        self.samples: tuple[Tensor, Tensor, Tensor] | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(len(trainer.datamodule.classes)).to(pl_module.device)
        self.samples = None

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        self.confusion.update(outputs["preds"], labels)
        if self.samples is None:
            n = self.num_images
            self.samples = (images[:n].float().cpu(), labels[:n].cpu(), outputs["preds"][:n].cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = self.confusion.compute().cpu()
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not trainer.is_global_zero or not loggers or self.samples is None:
            return
        datamodule = trainer.datamodule
        classes = list(datamodule.classes)
        images, labels, preds = self.samples
        images = (images * datamodule.std.cpu() + datamodule.mean.cpu()).clamp(0, 1)  # undo the normalisation (samples are on the CPU)
        figures = {"test/confusion_matrix": confusion_figure(matrix, classes), "test/predictions": predictions_figure(images, labels, preds, classes)}
        for tag, fig in figures.items():
            for logger in loggers:
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step)
            plt.close(fig)
