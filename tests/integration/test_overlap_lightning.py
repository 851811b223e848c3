"""Lightning integration of ``overlap=True`` and of the checks folded into rounds (CPU/gloo, spawn, 2 ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_dopt import GossipLocalStrategy
from lightning_models import NaNInjector, Recorder, RegressionModel, load_ranks

pytestmark = pytest.mark.timeout(180)


def make_trainer(root: Path, strategy: Any, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(default_root_dir=root, accelerator="cpu", devices=2, strategy=strategy,
                                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


def test_overlapped_fit_validates_on_the_average_and_ends_holding_it(tmp_path: Path) -> None:
    L.seed_everything(1)
    strategy = GossipLocalStrategy(local_steps=2, overlap=True, start_method="spawn")
    trainer = make_trainer(tmp_path, strategy, max_epochs=2, limit_val_batches=1, callbacks=[Recorder(str(tmp_path))])
    model = RegressionModel()
    trainer.fit(model)
    local = load_ranks(str(tmp_path), "local", 2)
    evaluated = load_ranks(str(tmp_path), "eval", 2)
    stats = load_ranks(str(tmp_path), "stats", 2)
    # 16 steps at H = 2: 8 rounds, each counted once by the background thread
    assert [s["comm"]["rounds"] for s in stats] == [8, 8]
    assert all(s["comm"]["bytes_sent_by_purpose"]["round"] > 0 for s in stats)
    for key in evaluated[0]:
        assert torch.equal(evaluated[0][key], evaluated[1][key])  # both ranks evaluate the same (average) model
    assert any(not torch.equal(local[0][key], local[1][key]) for key in local[0])
    final = {key: value for key, value in model.state_dict().items()}
    ends = load_ranks(str(tmp_path), "train_end", 2)
    mean = {key: (ends[0][key].double() + ends[1][key].double()) / 2 for key in ends[0]}
    assert max((final[key].double() - mean[key]).abs().max().item() for key in final) < 1e-6


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
def test_a_nan_replica_stops_every_rank_before_it_spreads(tmp_path: Path, overlap: bool) -> None:
    L.seed_everything(1)
    strategy = GossipLocalStrategy(local_steps=2, overlap=overlap, start_method="spawn")
    trainer = make_trainer(tmp_path, strategy, max_steps=12, limit_val_batches=0,
                           callbacks=[NaNInjector(rank=1, step=5)])
    with pytest.raises(Exception) as raised:
        trainer.fit(RegressionModel())
    message = str(raised.value)
    assert "non-finite values (NaN or Inf) in the replica of rank 1 at optimizer step 6" in message, message
    assert "NonFiniteReplicaError" in message


@pytest.mark.parametrize("options, text", [
    ({"overlap": "yes"}, "overlap must be True or False"),
    ({"overlap": True, "topology": "complete", "aggregation": "adacons"}, "Use overlap=False"),
    ({"overlap": True, "topology": "complete", "outer_optimizer": "diloco"}, "Use overlap=False"),
])
def test_bad_overlap_options_are_refused_at_construction(options: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        GossipLocalStrategy(**options)
