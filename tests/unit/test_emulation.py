"""SlowRanks, the straggler emulator used by benchmarks/straggler.py (one process, no communication)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.slow_ranks import SlowRanks

STEP_SLEEP = 0.02


class SleepyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_SLEEP)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("factors, message", [
    ({0: 0.5}, "must be a number >= 1"),
    ({0: float("nan")}, "must be a number >= 1"),
    ({-1: 2.0}, "ranks must be integers >= 0"),
    ({"1": 2.0}, "ranks must be integers >= 0"),
    ({0: True}, "must be a number >= 1"),
])
def test_bad_factors_are_refused(factors: dict[Any, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlowRanks(factors)


def fit(callback: SlowRanks, steps: int = 6) -> float:
    data = DataLoader(TensorDataset(torch.randn(steps, 4)), batch_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    start = time.perf_counter()
    trainer.fit(SleepyModel(), data)
    return time.perf_counter() - start


def test_a_slow_rank_sleeps_in_proportion_to_its_compute_time() -> None:
    slowed = SlowRanks({0: 3.0})
    fit(slowed)
    # 6 batches, each computing >= 20 ms: at least 2 × 6 × 20 ms of added sleep, and not wildly more
    assert 2 * 6 * STEP_SLEEP <= slowed.slept < 2 * 6 * STEP_SLEEP * 5
    untouched = SlowRanks({1: 3.0}, )
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] do not exist in a world of 1 ranks"):
        fit(untouched)
