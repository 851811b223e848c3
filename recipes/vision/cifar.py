"""CIFAR-10 from the standard python-pickle batch files, and an optional download of them (no torchvision).

The layout is the one of ``cifar-10-python.tar.gz`` (and of ``torchvision.datasets.CIFAR10``'s download):
``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}``; a directory holding the batch files directly works
too. Each file is a pickled dict with ``data`` (uint8 ``[10000, 3072]``, rows of R, G, B planes of 32×32) and
``labels`` (ints 0..9). The files are read with a restricted unpickler that only rebuilds numpy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CIFAR10_MD5", "CIFAR10_URL", "cifar10_dir", "download_cifar10", "load_cifar10", "require_cifar10_dir"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's array-unpickling helper, wherever numpy keeps it


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers, and refuses every other global."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch") from None


def cifar10_dir(root: str | Path) -> Path | None:
    """The directory under ``root`` that holds all six batch files (``root/cifar-10-batches-py`` or ``root``)."""
    root = Path(root).expanduser()
    for candidate in (root / _FOLDER, root):
        if all((candidate / name).is_file() for name in _TRAIN_FILES + _TEST_FILES):
            return candidate
    return None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            raw = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a CIFAR-10 python batch file ({error})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(raw).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: missing 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data of shape [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: expected {len(data)} labels in 0..9, got shape {labels.shape}")
    return data, labels


def require_cifar10_dir(root: str | Path) -> Path:
    """:func:`cifar10_dir`, or :class:`FileNotFoundError` saying how to get the files."""
    directory = cifar10_dir(root)
    if directory is None:
        raise FileNotFoundError(
            f"CIFAR-10 batch files not found under {Path(root).expanduser()} (expected {_FOLDER}/data_batch_1..5 "
            f"and {_FOLDER}/test_batch). Fix: set data.download=true to fetch {CIFAR10_URL}, or unpack "
            "cifar-10-python.tar.gz there (a torchvision CIFAR10 download directory works as it is).")
    return directory


def load_cifar10(root: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """Load a CIFAR-10 split as ``(uint8 images [N, 3, 32, 32], int64 labels [N])``.

    ``train=True`` concatenates ``data_batch_1..5`` (50,000 images), ``False`` reads ``test_batch`` (10,000).
    Missing files raise :class:`FileNotFoundError` with the fix; malformed files :class:`ValueError`.
    """
    directory = require_cifar10_dir(root)
    parts = [_read_batch(directory / name) for name in (_TRAIN_FILES if train else _TEST_FILES)]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(data), torch.from_numpy(labels)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(root: str | Path, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5) -> Path:
    """Download and unpack the CIFAR-10 python archive into ``root`` unless the batch files are already there.

    The archive's MD5 is checked (``md5=None`` skips the check) and only the expected batch files are extracted
    (no path from the archive is trusted). Returns the directory holding the batch files.
    """
    root = Path(root).expanduser()
    found = cifar10_dir(root)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    partial = archive.with_suffix(".gz.part")
    with urllib.request.urlopen(url) as response, partial.open("wb") as fh:  # noqa: S310 (fixed or user URL)
        shutil.copyfileobj(response, fh)
    if md5 is not None and _md5(partial) != md5:
        partial.unlink()
        raise ValueError(f"{url}: MD5 mismatch (expected {md5}); the download is corrupt, try again")
    partial.replace(archive)
    target = root / _FOLDER
    target.mkdir(exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for name in _TRAIN_FILES + _TEST_FILES + ("batches.meta",):
            try:
                member = tar.getmember(f"{_FOLDER}/{name}")
            except KeyError:
                raise ValueError(f"{archive}: no {_FOLDER}/{name} in the archive") from None
            source = tar.extractfile(member)
            if source is None:
                raise ValueError(f"{archive}: {member.name} is not a regular file")
            with source, (target / name).open("wb") as out:
                shutil.copyfileobj(source, out)
    return target
