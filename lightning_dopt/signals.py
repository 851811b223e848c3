"""SIGTERM and SLURM's requeue signal for :class:`~lightning_dopt.strategy.GossipLocalStrategy`: every rank stops at the
same batch boundary, after a checkpoint, without a per-batch collective. Lightning glue.

Lightning (≥ 2.5.2) broadcasts a SIGTERM flag on every training batch, a global lock-step that local steps must not
pay. Instead the handlers only record the signal in the engine (forwarding SIGTERM to launched children, as
Lightning's handler does); the request travels in the next round's control flags
(:meth:`~lightning_dopt.engine.Engine.local_flags`), and at the next batch boundary every rank, knowing the same
flags, saves and stops (:meth:`StopAtRounds.stop_if_requested`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_dopt.checkpoint_files import requeue_slurm_job


class StopAtRounds:
    """Signal handlers of one rank, bound to its strategy (for the launcher, checkpoint and engine)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def install(self, trainer: Any) -> None:
        """Replace Lightning's per-batch SIGTERM broadcast by :meth:`stop_if_requested`; handle the signals (in the
        main thread only, where Python allows handlers)."""
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self.stop_if_requested
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)
        environment = self.strategy.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # Lightning saves the checkpoint inside its requeue-signal handler, wherever each rank happens to be: a
            # collective save would then meet a peer's round. Record the signal instead and save at a round.
            signal.signal(environment.requeue_signal or signal.SIGUSR1, self._on_requeue_signal)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        engine, launcher = self.strategy.engine, self.strategy.launcher
        if not engine.sigterm and launcher is not None:
            launcher.kill(signum)
        engine.sigterm = True

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        rank_zero_info(f"lightning_dopt: requeue signal {signum} received; saving and requeueing at the next round")
        self.strategy.engine.sigterm = self.strategy.engine.requeue = True

    def stop_if_requested(self) -> None:
        """At a batch boundary after a round that saw a stop request: write a checkpoint on every rank, then stop."""
        strategy = self.strategy
        engine = strategy.engine
        if not engine.stop_requested:
            return
        trainer = strategy.lightning_module.trainer
        engine.drain()
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        what = "the requeue signal" if engine.requeue_requested else "SIGTERM"
        rank_zero_info(f"{what} received by rank(s) {', '.join(map(str, engine.stop_ranks))}: every rank stopped "
                       f"after optimizer step {engine.steps} (round {engine.round}) and saved {path}. Resume with "
                       "trainer.fit(..., ckpt_path='hpc') (automatic under SLURM).")
        if engine.requeue_requested and strategy.is_global_zero:
            requeue_slurm_job()
        raise SIGTERMException()
