"""LightningModule for the vision recipe."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from recipes.vision.models import build_model

__all__ = ["ImageClassifier"]


class ImageClassifier(LightningModule):
    """Cross-entropy image classifier trained with SGD + momentum and a cosine LR schedule.

    Args:
        model: a name from :data:`recipes.vision.models.MODELS` (``"small_cnn"``, ``"mlp"``, ``"resnet20"``, ...) or
            ``"torchvision:<name>"``.
        num_classes: number of output classes.
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR-10).
        image_size: image side in pixels (28 or 32).
        model_options: keyword arguments of the model (e.g. ``{"hidden": 128}`` for ``small_cnn``).
        lr: peak SGD learning rate.
        momentum: SGD momentum (``nesterov=False``).
        weight_decay: L2 weight decay applied to all parameters.
        max_lr_epochs: length (in epochs) of the cosine annealing schedule. ``None`` uses
            ``trainer.max_epochs`` when it is a positive number; otherwise the LR stays constant.

    Logs ``train/loss`` (per step, progress bar), ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
    (per epoch, reduced over processes). Accuracy is plain (micro-averaged) top-1 accuracy.
    """

    def __init__(
        self,
        model: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        model_options: dict[str, Any] | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_lr_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if max_lr_epochs is not None and (isinstance(max_lr_epochs, bool) or int(max_lr_epochs) < 1):
            raise ValueError(f"max_lr_epochs must be None or a positive int, got {max_lr_epochs!r}")
        self.save_hyperparameters()
        self.model = build_model(model, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                 **(model_options or {}))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.size(0))
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], prefix: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        n = x.size(0)
        self.log(f"{prefix}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
        # A torchmetrics object synchronizes its own state across processes when computed.
        self.log(f"{prefix}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def _schedule_epochs(self) -> int | None:
        if self.hparams.max_lr_epochs is not None:
            return int(self.hparams.max_lr_epochs)
        trainer = self._trainer  # `self.trainer` raises when no Trainer is attached
        max_epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        if max_epochs is not None and max_epochs > 0:
            return int(max_epochs)
        return None

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
            nesterov=False,
        )
        epochs = self._schedule_epochs()
        if epochs is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
