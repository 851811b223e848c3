"""``GossipLocalStrategy``: the Lightning adapter of the engine, one rank per process.

Each rank trains its own replica with its own optimizer (no DDP wrapper, no per-step gradient all-reduce). Every
Lightning hook here delegates: the algorithm (schedule, rounds, gradient combination, scaling, control flags,
pacing) is :class:`~lightning_dopt.engine.Engine` and the objects it composes, which know nothing of Lightning; this
module adds what only Lightning knows: the launch, the optimizer closure, SIGTERM (:mod:`lightning_dopt.signals`),
evaluation on the exact average, and checkpoints (the average in the main file, for plain Lightning; each rank's
replica, optimizer state, counters, RNG and engine state in a per-rank sidecar, :mod:`lightning_dopt.checkpoint_files`).

Communication per rank and optimizer step, for a model of ``P`` bytes on ``n`` ranks:
DDP ``2(n-1)/n · P``; ``complete`` ``2(n-1)/n · P / H``; ``random`` and ``one_peer_exponential``
``P / H``; ``ring``/``torus``/``exponential`` ``degree · P / H``; plus ``2(n-1)/n · 32n`` bytes of control flags
per round (stop requests, non-finite replicas, pace, compression noise), which replace Lightning's per-batch SIGTERM
broadcast. Which option combinations are refused, and why: :mod:`lightning_dopt.combinations`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dopt.checkpoint_files import (SIDECAR_FORMAT, AtomicCheckpointIO, atomic_save, remove_other_saves,
                                             remove_sidecar_dir_if_empty, restore_point, sidecar_path)
from lightning_dopt.combinations import check as check_combination
from lightning_dopt.comm import CommStats, Communicator
from lightning_dopt.compress import Codec
from lightning_dopt.engine import Engine, NonFiniteReplicaError, build_engine, device_clock, optimizer_params
from lightning_dopt.hierarchy import NodeComms, NodeLayout, new_node_comms
from lightning_dopt.launchers import CheckedMultiProcessingLauncher, CheckedSubprocessLauncher
from lightning_dopt.options import AGGREGATIONS, EVAL_MODELS, PRESETS, Options, OptionsAttributes
from lightning_dopt.rounds import OuterOptimizerFactory
from lightning_dopt.signals import StopAtRounds
from lightning_dopt.topology import TOPOLOGIES, validate_topology

DEFAULT_TIMEOUT = timedelta(minutes=10)


class GossipLocalStrategy(OptionsAttributes, DDPStrategy):
    """Data parallelism with local steps and gossip (or all-reduce) averaging of replicas.

    The algorithm options (``local_steps`` … ``min_work``) are :class:`~lightning_dopt.options.Options`' (the update
    rule and every option are documented there) and are readable as attributes (``strategy.local_steps``).

    Args:
        timeout: bound on every collective and point-to-point wait (default 10 minutes).
        start_method: ``"popen"`` (scripts, torchrun, SLURM), ``"spawn"`` or ``"fork"`` (notebooks, tests).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin, process_group_backend:
            as for Lightning's ``DDPStrategy`` (the default checkpoint IO writes atomically).
    """

    strategy_name = "gossip_local"

    def __init__(
        self, local_steps: int = 1, topology: str = "random", warmup_steps: int = 0, average_buffers: bool = True,
        eval_model: str = "average", consensus_interval: int | None = None, seed: int = 0,
        compression: str | Codec | None = None, block_size: int = 256, anchor_interval: int = 16,
        anchor_tolerance: float | None = 0.5, aggregation: str = "mean", adacons_momentum: float = 0.0,
        adacons_layerwise: bool = False, adacons_guard: str = "shift", preserve_scale: bool = False,
        stale_weights: bool = False, outer_optimizer: str | OuterOptimizerFactory | None = None,
        scaling: str | None = None, scaling_beta: float = 0.999, scaling_eps: float = 1e-8,
        scaling_alpha_min: float = 1e-4, scaling_floor: float = 1e-2, overlap: bool = False, min_work: float = 1.0,
        hierarchy: str = "flat",
        accelerator: Accelerator | None = None, parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None, checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None, process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT, start_method: str = "popen",
    ) -> None:
        self.options = Options(
            local_steps, topology, warmup_steps, average_buffers, eval_model, consensus_interval, seed, compression,
            block_size, anchor_interval, anchor_tolerance, aggregation, adacons_momentum, adacons_layerwise,
            adacons_guard, preserve_scale, stale_weights, outer_optimizer, scaling, scaling_beta, scaling_eps,
            scaling_alpha_min, scaling_floor, overlap, min_work, hierarchy)
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"unknown start_method {start_method!r}; valid choices: popen, spawn, fork, forkserver")
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin, process_group_backend=process_group_backend, timeout=timeout,
            start_method=start_method)
        self._setting = self.options.setting
        # Plain Python state only: spawn launchers pickle the strategy. The engine is built in setup().
        self._engine: Engine | None = None
        self._restored: dict[str, Any] | None = None
        self._setups = 0

    @property
    def engine(self) -> Engine | None:
        """This rank's engine, built in :meth:`setup`: the algorithm objects, the counters and the schedule."""
        return self._engine

    @property
    def _sync(self) -> Any:
        return self._engine.sync if self._engine is not None else None

    @property
    def _comm(self) -> Any:
        return self._engine.comm if self._engine is not None else None

    # ----------------------------------------------------------------------------------------- launch
    @override
    def _configure_launcher(self) -> None:
        """Called while the Trainer is built, once it has given the strategy its precision plugin and layer sync:
        the combinations with those are checked here, before anything runs."""
        node_level = self.options.hierarchy == "node"
        validate_topology(self.options.topology, self.num_nodes if node_level else self.world_size)
        if node_level and self.num_nodes == 1:
            rank_zero_warn("lightning_dopt: hierarchy='node' on one node makes all its ranks one replica that averages "
                           "gradients every step (like DDP), with no rounds between nodes; use hierarchy='flat' to "
                           "gossip between the GPUs of one machine")
        self._setting = replace(self._setting, precision=getattr(self.precision_plugin, "precision", "32-true"),
                                sync_batchnorm=self._layer_sync is not None)
        check_combination(self._setting)
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = CheckedSubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes,
                                                       before_launch=self.check_fit)
        else:
            self._launcher = CheckedMultiProcessingLauncher(self, start_method=self._start_method,
                                                            before_launch=self.check_fit)

    def check_fit(self, trainer: Any, model: Any) -> None:
        """Check the combinations with the module's optimization mode and the Trainer's gradient accumulation.
        The launcher calls it when ``fit`` starts, before any rank process is started (and :meth:`setup` again on
        every rank): a refused combination is a ``ValueError`` naming the options."""
        if not isinstance(model, LightningModule) or trainer is None:
            return
        check_combination(replace(self._setting, automatic_optimization=bool(model.automatic_optimization),
                                  accumulate_grad_batches=int(trainer.accumulate_grad_batches)))

    # ------------------------------------------------------------------------------------------ setup
    def _ranks_per_replica(self) -> int:
        """How many ranks share one replica: under ``hierarchy="node"`` the ranks of this node (torchrun's
        ``LOCAL_WORLD_SIZE``, else SLURM's ``SLURM_NTASKS_PER_NODE``, else ``Trainer(devices=...)``), else 1."""
        if self.options.hierarchy != "node":
            return 1
        for variable in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
            if os.environ.get(variable, "").isdigit():
                return int(os.environ[variable])
        return self.num_processes

    def _node_comms(self, comm: Communicator) -> NodeComms:
        """``hierarchy="node"``: check that every node runs the same number of ranks, numbered node by node, then
        create the node's and the cross-node process groups. Collective: every rank checks the same gathered facts
        (one 3-float64 all-reduce), so a bad layout fails on every rank with the same error before training."""
        assert self.cluster_environment is not None
        local = self._ranks_per_replica()
        misnumbered = float(self.cluster_environment.node_rank() != self.global_rank // max(local, 1))
        facts = torch.tensor([local, -local, misnumbered], dtype=torch.float64, device=comm.device)
        comm.all_reduce_([facts], purpose="control", op="max")
        most, fewest, bad = int(facts[0]), int(-facts[1]), bool(facts[2])
        if most != fewest:
            raise ValueError(f"hierarchy='node' needs the same number of ranks on every node; the nodes run between "
                             f"{fewest} and {most} (LOCAL_WORLD_SIZE, or Trainer(devices=...)). Launch as many "
                             "processes on every node, or use hierarchy='flat'")
        if bad:
            raise ValueError("hierarchy='node' needs ranks numbered node by node (rank = node_rank · devices + "
                             "local_rank, as torchrun and SLURM number them); some rank's node_rank does not match. "
                             "Check the launcher's rank assignment, or use hierarchy='flat'")
        return self._new_node_comms(comm)

    def _new_node_comms(self, comm: Communicator, background: bool = False) -> NodeComms:
        """New node and cross-node process groups (collective, every rank in the same order), counted in ``comm``'s
        stats; ``background``: for the overlapped round's thread (its waits do not count as blocked time)."""
        return new_node_comms(NodeLayout(self.world_size, self._ranks_per_replica()), comm.stats, comm.liveness,
                              self._timeout, counts_time=not background)

    @override
    def setup(self, trainer: Any) -> None:
        """DDPStrategy.setup without the DDP wrapper: the engine, a common start from rank 0 (or the restored
        per-rank state), local optimizers."""
        assert self.accelerator is not None and self.model is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.check_fit(trainer, self.lightning_module)
        self.accelerator.setup(trainer)
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            self.setup_optimizers(trainer)
            _optimizers_to_device(self.optimizers, self.root_device)
        self.setup_precision_plugin()
        if fitting and self.options.scaling and trainer.gradient_clip_val:
            rank_zero_warn(f"lightning_dopt: gradient_clip_val={trainer.gradient_clip_val} with scaling="
                           f"{self.options.scaling!r} clips the scaled gradient D⁻¹g that the optimizer receives, not "
                           "the raw gradient g; pick the threshold for D⁻¹g (docs/scaling.md, 'The update')")
        restored, previous = self._restored if fitting else None, self._engine
        steps, round_index = (restored["steps"], restored["round"]) if restored else (0, 0) if fitting else \
            (previous.steps, previous.round) if previous is not None else (0, 0)
        comm = Communicator() if self.world_size > 1 else None
        if comm is not None:  # before the background communicator, which shares the heartbeats
            comm.start_liveness(prefix=f"lightning_dopt/{self._setups}")
        node = self._node_comms(comm) if comm is not None and self.options.hierarchy == "node" else None
        self._engine = build_engine(
            self.options, self.model, [optimizer_params(o) for o in self.optimizers] if fitting else [], comm,
            self.global_rank, self.root_device, steps, round_index, clock=device_clock(self.root_device),
            background=(lambda: comm.background(self._timeout)) if fitting and comm is not None else None,
            timeout=self._timeout.total_seconds() if self._timeout else None, node=node,
            node_background=(lambda: self._new_node_comms(comm, background=True)) if node is not None else None)
        if not fitting and previous is not None:  # (after fit, a test stage still reports the fit's counts)
            self._engine.skipped_steps = previous.skipped_steps
        sidecar = restored.get("sidecar") if restored else None
        if sidecar is not None:
            self._engine.load_state_dict(sidecar["engine"])
        elif self._sync is not None:
            self._sync.broadcast_(src=0)
        self._setups += 1

    @override
    def configure_ddp(self) -> None:
        """Never wrap in DDP: :meth:`setup` handles the model (kept for callers of the DDP API)."""

    @property
    def comm_stats(self) -> CommStats:
        """This rank's communication counters (all zero when running on a single process)."""
        return self._engine.comm_stats if self._engine is not None else CommStats()

    def gather_comm_stats(self) -> list[CommStats]:
        """Every rank's counters, in rank order. Collective: call it on every rank."""
        return self._comm.gather_stats() if self._comm is not None else [self.comm_stats]

    @property
    def steps(self) -> int:
        """Optimizer steps taken in this fit (counted once per batch, at the last optimizer), trained or skipped."""
        return self._engine.steps if self._engine is not None else 0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps this rank skipped in this fit (partial work, ``min_work < 1``)."""
        return self._engine.skipped_steps if self._engine is not None else 0

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        sidecar = self._restored.get("sidecar") if self._restored else None
        if sidecar is not None:
            _set_rng_states(sidecar["rng"])
            if sidecar.get("precision"):  # after Lightning restored rank 0's from the main file
                self.precision_plugin.load_state_dict(sidecar["precision"])
        self._restored = None
        assert self._engine is not None
        self._engine.start_fit()
        if self._comm is not None:
            trainer = self.lightning_module.trainer
            self._engine.check_equal_batches(trainer.num_training_batches, trainer.max_steps)
            StopAtRounds(self).install(trainer)

    # ----------------------------------------------------------------------------------- optimization
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``training_step``, or, on a step skipped for partial work, a loss with no path to the
        parameters (Lightning refuses ``None`` in distributed runs), marked ``dopt_skipped``."""
        if self._engine is not None and self._engine.skipping:
            return {"loss": torch.zeros((), device=self.root_device, requires_grad=True), "dopt_skipped": True}
        return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        engine = self._engine
        assert engine is not None
        last = optimizer is self.optimizers[-1]
        if engine.skipping:
            # Lightning needs the closure to run (it zeroes the gradients); the optimizer, clipping and the
            # before-optimizer-step hooks do not: a skipped step leaves the replica and optimizer state untouched.
            output = closure()
            if last:
                engine.skip_step()
                self._after_step()
            return output
        wrapped = engine.wrap_closure(self.optimizers.index(optimizer), optimizer_params(optimizer), closure,
                                      raw_closure=closure, loss_scale=self._loss_scale(),
                                      buffers=list(self.lightning_module.buffers()), device=self.root_device)
        output = super().optimizer_step(optimizer, wrapped, model, **kwargs)
        if last:
            self._after_step()
        return output

    def _loss_scale(self) -> float | None:
        """The gradient scaler's current scale ``S`` under ``precision="16-mixed"``, ``None`` without one (constant
        until the plugin's ``scaler.update()`` after this step; one host sync per optimizer step)."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def _after_step(self) -> None:
        logged = self._engine.after_step()
        if logged:
            self._log(logged, on_step=True, on_epoch=False)

    def _log(self, metrics: Mapping[str, float], on_step: bool, on_epoch: bool) -> None:
        module = self.lightning_module
        if module is None or module._current_fx_name is None:
            return
        # Step values come from rank 0 (no extra collective); epoch values are identical on every rank, and
        # sync_dist makes Lightning's epoch aggregation aware of that (one scalar all-reduce per epoch).
        module.log_dict(dict(metrics), on_step=on_step, on_epoch=on_epoch, batch_size=1,
                        rank_zero_only=not on_epoch, sync_dist=on_epoch)

    def finish_rounds(self) -> None:
        """Wait for and apply the background round in flight (``overlap=True``; done before evaluation, checkpoints
        and the end of fit): call it on every rank to time or read replicas after all communication has landed."""
        if self._engine is not None:
            self._engine.drain()

    @override
    def on_train_end(self) -> None:
        """After fit every rank (and the spawn launcher's main process) holds the exact average."""
        super().on_train_end()
        engine = self._engine
        assert engine is not None
        engine.finish_fit()
        if engine.pacer is not None:
            rank_zero_info(engine.partial_work_report())

    # ---------------------------------------------------- Lightning's own collectives, with failures named
    @contextmanager
    def _guard(self, operation: str, skippable: bool = False) -> Iterator[None]:
        engine, module = self._engine, self.lightning_module
        if skippable and engine is not None and engine.pacer is not None and module is not None and \
                module._current_fx_name == "training_step":
            # a skipping rank does not run training_step: a collective there would meet a different one (or none)
            raise RuntimeError(
                f"{operation} inside training_step cannot be combined with min_work < 1: a slow rank skips "
                "training_step on some steps and would not join it, deadlocking the ranks. Log per-step values "
                "without sync_dist (or with on_step=False, on_epoch=True), move the collective out of "
                "training_step, or use min_work=1.0")
        if self._comm is None:
            yield
        else:
            with self._comm.guarded(operation, "control", None):
                yield

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        with self._guard("barrier"):
            super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with self._guard("broadcast"):
            return super().broadcast(obj, src)

    @override
    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        with self._guard("reduce (LightningModule.log with sync_dist=True)", skippable=True):
            return super().reduce(tensor, *args, **kwargs)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        with self._guard("all_gather", skippable=True):
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    # ------------------------------------------------------------------------------------- evaluation
    # Validation inside fit swaps the exact average in and the replica back out. Test, predict and standalone
    # validate are stages of their own: setup() broadcasts rank 0's weights, which are the average after fit
    # (every rank ends fit holding it) and after loading a checkpoint (the main file holds it).
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._sync is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return
        self._engine.drain()
        if self.options.eval_model == "average":
            distance = self._sync.swap_in_average("eval")
        else:
            distance = self._sync.consensus_distance("eval")
        self._log({"dopt/consensus_distance": distance}, on_step=False, on_epoch=True)

    @override
    def on_validation_end(self) -> None:
        if self._sync is not None and self._sync.swapped:
            self._sync.restore_local()
        super().on_validation_end()

    # ------------------------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The main checkpoint holds the exact average (collective: every rank runs it)."""
        self.finish_rounds()
        with self._sync.holding("average") if self._sync is not None else nullcontext():
            return {key: value.clone() for key, value in self.lightning_module.state_dict().items()}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Any | None = None) -> None:
        """Crash-safe collective save (every rank runs it):

        1. every rank writes its sidecar ``<path>.dopt/rank<r>-<id>.pt`` of this save (id broadcast by rank 0);
        2. barrier; rank 0 writes the main file, which names the save id: the commit point;
        3. barrier; every rank deletes its sidecars of older saves of the same path.

        Every file is written atomically, so a crash at any moment leaves the previous save of ``path`` complete and
        consistent (its main file still names its own sidecars)."""
        if self._sync is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        engine = self._engine
        engine.drain()
        filepath, save_id = self.broadcast((str(filepath), uuid.uuid4().hex))
        checkpoint["lightning_dopt"] = {
            "world_size": self.world_size, "steps": engine.steps, "round": engine.round, "save_id": save_id,
            "topology": self.options.topology, "local_steps": self.options.local_steps,
            "ranks_per_replica": self._ranks_per_replica(),
        }
        with self._sync.holding("local"):
            sidecar = {
                "format": SIDECAR_FORMAT, "rank": self.global_rank, "world_size": self.world_size, "save_id": save_id,
                "state_dict": self.lightning_module.state_dict(),
                "optimizer_states": [optimizer.state_dict() for optimizer in self.optimizers],
                "rng": _collect_rng_states(), "engine": engine.state_dict(),
                # each rank's gradient scaler skips (and so rescales) on its own: the main file holds rank 0's only
                "precision": self.precision_plugin.state_dict(),
            }
            atomic_save(sidecar, sidecar_path(filepath, self.global_rank, save_id))
        self.barrier("lightning_dopt: sidecars written")
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        self.barrier("lightning_dopt: main file written")
        remove_other_saves(filepath, self.global_rank, keep_save_id=save_id)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Every rank deletes its sidecars of ``filepath``; rank 0 then the main file and the empty directory."""
        remove_other_saves(filepath, self.global_rank, keep_save_id=None)
        if self._sync is not None:
            self.barrier("lightning_dopt: sidecars removed")
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_sidecar_dir_if_empty(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Read the main file and, when fitting on as many ranks as wrote it, this rank's sidecar (validation, test and
        predict use the main file's averaged model)."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        self._restored = restore_point(checkpoint, checkpoint_path, self.global_rank, self.world_size,
                                       self._ranks_per_replica()) if fitting else None
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        sidecar = self._restored.get("sidecar") if self._restored else None
        if sidecar is None:
            return super().load_model_state_dict(checkpoint, strict=strict)
        self.lightning_module.load_state_dict(sidecar["state_dict"], strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        sidecar = self._restored.get("sidecar") if self._restored else None
        super().load_optimizer_state_dict(checkpoint if sidecar is None else sidecar)

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Tell the peers why this rank is failing (they name it in their own error), and give up any round in
        flight without applying it."""
        if self._engine is not None:
            self._engine.fail(exception)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        if self._engine is not None:
            self._engine.close()
        super().teardown()

    # ----------------------------------------------------------------------------------- registration
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, (init_params, description) in PRESETS.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"lightning_dopt: {description}", **init_params)


__all__ = ["AGGREGATIONS", "AtomicCheckpointIO", "EVAL_MODELS", "GossipLocalStrategy", "NonFiniteReplicaError",
           "TOPOLOGIES", "sidecar_path"]
