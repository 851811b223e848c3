"""Sidecar files: the current format, the first format (still read), and clear errors for everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_dopt.checkpoint_files import (SIDECAR_FORMAT, SIDECAR_FORMAT_V1, atomic_save, read_sidecar,
                                             restore_point, sidecar_path)

SAVE_ID = "abc123"


def write(tmp_path: Path, content: dict) -> Path:
    main = tmp_path / "last.ckpt"
    atomic_save(content, sidecar_path(main, rank=1, save_id=SAVE_ID))
    return main


def test_current_format_is_read_as_written(tmp_path: Path) -> None:
    engine = {"comm_stats": {"rounds": 3}, "round": {"anchor": [torch.ones(2)]}, "aggregation": {}, "scaling": []}
    main = write(tmp_path, {"format": SIDECAR_FORMAT, "save_id": SAVE_ID, "engine": engine})
    sidecar = read_sidecar(main, 1, SAVE_ID)
    assert sidecar["engine"]["comm_stats"] == {"rounds": 3}
    assert torch.equal(sidecar["engine"]["round"]["anchor"][0], torch.ones(2))


@pytest.mark.parametrize("kind", ["compression", "pseudo_gradients", None])
def test_first_format_sidecars_still_load(tmp_path: Path, kind: str | None) -> None:
    old = {"format": SIDECAR_FORMAT_V1, "save_id": SAVE_ID, "state_dict": {"w": torch.zeros(1)},
           "comm_stats": {"rounds": 7}, "aggregation": {0: {"momentum": None}}, "scaling": [],
           "compression": None, "pseudo_gradients": None}
    if kind is not None:
        old[kind] = {"anchor": torch.full((3,), 2.0)}
    sidecar = read_sidecar(write(tmp_path, old), 1, SAVE_ID)
    assert sidecar["format"] == SIDECAR_FORMAT and "compression" not in sidecar
    assert sidecar["engine"]["comm_stats"] == {"rounds": 7}
    assert sidecar["engine"]["aggregation"] == {0: {"momentum": None}}
    if kind is None:
        assert sidecar["engine"]["round"] is None
    else:
        assert torch.equal(sidecar["engine"]["round"]["anchor"], torch.full((3,), 2.0))


def test_first_format_sidecars_from_before_pseudo_gradients_still_load(tmp_path: Path) -> None:
    old = {"format": SIDECAR_FORMAT_V1, "save_id": SAVE_ID, "comm_stats": {"rounds": 2}, "aggregation": {},
           "scaling": [], "compression": None}
    sidecar = read_sidecar(write(tmp_path, old), 1, SAVE_ID)
    assert sidecar["engine"]["round"] is None and sidecar["engine"]["comm_stats"] == {"rounds": 2}


def test_unknown_format_names_the_formats_read(tmp_path: Path) -> None:
    main = write(tmp_path, {"format": "lightning_dopt.sidecar/99", "save_id": SAVE_ID})
    with pytest.raises(RuntimeError, match=r"has format 'lightning_dopt.sidecar/99'.*reads 'lightning_dopt.sidecar/2' "
                                           r"and 'lightning_dopt.sidecar/1'"):
        read_sidecar(main, 1, SAVE_ID)


def test_sidecar_of_another_save_and_missing_sidecar_are_refused(tmp_path: Path) -> None:
    main = write(tmp_path, {"format": SIDECAR_FORMAT, "save_id": "other"})
    with pytest.raises(RuntimeError, match="does not belong to"):
        read_sidecar(main, 1, SAVE_ID)
    with pytest.raises(FileNotFoundError, match="missing per-rank checkpoint file"):
        read_sidecar(main, 0, SAVE_ID)


def test_resume_reads_the_sidecar_only_for_the_same_ranks_grouped_the_same_way(tmp_path: Path) -> None:
    main = tmp_path / "last.ckpt"
    atomic_save({"format": SIDECAR_FORMAT, "rank": 1, "world_size": 4, "save_id": "abc", "state_dict": {}},
                sidecar_path(main, 1, "abc"))
    meta = {"world_size": 4, "steps": 8, "round": 2, "save_id": "abc", "ranks_per_replica": 2}
    exact = restore_point({"lightning_dopt": meta}, main, rank=1, world_size=4, ranks_per_replica=2)
    assert exact is not None and exact["sidecar"]["rank"] == 1 and (exact["steps"], exact["round"]) == (8, 2)
    for world_size, grouping, change in ((4, 1, "with 2 ranks per replica \\(hierarchy\\) and is resumed with 1"),
                                         (8, 2, "by 4 ranks and is resumed on 8")):  # flat now, or more ranks
        with pytest.warns(UserWarning, match=f"was written {change}: every rank starts from the averaged model"):
            averaged = restore_point({"lightning_dopt": meta}, main, rank=1, world_size=world_size,
                                     ranks_per_replica=grouping)
        assert averaged is not None and averaged["sidecar"] is None
    legacy = {key: value for key, value in meta.items() if key != "ranks_per_replica"}  # before hierarchy existed
    assert restore_point({"lightning_dopt": legacy}, main, rank=1, world_size=4)["sidecar"] is not None
