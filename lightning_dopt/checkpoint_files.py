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
import subprocess
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import _atomic_save as _fsspec_atomic_save
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

SIDECAR_SUFFIX = ".dopt"
SIDECAR_FORMAT = "lightning_dopt.sidecar/2"
"""A sidecar: ``format``, ``rank``, ``world_size``, ``save_id``, the replica's ``state_dict``, ``optimizer_states``,
``rng``, the precision plugin's state (``precision``) and the engine's parts (``engine``:
:meth:`~lightning_dopt.engine.Engine.state_dict`)."""
SIDECAR_FORMAT_V1 = "lightning_dopt.sidecar/1"
"""The first format, with the engine's parts at the top level (still read)."""
ENGINE_PARTS_V1 = ("comm_stats", "compression", "aggregation", "pseudo_gradients", "scaling")


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


def read_sidecar(checkpoint_path: _PATH, rank: int, save_id: str) -> dict[str, Any]:
    """Rank ``rank``'s sidecar of save ``save_id`` of ``checkpoint_path``, in the current format (a first-format file
    is converted), or a clear error: missing, unreadable, of another save, or of an unknown format."""
    path = sidecar_path(checkpoint_path, rank, save_id)
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"rank {rank}: missing per-rank checkpoint file {path}. Resuming {checkpoint_path} "
            f"exactly needs every rank's file in the '{os.path.basename(str(checkpoint_path))}.dopt' directory "
            "next to it; copy it there, or load only the averaged weights with "
            "LightningModule.load_from_checkpoint.")
    try:
        with fs.open(path, "rb") as handle:
            sidecar = torch.load(handle, map_location="cpu", weights_only=False)
    except Exception as error:
        raise RuntimeError(f"rank {rank}: per-rank checkpoint file {path} is unreadable "
                           f"(truncated or corrupt): {error}") from error
    if sidecar.get("format") == SIDECAR_FORMAT_V1:  # the round's state was under its kind's name
        parts = {part: sidecar.pop(part, None) for part in ENGINE_PARTS_V1}  # (early files lack pseudo_gradients)
        compression, pseudo_gradients = parts.pop("compression"), parts.pop("pseudo_gradients")
        parts["scaling"] = parts["scaling"] or []
        parts["round"] = compression if compression is not None else pseudo_gradients
        sidecar = dict(sidecar, format=SIDECAR_FORMAT, engine=parts)
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise RuntimeError(f"rank {rank}: {path} has format {sidecar.get('format')!r}; this version of lightning_dopt "
                           f"reads {SIDECAR_FORMAT!r} and {SIDECAR_FORMAT_V1!r}. Resume with the version that wrote "
                           "it, or load only the averaged weights with LightningModule.load_from_checkpoint")
    if sidecar.get("save_id") != save_id:
        raise RuntimeError(f"rank {rank}: {path} does not belong to {checkpoint_path} (it was "
                           "written by another save); refusing to mix replicas from different saves.")
    return sidecar


def restore_point(checkpoint: dict[str, Any], checkpoint_path: _PATH, rank: int, world_size: int,
                  ranks_per_replica: int = 1) -> dict[str, Any] | None:
    """Where a fit resumes from ``checkpoint``: ``{"steps", "round", "sidecar"}`` with this rank's sidecar when as many
    ranks resume as wrote it, grouped into replicas the same way (``ranks_per_replica``: 1, or the ranks per node
    under ``hierarchy="node"``), for an exact resume; without the sidecar (with a warning) otherwise, where every rank
    starts from the averaged model; ``None`` for a checkpoint not written by lightning_dopt."""
    meta = checkpoint.get("lightning_dopt")
    if meta is None:
        return None
    restored = {"steps": int(meta["steps"]), "round": int(meta["round"]), "sidecar": None}
    saved_grouping = int(meta.get("ranks_per_replica", 1))
    if meta["world_size"] != world_size or saved_grouping != ranks_per_replica:
        change = (f"was written by {meta['world_size']} ranks and is resumed on {world_size}"
                  if meta["world_size"] != world_size else
                  f"was written with {saved_grouping} ranks per replica (hierarchy) and is resumed with "
                  f"{ranks_per_replica}")
        rank_zero_warn(f"{checkpoint_path} {change}: every rank starts from the averaged model with rank 0's optimizer "
                       "state; per-rank replicas, optimizer states and RNG are not restored.")
        return restored
    restored["sidecar"] = read_sidecar(checkpoint_path, rank, meta["save_id"])
    return restored


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint writer, made crash-safe on local filesystems: the new file is written
    beside the target, synced and renamed over it (:func:`atomic_save`). Lightning's own writer stages the file in
    ``TMPDIR`` and moves it, which is a copy (truncating the previous checkpoint on a crash) when ``TMPDIR`` is on
    another filesystem, the usual cluster layout."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options; got {storage_options!r}")
        get_filesystem(path).makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        atomic_save(checkpoint, path)
        remove_sidecar_dir_if_empty(path)


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (what Lightning's requeue handler does), logging rather than raising."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not job:
        rank_zero_warn("lightning_dopt: no SLURM_JOB_ID in the environment; the job was not requeued")
        return
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except OSError as error:
        rank_zero_warn(f"lightning_dopt: could not requeue SLURM job {job}: {error}")
        return
    (rank_zero_info if code == 0 else rank_zero_warn)(f"lightning_dopt: scontrol requeue {job} exited with {code}")
