"""Command line of the vision recipe: ``python -m recipes.vision {fit,validate,test,predict} --config ...``.

The data module decides the input shape and the number of classes; they are linked into the model
(``data.num_classes``, ``data.in_channels``, ``data.image_size`` -> ``model.*``), so configs set only the data
source and the model name. See ``recipes/vision/configs/`` and ``docs/recipes/vision.md``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser

from recipes.common import DoptCLI
from recipes.vision.data import ImageClassificationData
from recipes.vision.module import ImageClassifier

__all__ = ["VisionCLI", "main"]


class VisionCLI(DoptCLI):
    """:class:`~recipes.common.DoptCLI` for :class:`ImageClassifier` on :class:`ImageClassificationData`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        for key in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def summary(self, metrics: dict[str, float]) -> str:
        """``Averaged model (4 replicas): test accuracy 90.12% on 10,000 fashion_mnist test images after ...``
        (``Model:`` for other strategies). With a spawn launcher this process did not train, so the counts it
        cannot know are left out."""
        trainer, data = self.trainer, self.datamodule
        images = f"{len(data.test_dataset):,} " if data.test_dataset is not None else ""
        epochs = trainer.current_epoch
        progress = (f" after {trainer.global_step} optimizer steps in {epochs} epoch{'' if epochs == 1 else 's'}"
                    if trainer.global_step else "")
        accuracy = 100 * metrics.get("test/acc", float("nan"))
        return (f"{self.model_label()}: test accuracy {accuracy:.2f}% on {images}{data.source} test images{progress} "
                f"(fit: {self.fit_seconds:.0f} s on {trainer.world_size} processes, "
                f"strategy {type(trainer.strategy).__name__}).")


def main(args: list[str] | None = None) -> VisionCLI:
    """Run the vision command line (``args=None`` reads ``sys.argv``)."""
    return VisionCLI(ImageClassifier, ImageClassificationData, args=args)
