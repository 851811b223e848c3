"""Lightning callbacks around the strategy (thin: the numbers come from ``comm.py``'s counters).

* :class:`CommReport`: at the end of training, every rank's bytes next to what DDP would have sent.
* :class:`CommProgressBar`: the TQDM progress bar with bytes sent and the consensus distance beside the loss.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_dopt.comm import ring_allreduce_bytes
from lightning_dopt.simulation import SimulatedStrategy
from lightning_dopt.strategy import GossipLocalStrategy


def replicas(trainer: L.Trainer) -> int:
    """How many replicas ``trainer`` trains with a lightning_dopt strategy (its ranks, or a simulation's workers);
    0 for any other strategy."""
    strategy = trainer.strategy
    if isinstance(strategy, SimulatedStrategy):
        return strategy.workers
    return trainer.world_size if isinstance(strategy, GossipLocalStrategy) else 0


def _megabytes(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"


def human_bytes(value: float) -> str:
    """``12.3MB``-style size with decimal units (B, kB, MB, GB, TB), three significant digits."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 999.5:
            return f"{value:.3g}{unit}"
        value /= 1000.0
    return f"{value:.3g}TB"


def ddp_reference_bytes(pl_module: L.LightningModule, steps: int, world_size: int) -> int:
    """What DDP would send per rank in ``steps`` optimizer steps: a ring all-reduce of the trainable parameters'
    gradients every step, ``steps · 2(n-1)/n · P`` bytes for ``P`` gradient bytes on ``n`` ranks."""
    gradient_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
    return steps * ring_allreduce_bytes(gradient_bytes, world_size)


class CommReport(L.Callback):
    """At the end of training, gather every rank's communication counters and compare with DDP.

    DDP's reference is what a ring all-reduce of the trainable parameters' gradients sends per rank, every
    optimizer step: ``steps · 2(n-1)/n · P`` bytes for ``P`` gradient bytes on ``n`` ranks.
    The report is printed on rank 0 and kept in :attr:`rows` (one dict per rank) on every rank. Under Lightning's
    own ``DDPStrategy`` only that formula is printed (one line, no collective; :attr:`rows` stays empty).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy, count = trainer.strategy, replicas(trainer)
        if not count:
            if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
                ddp_bytes = ddp_reference_bytes(pl_module, trainer.global_step, trainer.world_size)
                rank_zero_info(f"DDP: {trainer.global_step} optimizer steps on {trainer.world_size} ranks; a ring "
                               f"all-reduce of the gradients sends {_megabytes(ddp_bytes)} per rank (formula "
                               "2(n-1)/n · P per step; DDP's own traffic is not counted).")
            return
        ddp_bytes = ddp_reference_bytes(pl_module, strategy.steps, count)
        self.rows = []
        for rank, stats in enumerate(strategy.gather_comm_stats()):
            self.rows.append({"rank": rank, "bytes_sent": stats.bytes_sent,
                              "training_bytes_sent": stats.training_bytes_sent,
                              "by_purpose": dict(stats.bytes_sent_by_purpose), "rounds": stats.rounds,
                              "seconds": stats.seconds, "ddp_bytes_sent": ddp_bytes})
        where = f"{count} simulated workers" if isinstance(strategy, SimulatedStrategy) else f"{count} ranks"
        lines = [f"Communication after {strategy.steps} optimizer steps on {where} "
                 f"(topology={strategy.topology}, local_steps={strategy.local_steps}):",
                 f"{'rank':>4}  {'sent (training)':>16}  {'sent (all)':>14}  {'DDP would send':>15}  {'ratio':>7}"]
        for row in self.rows:
            ratio = row["training_bytes_sent"] / ddp_bytes if ddp_bytes else float("nan")
            lines.append(f"{row['rank']:>4}  {_megabytes(row['training_bytes_sent']):>16}  "
                         f"{_megabytes(row['bytes_sent']):>14}  {_megabytes(ddp_bytes):>15}  {ratio:>7.3f}")
        lines.append("'training' counts warm-up, gradient-aggregation and round traffic; 'all' adds the start "
                     "broadcast, evaluation on the average and bookkeeping.")
        rank_zero_info("\n".join(lines))


class CommProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar plus ``sent=12.3MB`` (bytes this rank has sent, all purposes, from
    ``trainer.strategy.comm_stats``) and ``cons=1.2e-04`` (the last logged ``dopt/consensus_distance``,
    ``mean_i ‖x_i − x̄‖² / ‖x̄‖²``, logged at every validation and every ``consensus_interval`` steps).

    Both appear only with more than one replica of a lightning_dopt strategy (:func:`replicas`); with any other
    strategy this is the plain progress bar. Reading the counters costs nothing: no collective is issued.
    """

    def get_metrics(self, trainer: L.Trainer,
                    pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        strategy = trainer.strategy
        if replicas(trainer) > 1:
            items["sent"] = human_bytes(strategy.comm_stats.bytes_sent)
            distance = trainer.callback_metrics.get("dopt/consensus_distance")
            if distance is not None:
                items["cons"] = f"{float(distance):.1e}"
        return items
