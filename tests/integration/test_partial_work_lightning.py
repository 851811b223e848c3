"""Partial work (``min_work < 1``) in Lightning: a slow rank skips whole optimizer steps and nobody else does
(CPU/gloo, spawn, 2 ranks; rank 1 made 3× slower by ``SlowRanks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_dopt import GossipLocalStrategy
from benchmarks.slow_ranks import SlowRanks
from lightning_models import (ManualTwoOptimizerModel, PartialWorkRecorder, PreconditionerRecorder,
                              SleepyRegressionModel, SyncLoggingModel, load_ranks)

pytestmark = pytest.mark.timeout(180)

STEPS = 32


def fit(root: Path, strategy: GossipLocalStrategy, model: L.LightningModule, **kwargs: Any) -> None:
    trainer = L.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[SlowRanks({1: 3.0}), PartialWorkRecorder(str(root)),
                                   PreconditionerRecorder(str(root))], **kwargs)
    trainer.fit(model)


@pytest.mark.parametrize("min_work, options, trainer_options", [
    (1.0, {}, {}),
    (0.25, {"overlap": True}, {"accumulate_grad_batches": 2, "precision": "bf16-mixed"}),
    (0.25, {"scaling": "adam"}, {"gradient_clip_val": 1.0}),
    (0.25, {"scaling": "adam", "topology": "complete"}, {}),
], ids=["off", "overlap-accumulate2-bf16", "blocking-scaling-clipping", "exact-scaling"])
def test_only_the_slow_rank_skips_and_every_rank_keeps_the_same_steps(tmp_path: Path, min_work: float,
                                                                      options: dict[str, Any],
                                                                      trainer_options: dict[str, Any]) -> None:
    L.seed_everything(0)
    accumulate = trainer_options.get("accumulate_grad_batches", 1)
    strategy = GossipLocalStrategy(local_steps=1, min_work=min_work, start_method="spawn", **options)
    fit(tmp_path, strategy, SleepyRegressionModel(samples=64 * accumulate), **trainer_options)
    ranks = load_ranks(str(tmp_path), "partial", 2)
    for rank in ranks:
        # skipped steps are still steps: same global_step, rounds and step counter everywhere
        assert rank["steps"] == rank["global_step"] == rank["rounds"] == STEPS, rank
        # the module's training_step ran for every micro-batch of the trained steps only
        assert rank["training_calls"] == accumulate * (STEPS - rank["skipped"]), rank
        assert rank["marked_skipped"] == accumulate * rank["skipped"], rank
    assert ranks[0]["skipped"] == 0  # the reference (faster) rank never skips
    if min_work == 1.0:
        assert ranks[1]["skipped"] == 0
    else:
        # rank 1 is 2-3x slower (SlowRanks times only the last micro-batch of a step), so its share settles near
        # 1/3-1/2 after a few measured rounds (patience); never below min_work
        assert STEPS // 4 <= ranks[1]["skipped"] <= STEPS - STEPS // 4 + 1, ranks[1]
    if options.get("topology") == "complete" and "scaling" in options:
        # the ranks accumulated different numbers of steps; the bias-correction weight is mixed with the statistics,
        # so after the exact averages D is still identical on every rank
        diagonals = load_ranks(str(tmp_path), "diag", 2)
        assert all(torch.equal(a, b) for a, b in zip(diagonals[0][0], diagonals[1][0]))


@pytest.mark.parametrize("model, trainer_options, text", [
    (ManualTwoOptimizerModel, {}, r"min_work=0.5 cannot be combined with automatic_optimization=False \(manual "
                                  "optimization\)"),
    (SyncLoggingModel, {}, r"reduce \(LightningModule.log with sync_dist=True\) inside training_step cannot be "
                           "combined with min_work < 1"),
    (lambda: SleepyRegressionModel(batch_norm=True), {"sync_batchnorm": True},
     "min_work=0.5 cannot be combined with sync_batchnorm=True"),
], ids=["manual-optimization", "log-sync-dist-in-training-step", "sync-batchnorm"])
def test_what_a_skipping_rank_cannot_join_is_refused_on_every_rank(tmp_path: Path, model: Any,
                                                                   trainer_options: dict[str, Any],
                                                                   text: str) -> None:
    strategy = GossipLocalStrategy(local_steps=2, min_work=0.5, start_method="spawn")
    with pytest.raises(Exception, match=text):
        fit(tmp_path, strategy, model(), **trainer_options)
    assert not list(tmp_path.glob("partial-rank*.pt"))  # no rank finished training


@pytest.mark.parametrize("options, text", [
    ({"min_work": 0.0}, r"min_work must be a number in \(0, 1\]"),
    ({"min_work": 1.5}, r"min_work must be a number in \(0, 1\]"),
    ({"min_work": True}, r"min_work must be a number in \(0, 1\]"),
    ({"min_work": 0.5, "topology": "complete", "aggregation": "adacons"}, "Use local_steps > 1 or min_work=1.0"),
])
def test_bad_min_work_options_are_refused_at_construction(options: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        GossipLocalStrategy(**options)
