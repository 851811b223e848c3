"""Lightning callbacks around the strategy (thin: the numbers come from ``comm.py``'s counters)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_dopt.comm import ring_allreduce_bytes
from lightning_dopt.strategy import GossipLocalStrategy


def _megabytes(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"


class CommReport(L.Callback):
    """At the end of training, gather every rank's communication counters and compare with DDP.

    DDP's reference is what a ring all-reduce of the trainable parameters' gradients sends per rank, every
    optimizer step: ``steps · 2(n-1)/n · P`` bytes for ``P`` gradient bytes on ``n`` ranks.
    The report is printed on rank 0 and kept in :attr:`rows` (one dict per rank) on every rank.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, GossipLocalStrategy):
            return
        gradient_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
        ddp_bytes = strategy.steps * ring_allreduce_bytes(gradient_bytes, trainer.world_size)
        self.rows = []
        for rank, stats in enumerate(strategy.gather_comm_stats()):
            training = sum(stats.bytes_sent_by_purpose.get(p, 0) for p in ("warmup", "aggregate", "round"))
            self.rows.append({"rank": rank, "bytes_sent": stats.bytes_sent, "training_bytes_sent": training,
                              "by_purpose": dict(stats.bytes_sent_by_purpose), "rounds": stats.rounds,
                              "seconds": stats.seconds, "ddp_bytes_sent": ddp_bytes})
        lines = [f"Communication after {strategy.steps} optimizer steps on {trainer.world_size} ranks "
                 f"(topology={strategy.topology}, local_steps={strategy.local_steps}):",
                 f"{'rank':>4}  {'sent (training)':>16}  {'sent (all)':>14}  {'DDP would send':>15}  {'ratio':>7}"]
        for row in self.rows:
            ratio = row["training_bytes_sent"] / ddp_bytes if ddp_bytes else float("nan")
            lines.append(f"{row['rank']:>4}  {_megabytes(row['training_bytes_sent']):>16}  "
                         f"{_megabytes(row['bytes_sent']):>14}  {_megabytes(ddp_bytes):>15}  {ratio:>7.3f}")
        lines.append("'training' counts warm-up, gradient-aggregation and round traffic; 'all' adds the start broadcast, evaluation on the "
                     "average and bookkeeping.")
        rank_zero_info("\n".join(lines))
