"""``RunSummary``: a JSON record of a run (BLEU/chrF at each validation next to the bytes sent so far).

Rank 0 writes the file atomically after every validation, at the end of fit and after test. Bytes are rank 0's
counters from ``lightning_dopt``'s strategies (``comm_stats``): ``training_bytes_sent`` counts warm-up, gradient
aggregation and round traffic, ``bytes_sent`` everything (start broadcast, evaluation on the average, …). For
strategies that do not count bytes (e.g. Lightning's ``ddp``), ``training_bytes_sent`` is DDP's ring all-reduce
cost ``steps · 2(n−1)/n · P`` for ``P`` gradient bytes, with ``bytes_counted: false``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L

from lightning_dopt import GossipLocalStrategy
from lightning_dopt.callbacks import ddp_reference_bytes
from recipes.common import plain_value
from recipes.translation.tokenizer import atomic_write


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(payload, indent=1).encode())


class RunSummary(L.Callback):
    """Write ``{"fit": {...}, "validations": [...], "test": {...}}`` to ``path`` (other stages' keys are kept).

    Args:
        path: the JSON file (its directory is created).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._start = 0.0
        self._record: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {}

    @staticmethod
    def _bytes(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        strategy = trainer.strategy
        if isinstance(strategy, GossipLocalStrategy):
            stats = strategy.comm_stats
            return {"training_bytes_sent": stats.training_bytes_sent, "bytes_sent": stats.bytes_sent,
                    "bytes_counted": True}
        estimate = ddp_reference_bytes(pl_module, trainer.global_step, trainer.world_size)
        return {"training_bytes_sent": estimate, "bytes_sent": estimate, "bytes_counted": False}

    @staticmethod
    def _metrics(trainer: L.Trainer, stage: str) -> dict[str, float]:
        return {key.split("/", 1)[1]: float(value) for key, value in trainer.callback_metrics.items()
                if key.startswith(f"{stage}/")}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._record = {**self._load(), "validations": [], "fit": {}}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._record:
            return
        self._record["validations"].append({"step": trainer.global_step, "seconds": time.perf_counter() - self._start,
                                            **self._metrics(trainer, "val"), **self._bytes(trainer, pl_module)})
        _write_json(self.path, self._record)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        strategy = trainer.strategy
        self._record["fit"] = {
            "steps": trainer.global_step, "seconds": time.perf_counter() - self._start,
            "world_size": trainer.world_size, "strategy": type(strategy).__name__,
            "local_steps": getattr(strategy, "local_steps", 1), "topology": getattr(strategy, "topology", None),
            "compression": plain_value(getattr(strategy, "compression", None)),
            "aggregation": getattr(strategy, "aggregation", None), "scaling": getattr(strategy, "scaling", None),
            "parameters": sum(p.numel() for p in pl_module.parameters()), **self._bytes(trainer, pl_module)}
        _write_json(self.path, self._record)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = self._load()
        record["test"] = {"world_size": trainer.world_size, **self._metrics(trainer, "test")}
        _write_json(self.path, record)


__all__ = ["RunSummary"]
