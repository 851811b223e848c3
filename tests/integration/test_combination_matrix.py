"""The combination matrix: every pair of option values is either trained, with its invariants checked, or refused
before training with a ``ValueError`` naming both options (:mod:`lightning_dopt.combinations` is the source of
truth; the rows and their runs are in ``combination_matrix.py``).

Default suite: a covering set of supported settings holding every supported pair (3 gloo ranks, 4 for ``torus``),
each trained two epochs of four steps, checkpointed after the first and resumed from it. Slow suite
(``-m slow``): the full product of supported settings, in shards (``-k "full_product and shard_7"``).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from combination_matrix import (MatrixModel, covering_rows, mean_is_exact, pairs_of, refused_pairs, run_rows,
                                strategy_options, trainer_options, world_size_of)
from helpers import run_ranks
from lightning_dopt import GossipLocalStrategy
from lightning_dopt.combinations import DIMENSIONS, Setting, completion, refusals
from lightning_dopt.comm import TRAINING_PURPOSES

ROWS = covering_rows()
REFUSED = refused_pairs()
SHARDS = 200


def test_the_rows_hold_every_supported_pair_and_only_supported_settings() -> None:
    covered = set().union(*(pairs_of(row) for row in ROWS))
    assert all(not refusals(row) for row in ROWS)
    every_pair = {((a, x), (b, y)) for i, a in enumerate(DIMENSIONS) for b in list(DIMENSIONS)[i + 1:]
                  for x in DIMENSIONS[a] for y in DIMENSIONS[b]}
    assert covered | set(REFUSED) == every_pair and not covered & set(REFUSED)


# ---------------------------------------------------------------------------------------- refused pairs
@pytest.mark.parametrize("pair", sorted(REFUSED, key=repr), ids=lambda pair: f"{pair[0][0]}={pair[0][1]}-"
                                                                           f"{pair[1][0]}={pair[1][1]}")
def test_a_refused_pair_is_refused_before_training_naming_both_options(tmp_path: Path, pair: Any) -> None:
    rule = REFUSED[pair]
    names = {pair[0][0], pair[1][0]}
    # the pair on a setting that every other rule accepts
    setting = completion(dict(pair), ignore=lambda other: names <= set(other.options))
    assert setting is not None and [r.key for r in refusals(setting)] == [rule.key]
    stage = "construction"  # where the refusal came from: the earliest moment the rule's facts are known
    with pytest.raises(ValueError) as raised:
        strategy = GossipLocalStrategy(start_method="spawn", **strategy_options(setting))
        stage = "trainer"
        trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=world_size_of(setting),
                            strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, **trainer_options(setting))
        stage = "fit"  # the launcher checks before it starts any rank process
        trainer.fit(MatrixModel(not setting.automatic_optimization, world_size_of(setting)))
    assert stage == rule.stage
    message = str(raised.value)
    assert all(f"{name}=" in message for name in names), message
    assert rule.instead in message
    assert not list(tmp_path.glob("**/*.ckpt"))  # nothing ran


# --------------------------------------------------------------------------------------- trained rows
def run_matrix(rows: list[Setting], root: Path) -> dict[int, dict[str, Any]]:
    """Train ``rows`` (index → reports of every rank): one gloo world of 3 ranks, one of 4 for ``torus`` rows."""
    reports: dict[int, dict[str, Any]] = {}
    for world_size in sorted({world_size_of(row) for row in rows}):
        indices = [i for i, row in enumerate(rows) if world_size_of(row) == world_size]
        ranks = run_ranks(run_rows, world_size, [asdict(rows[i]) for i in indices], str(root / f"w{world_size}"),
                          timeout=60.0 + 20.0 * len(indices), light_packages=())
        for position, index in enumerate(indices):
            reports[index] = {"setting": rows[index], "ranks": [rank[position] for rank in ranks]}
    return reports


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    return run_matrix(ROWS, tmp_path_factory.mktemp("matrix"))


def check_row(report: dict[str, Any]) -> None:
    setting: Setting = report["setting"]
    steps = 2 * 4
    for rank, runs in enumerate(report["ranks"]):
        first, resumed = runs["uninterrupted"], runs["resumed"]
        where = f"rank {rank} of {setting}"
        assert first["finite"] and resumed["finite"], f"non-finite replica: {where}"
        assert first["steps"] == first["global_step"] == steps == resumed["steps"], where
        assert first["final_equal"] and resumed["final_equal"], f"replicas differ after the final average: {where}"
        for purpose in ("warmup", "aggregate", "round"):
            assert first["sent"].get(purpose, 0) == first["expected"][purpose], (purpose, first["sent"], where)
        if mean_is_exact(setting) and first["rounds"]:
            assert first["mean_checks"] > 0
            assert first["mean_change"] <= 1e-5, f"the ranks' mean moved by {first['mean_change']:.3g}: {where}"
        # partial work skips steps by timing: reproducible bit for bit only when no rank skipped any
        if setting.min_work == 1.0 or first["skipped"] == resumed["skipped"] == 0:
            assert torch.equal(first["local"], resumed["local"]), f"resume is not exact: {where}"
            for purpose in TRAINING_PURPOSES:  # the counters resume too (control messages differ: a fit's start)
                assert resumed["sent"].get(purpose) == first["sent"].get(purpose), (purpose, where)
    rounds = [rank["uninterrupted"]["rounds"] for rank in report["ranks"]]
    assert all(r == rounds[0] for r in rounds), "ranks disagree on the kind of a round"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("index", range(len(ROWS)), ids=lambda i: f"row{i}")
def test_a_covering_row_trains_resumes_exactly_and_keeps_its_invariants(matrix: dict[int, dict[str, Any]],
                                                                         index: int) -> None:
    check_row(matrix[index])


@pytest.mark.slow
@pytest.mark.timeout(24 * 3600)
@pytest.mark.parametrize("shard", range(SHARDS), ids=lambda s: f"shard_{s}")
def test_full_product(tmp_path: Path, shard: int) -> None:
    """Every supported setting of the option space (shard ``shard`` of ``SHARDS``: every SHARDS-th one)."""
    names = list(DIMENSIONS)
    supported = [Setting(**dict(zip(names, values)), sync_batchnorm=False)
                 for values in itertools.product(*DIMENSIONS.values())]
    supported = [s for s in supported if not refusals(s)]
    rows = supported[shard::SHARDS]
    for report in run_matrix(rows, tmp_path).values():
        check_row(report)
