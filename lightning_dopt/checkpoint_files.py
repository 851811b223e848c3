"""Where a checkpoint's per-rank files live, and how every checkpoint file is written so a crash loses nothing.

Layout of a checkpoint saved at ``<path>`` by ``n`` ranks::

    <path>                         the main file: the averaged model (plain Lightning), with
                                   ``checkpoint["lightning_dopt"]["save_id"]`` naming the save it belongs to
    <path>.dopt/rank<r>-<id>.pt    rank r's "sidecar" of save <id>: replica, optimizer state, counters, RNG

Sidecars live in a directory (no digits are added to names beside the main file, where Lightning parses
``hpc_ckpt_<k>.ckpt`` version numbers) and carry the save id in their names, so a save that overwrites a fixed name
(``last.ckpt``) never replaces the files of the save it overwrites: the main file is written last and is the commit
point, and older sidecars are deleted only after it (:meth:`GossipLocalStrategy.save_checkpoint`).

:func:`atomic_save` writes next to the target and renames (``os.replace``, atomic on POSIX filesystems), after an
``fsync``: a crash leaves either the old file or the new one, never a truncated file, wherever ``TMPDIR`` is.
Temporary files go inside the ``.dopt`` directory, where nothing scans for checkpoints.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import _atomic_save as _fsspec_atomic_save
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

SIDECAR_SUFFIX = ".dopt"


def sidecar_dir(checkpoint_path: _PATH) -> str:
    """The directory holding the per-rank files of the checkpoint at ``checkpoint_path``."""
    return f"{checkpoint_path}{SIDECAR_SUFFIX}"


def sidecar_path(checkpoint_path: _PATH, rank: int, save_id: str | None = None) -> str:
    """Rank ``rank``'s file of the save ``save_id`` of ``checkpoint_path``; ``save_id=None`` reads the id from the
    main file (``checkpoint["lightning_dopt"]["save_id"]``)."""
    if save_id is None:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
        save_id = checkpoint["lightning_dopt"]["save_id"]
    return os.path.join(sidecar_dir(checkpoint_path), f"rank{rank}-{save_id}.pt")


def _is_local(path: _PATH) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def atomic_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` that leaves either the previous file or the complete new one, never a partial one.

    Local filesystems: write ``<path>.dopt/.partial-<random>``, ``fsync`` it, ``os.replace`` it onto ``path``, then
    ``fsync`` the directory. Other filesystems (fsspec URLs) use Lightning's writer."""
    if not _is_local(path):
        _fsspec_atomic_save(obj, path)
        return
    path = os.fspath(path)
    folder = sidecar_dir(path) if not os.path.dirname(path).endswith(SIDECAR_SUFFIX) else os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, ".partial-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(12)))
    try:
        with open(partial, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_other_saves(checkpoint_path: _PATH, rank: int, keep_save_id: str | None) -> None:
    """Delete rank ``rank``'s files of ``checkpoint_path`` except those of save ``keep_save_id`` (None: all)."""
    folder = sidecar_dir(checkpoint_path)
    fs = get_filesystem(folder)
    if not fs.isdir(folder):
        return
    keep = None if keep_save_id is None else f"rank{rank}-{keep_save_id}.pt"
    for entry in fs.ls(folder, detail=False):
        name = os.path.basename(entry)
        if name.startswith(f"rank{rank}-") and name.endswith(".pt") and name != keep:
            fs.rm(entry)


def remove_sidecar_dir_if_empty(checkpoint_path: _PATH) -> None:
    """Remove the ``.dopt`` directory once no rank file is left in it (leftover partial files included)."""
    folder = sidecar_dir(checkpoint_path)
    fs = get_filesystem(folder)
    if not fs.isdir(folder):
        return
    entries = [os.path.basename(entry) for entry in fs.ls(folder, detail=False)]
    if all(name.startswith(".partial-") for name in entries):
        fs.rm(folder, recursive=True)
