"""A benchmarking aid (kept out of the installed package): :class:`SlowRanks` turns chosen ranks into stragglers, so
the effect of a slow worker on the others can be measured (``straggler.py``) and tested on one machine."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L


class SlowRanks(L.Callback):
    """Make rank ``r`` run ``factors[r]`` times slower (``factors``: ``{global_rank: slowdown ≥ 1}``, e.g. ``{3: 2}``).

    After every training batch, rank ``r`` sleeps ``(factors[r] − 1) · c`` seconds, ``c`` the batch's compute time
    from its start to the end of backward (waiting for communication in the optimizer step is not inflated)."""

    def __init__(self, factors: Mapping[int, float]) -> None:
        parsed: dict[int, float] = {}
        for rank, factor in dict(factors).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"SlowRanks: ranks must be integers >= 0; got {rank!r}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0:
                raise ValueError(f"SlowRanks: the slowdown of rank {rank} must be a number >= 1; got {factor!r}")
            parsed[rank] = float(factor)
        self.factors = parsed
        self.slept = 0.0
        self._batch_start: float | None = None
        self._compute = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        too_high = [rank for rank in self.factors if rank >= trainer.world_size]
        if too_high:
            raise ValueError(f"SlowRanks: rank(s) {too_high} do not exist in a world of {trainer.world_size} ranks")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        self._compute = 0.0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._batch_start is not None:
            self._compute = time.perf_counter() - self._batch_start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        factor = self.factors.get(trainer.global_rank, 1.0)
        if factor > 1.0 and self._compute > 0.0:
            delay = (factor - 1.0) * self._compute
            time.sleep(delay)
            self.slept += delay
        self._batch_start = None
