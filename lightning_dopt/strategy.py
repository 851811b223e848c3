"""``GossipLocalStrategy``: the only module that knows Lightning.

Each rank trains its own replica with its own optimizer (no DDP wrapper, no per-step gradient
all-reduce). After every ``local_steps`` optimizer steps, a synchronization round pulls the replicas
together with the topology's mixing matrix (:mod:`lightning_dopt.rounds`). The first ``warmup_steps``
steps average gradients like DDP. Validation, test and predict run on the exact global average, which is
swapped in and swapped back out; checkpoints hold the average in the main file (loadable by plain
Lightning) and each rank's replica, optimizer state, counters and RNG in a per-rank sidecar file.

Communication per rank and optimizer step, for a model of ``P`` bytes on ``n`` ranks:
DDP ``2(n-1)/n · P``; ``complete`` ``2(n-1)/n · P / H``; ``random`` and ``one_peer_exponential``
``P / H``; ``ring``/``torus``/``exponential`` ``degree · P / H``; plus ``2(n-1)/n · 32n`` bytes of control flags
per round (stop requests, non-finite replicas, pace, compression noise), which replace Lightning's per-batch SIGTERM
broadcast. Which option combinations are refused, and why: :mod:`lightning_dopt.combinations`.
With ``overlap=True`` the rounds run in a background thread, one round stale (:class:`OverlappedRounds`). With
``min_work < 1`` a persistently slow rank skips a share of its batches instead of holding the others back
(:mod:`lightning_dopt.pacing`).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from dataclasses import replace
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_dopt.checkpoint_files import (atomic_save, remove_other_saves, remove_sidecar_dir_if_empty,
                                             sidecar_path)
from lightning_dopt.combinations import Setting, check as check_combination
from lightning_dopt.comm import CommStats, Communicator, PeerFailure
from lightning_dopt.compress import Codec, make_codec
from lightning_dopt.aggregate import GUARDS
from lightning_dopt.launchers import CheckedMultiProcessingLauncher, CheckedSubprocessLauncher
from lightning_dopt.gradients import AdaConsCombiner, AdaConsGradients, GradientAverager
from lightning_dopt.pacing import WorkPacer, check_min_work
from lightning_dopt.rounds import (FLAG_BLOCKS, NOISE_BLOCK, NONFINITE_BLOCK, PACE_BLOCK, STOP_BLOCK,
                                   OuterOptimizerFactory, OverlappedRounds, ReplicaSync, diloco_outer_optimizer)
from lightning_dopt.scaling import (SCALINGS, OASISScaling, Preconditioner, all_finite, capture_rng_state,
                                    check_relative_floor, make_preconditioner, replayed_closure_hvp)
from lightning_dopt.topology import TOPOLOGIES, validate_topology

EVAL_MODELS = ("average", "local")
AGGREGATIONS = ("mean", "adacons")
SIDECAR_FORMAT = "lightning_dopt.sidecar/1"
DEFAULT_TIMEOUT = timedelta(minutes=10)


class NonFiniteReplicaError(FloatingPointError):
    """A replica holds NaN or Inf at a round; raised on every rank before the values reach a partner."""


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (what Lightning's requeue handler does), logging rather than raising."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not job:
        rank_zero_warn("lightning_dopt: no SLURM_JOB_ID in the environment; the job was not requeued")
        return
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except OSError as error:
        rank_zero_warn(f"lightning_dopt: could not requeue SLURM job {job}: {error}")
        return
    (rank_zero_info if code == 0 else rank_zero_warn)(f"lightning_dopt: scontrol requeue {job} exited with {code}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint writer, made crash-safe on local filesystems: the new file is written
    beside the target, synced and renamed over it (:func:`~lightning_dopt.checkpoint_files.atomic_save`). Lightning's
    own writer stages the file in ``TMPDIR`` and moves it, which is a copy (truncating the previous checkpoint on a
    crash) when ``TMPDIR`` is on another filesystem, the usual cluster layout."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options; got {storage_options!r}")
        get_filesystem(path).makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        atomic_save(checkpoint, path)
        remove_sidecar_dir_if_empty(path)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_adacons_options(aggregation: str, momentum: float, guard: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid choices: {', '.join(AGGREGATIONS)}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"adacons_momentum must be a number in [0, 1); got {momentum!r}")
    if guard not in GUARDS:
        raise ValueError(f"unknown adacons_guard {guard!r}; valid choices: {', '.join(GUARDS)}")


def _outer_optimizer_factory(outer_optimizer: str | OuterOptimizerFactory | None) -> OuterOptimizerFactory | None:
    if outer_optimizer is None:
        return None
    if isinstance(outer_optimizer, str):
        if outer_optimizer != "diloco":
            raise ValueError(f"unknown outer_optimizer {outer_optimizer!r}; valid choices: None, 'diloco', or a "
                             "callable that builds a torch.optim.Optimizer from a list of tensors")
        return diloco_outer_optimizer
    if callable(outer_optimizer):
        return outer_optimizer
    raise ValueError(f"outer_optimizer must be None, 'diloco' or a callable; got {outer_optimizer!r}")


class GossipLocalStrategy(DDPStrategy):
    """Data parallelism with local steps and gossip (or all-reduce) averaging of replicas.

    Update, for rank ``i`` with replica ``x_i`` and its own optimizer:

    * every optimizer step: ``x_i ← opt_i(x_i, g_i)`` with the rank's local gradient ``g_i``
      (during the first ``warmup_steps`` steps ``g_i`` is replaced by ``(1/n) Σ_j g_j``, as in DDP);
    * after every ``local_steps``-th step past warm-up, round ``r``: ``x_i ← Σ_j W_ij(r) x_j`` with the
      mixing matrix of ``topology`` for round ``r`` (a pure function of ``(seed, r, n)``).

    Args:
        local_steps: H ≥ 1, optimizer steps between synchronization rounds.
        topology: one of :data:`~lightning_dopt.topology.TOPOLOGIES`. ``complete`` is Local SGD (exact mean
            by all-reduce); ``random`` is SwarmSGD's random pairwise matching.
        warmup_steps: number of initial optimizer steps that average gradients every step (DDP-equivalent).
        average_buffers: also average persistent floating-point buffers (BatchNorm running statistics) at rounds
            (non-persistent buffers, constants left out of ``state_dict``, are never sent).
        eval_model: ``"average"`` evaluates validation/test/predict on the exact global average,
            ``"local"`` on each rank's replica.
        consensus_interval: if set, log the consensus distance every this many optimizer steps
            (one extra all-reduce of the model each time). It is always logged at validation.
        seed: seed of the round schedule (the same on every rank).
        compression: what crosses the wire at rounds: ``None`` (fp32), one of
            :data:`~lightning_dopt.compress.CODECS` (``"bf16"``, ``"fp16"``, ``"int8"``, ``"int4"``) or a
            :class:`~lightning_dopt.compress.Codec`. Ranks send the difference from a shared anchor, so the error is
            proportional to the replicas' spread plus their drift since the anchor's last refresh, not to the
            weights (:class:`~lightning_dopt.rounds.AnchoredCompression`).
        block_size: values per quantization block (one scale and offset each) for ``int8``/``int4``.
        anchor_interval: with compression, every this many rounds is a compressed exact-mean round that
            refreshes the shared anchor (every round for ``complete``): the longest a shared anchor is kept.
        anchor_tolerance: with compression, a round is also an anchor refresh when some rank predicts that its
            compression error ``‖Q(x_i − a) − (x_i − a)‖`` would exceed this fraction of its distance to its
            neighbours' replicas (the codec's relative error at its last graph round times its drift since the
            anchor, over the distance measured then; the error grows with the drift, the distance does not).
            ``None``: refresh only every ``anchor_interval`` rounds.
        aggregation: ``"mean"``, or ``"adacons"`` (with ``topology="complete"``): with ``local_steps=1`` every
            step's gradient is the AdaCons combination of all ranks' gradients instead of their mean
            (:mod:`lightning_dopt.gradients`); with ``local_steps > 1`` each round combines the pseudo-gradients
            ``anchor − x_i`` with AdaCons weights, keeping the mean pseudo-gradient's norm
            (:class:`~lightning_dopt.rounds.PseudoGradientRounds`).
        adacons_momentum: β of AdaCons' subspace momentum (0 disables it).
        adacons_layerwise: one weight per rank and parameter tensor instead of one per rank.
        adacons_guard: ``"shift"`` or ``"mean"``: what to do with negative coefficients or a sum ≤ eps.
        preserve_scale: rescale the AdaCons gradient to the norm of the mean gradient (use it with plain SGD).
        stale_weights: reuse the previous step's AdaCons weights: one gradient all-reduce per step instead of two.
        outer_optimizer: with ``topology="complete"``: ``"diloco"`` (SGD, Nesterov momentum 0.9, lr 0.7) or a
            factory ``params -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=1.0)``;
            picklable for the spawn launcher). Each round then steps a shared anchor with the pseudo-gradient
            ``anchor − mean_i x_i`` (DiLoCo) and sets every replica to it.
        scaling: ``None`` or one of :data:`~lightning_dopt.scaling.SCALINGS` (``"adam"``, ``"rmsprop"``,
            ``"oasis"``): every local step becomes ``x ← x − γ D⁻¹ g`` (the optimizer sees ``D⁻¹ g``) with a diagonal
            ``D`` frozen during a local phase and refreshed after each round from statistics mixed in the round's
            message (identical on every rank with ``complete``, approximately so with gossip). ``D = 1`` until the
            first round. OASIS estimates ``diag(∇²f)`` with one finite-difference Hutchinson probe per step (two
            extra forward/backward passes).
        scaling_beta, scaling_eps, scaling_alpha_min: EMA factor of the statistics, floor of ``D`` for adam/rmsprop,
            floor for oasis.
        scaling_floor: relative floor of ``D``: within each parameter tensor ``D ≥ scaling_floor · mean(D)``, so a
            coordinate whose statistics are (near) zero does not take a step ``1/eps`` times too long (0 disables it).
        overlap: run each round's exchange in a background thread (own process group, side CUDA stream) while
            the next local steps compute, and apply it one round later with the delta rule
            ``x ← x + (mixed − snapshot)`` (:class:`~lightning_dopt.rounds.OverlappedRounds`; staleness one round).
            Not with AdaCons rounds or an outer optimizer.
        min_work: the least share of its batches a rank trains on. Below 1.0, a rank persistently slower than the
            median rank skips whole optimizer steps (its work fraction adapts at every round to the median's pace,
            never below ``min_work``) instead of making the others wait for it at rounds (partial work,
            :mod:`lightning_dopt.pacing`). Skipped steps still count as steps (rounds, ``global_step``,
            schedulers); the user's ``training_step`` is not called for them and ``on_train_batch_end`` receives
            ``{"loss": 0, "dopt_skipped": True}``. Needs automatic optimization and no collectives inside
            ``training_step`` (``self.log(..., sync_dist=True)`` per step, ``all_gather``, ``sync_batchnorm``),
            which a skipping rank would not join. 1.0 (default): every rank trains on every batch.
        timeout: bound on every collective and point-to-point wait (default 10 minutes).
        start_method: ``"popen"`` (scripts, torchrun, SLURM), ``"spawn"`` or ``"fork"`` (notebooks, tests).
    """

    strategy_name = "gossip_local"

    def __init__(
        self,
        local_steps: int = 1,
        topology: str = "random",
        warmup_steps: int = 0,
        average_buffers: bool = True,
        eval_model: str = "average",
        consensus_interval: int | None = None,
        seed: int = 0,
        compression: str | Codec | None = None,
        block_size: int = 256,
        anchor_interval: int = 16,
        anchor_tolerance: float | None = 0.5,
        aggregation: str = "mean",
        adacons_momentum: float = 0.0,
        adacons_layerwise: bool = False,
        adacons_guard: str = "shift",
        preserve_scale: bool = False,
        stale_weights: bool = False,
        outer_optimizer: str | OuterOptimizerFactory | None = None,
        scaling: str | None = None,
        scaling_beta: float = 0.999,
        scaling_eps: float = 1e-8,
        scaling_alpha_min: float = 1e-4,
        scaling_floor: float = 1e-2,
        overlap: bool = False,
        min_work: float = 1.0,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: str = "popen",
    ) -> None:
        _check_int("local_steps", local_steps, 1)
        validate_topology(topology)
        _check_int("warmup_steps", warmup_steps, 0)
        if eval_model not in EVAL_MODELS:
            raise ValueError(f"unknown eval_model {eval_model!r}; valid choices: {', '.join(EVAL_MODELS)}")
        if consensus_interval is not None:
            _check_int("consensus_interval", consensus_interval, 1)
        _check_int("seed", seed, 0)
        _check_int("anchor_interval", anchor_interval, 1)
        if anchor_tolerance is not None and (isinstance(anchor_tolerance, bool) or not isinstance(
                anchor_tolerance, (int, float)) or not 0 < anchor_tolerance < math.inf):
            raise ValueError(f"anchor_tolerance must be a number > 0 or None; got {anchor_tolerance!r}")
        codec = make_codec(compression, block_size=block_size)
        _check_adacons_options(aggregation, adacons_momentum, adacons_guard)
        outer_factory = _outer_optimizer_factory(outer_optimizer)
        if scaling is not None:
            if scaling not in SCALINGS:
                raise ValueError(f"unknown scaling {scaling!r}; valid choices: None, {', '.join(SCALINGS)}")
            check_relative_floor(scaling_floor, "scaling_floor")
            make_preconditioner(scaling, [], beta=scaling_beta, eps=scaling_eps, alpha_min=scaling_alpha_min,
                                relative_floor=scaling_floor)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False; got {overlap!r}")
        min_work = check_min_work(min_work)
        self._setting = Setting(
            topology=topology, compression=None if codec is None else compression if isinstance(compression, str)
            else repr(codec), overlap=overlap, scaling=scaling, aggregation=aggregation,
            outer_optimizer=None if outer_optimizer is None else "diloco" if outer_optimizer == "diloco" else "custom",
            local_steps=local_steps, min_work=min_work, warmup_steps=warmup_steps, stale_weights=stale_weights,
            preserve_scale=preserve_scale)
        check_combination(self._setting)
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"unknown start_method {start_method!r}; valid choices: popen, spawn, fork, forkserver")
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
        )
        self.local_steps = local_steps
        self.topology = topology
        self.warmup_steps = warmup_steps
        self.average_buffers = average_buffers
        self.eval_model = eval_model
        self.consensus_interval = consensus_interval
        self.seed = seed
        self.compression = compression
        self.block_size = block_size
        self.anchor_interval = anchor_interval
        self.anchor_tolerance = anchor_tolerance
        self._codec = codec
        self.aggregation = aggregation
        self.adacons_momentum = adacons_momentum
        self.adacons_layerwise = adacons_layerwise
        self.adacons_guard = adacons_guard
        self.preserve_scale = preserve_scale
        self.stale_weights = stale_weights
        self.outer_optimizer = outer_optimizer
        self.scaling = scaling
        self.scaling_beta = scaling_beta
        self.scaling_eps = scaling_eps
        self.scaling_alpha_min = scaling_alpha_min
        self.scaling_floor = scaling_floor
        self.overlap = overlap
        self.min_work = min_work
        self._preconditioners: list[tuple[list[torch.Tensor], Preconditioner]] = []
        self._outer_factory = outer_factory
        # Plain Python state only: spawn launchers pickle the strategy. Tensors are created in setup().
        self._steps = 0
        self._round = 0
        self._sync: ReplicaSync | None = None
        self._comm: Communicator | None = None
        self._grad_averagers: dict[int, GradientAverager] = {}
        self._grad_combiners: dict[int, AdaConsGradients] = {}
        self._restored_combiners: dict[int, dict[str, Any]] = {}
        self._restored: dict[str, Any] | None = None
        self._overlapped: OverlappedRounds | None = None
        self._pacer: WorkPacer | None = None
        self._skipping = False  # the current optimizer step (all its micro-batches) is skipped (partial work)
        self._skipped_steps = 0
        self._fit_first_step = 0  # self._steps when this fit began (after a resume: the restored count)
        self._pace_window: tuple[float, int] | None = None  # (start time, trained steps) of the window measured
        self._setups = 0
        self._sigterm = False  # this rank received SIGTERM (set by the signal handler)
        self._stop_requested = False  # some rank received SIGTERM: every rank stops at the next batch boundary
        self._flags_step = 0
        self._sigterm_ranks: list[int] = []
        self._requeue = False  # this rank received SLURM's requeue signal
        self._requeue_requested = False  # some rank did: rank 0 requeues the job after the checkpoint

    # ----------------------------------------------------------------------------------------- launch
    def _configure_launcher(self) -> None:
        """Called while the Trainer is built, once it has given the strategy its precision plugin and layer sync:
        the combinations with those are checked here, before anything runs."""
        validate_topology(self.topology, self.world_size)
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
    def setup(self, trainer: Any) -> None:
        """DDPStrategy.setup without the DDP wrapper: common start from rank 0, then local optimizers."""
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
        self.setup_precision_plugin()
        sidecar = self._restored.get("sidecar") if fitting and self._restored else None
        self._restored_combiners = dict(sidecar["aggregation"]) if sidecar else {}
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._steps, self._round = 0, 0
            self._grad_averagers, self._grad_combiners = {}, {}
            self._preconditioners = self._build_preconditioners(trainer)
            if self._restored:
                self._steps, self._round = self._restored["steps"], self._restored["round"]
        if self.world_size > 1:
            self._comm = Communicator()
            self._sync = ReplicaSync(self.model, self._comm, self.topology, self.seed, self.average_buffers,
                                     codec=self._codec, anchor_interval=self.anchor_interval,
                                     anchor_tolerance=self.anchor_tolerance,
                                     round_combiner=self._round_combiner(), outer_optimizer=self._outer_factory,
                                     statistics=[preconditioner for _, preconditioner in self._preconditioners])
            if sidecar is None:
                self._sync.broadcast_(src=0)
            else:
                self._load_sidecar_state(sidecar)
            self._comm.start_liveness(prefix=f"lightning_dopt/{self._setups}")
            if fitting and self.overlap:
                timeout = self._timeout.total_seconds() if self._timeout is not None else None
                self._overlapped = OverlappedRounds(self._sync, self._comm.background(self._timeout), timeout)
        if fitting:
            self._pacer, self._skipping, self._skipped_steps, self._fit_first_step = None, False, 0, self._steps
        if fitting and self._sync is not None and self.min_work < 1.0:
            self._pacer = WorkPacer(self.min_work)
        self._setups += 1

    def _load_sidecar_state(self, sidecar: dict[str, Any]) -> None:
        """Restore the per-rank round state written by :meth:`save_checkpoint` (after the replica itself)."""
        assert self._sync is not None and self._comm is not None
        self._comm.stats.load_state_dict(sidecar["comm_stats"])
        if self._sync.compression is not None:
            self._sync.compression.load_state_dict(sidecar["compression"])
        if self._sync.pseudo_gradients is not None:
            self._sync.pseudo_gradients.load_state_dict(sidecar["pseudo_gradients"])
        for (_, preconditioner), saved in zip(self._preconditioners, sidecar["scaling"]):
            preconditioner.load_state_dict(saved["state"])
            if isinstance(preconditioner, OASISScaling) and preconditioner.generator is not None:
                preconditioner.generator.set_state(saved["generator"])

    def _build_preconditioners(self, trainer: Any) -> list[tuple[list[torch.Tensor], Preconditioner]]:
        """One frozen-between-rounds diagonal preconditioner per optimizer (``scaling``), or none."""
        if self.scaling is None:
            return []
        if trainer.gradient_clip_val:
            rank_zero_warn(f"lightning_dopt: gradient_clip_val={trainer.gradient_clip_val} with scaling="
                           f"{self.scaling!r} clips the scaled gradient D⁻¹g that the optimizer receives, not the raw "
                           "gradient g; pick the threshold for D⁻¹g (docs/scaling.md, 'The update')")
        preconditioners = []
        for index, optimizer in enumerate(self.optimizers):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            generator = torch.Generator(device=self.root_device).manual_seed(
                self.seed * 65_537 + 1_000 * index + self.global_rank)
            preconditioners.append((params, make_preconditioner(
                self.scaling, params, beta=self.scaling_beta, eps=self.scaling_eps,
                alpha_min=self.scaling_alpha_min, generator=generator, relative_floor=self.scaling_floor)))
        return preconditioners

    def _round_combiner(self) -> AdaConsCombiner | None:
        """AdaCons on pseudo-gradients at rounds (``aggregation="adacons"`` with ``local_steps > 1``)."""
        if self.aggregation != "adacons" or self.local_steps == 1:
            return None
        assert self._comm is not None and self.model is not None
        sizes = [p.numel() for p in self.model.parameters() if p.is_floating_point()]
        return AdaConsCombiner(self._comm, sizes if self.adacons_layerwise else None, self.adacons_momentum,
                               self.adacons_guard, preserve_scale=True, stale_weights=False, purpose="round")

    def configure_ddp(self) -> None:
        """Never wrap in DDP: :meth:`setup` handles the model (kept for callers of the DDP API)."""

    @property
    def comm_stats(self) -> CommStats:
        """This rank's communication counters (all zero when running on a single process)."""
        return self._comm.stats if self._comm is not None else CommStats()

    def gather_comm_stats(self) -> list[CommStats]:
        """Every rank's counters, in rank order. Collective: call it on every rank."""
        return self._comm.gather_stats() if self._comm is not None else [self.comm_stats]

    @property
    def steps(self) -> int:
        """Optimizer steps taken in this fit (counted once per batch, at the last optimizer), trained or skipped."""
        return self._steps

    @property
    def _trained_steps(self) -> int:
        return self._steps - self._skipped_steps

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps this rank skipped in this fit (partial work, ``min_work < 1``)."""
        return self._skipped_steps

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._restored and self._restored.get("sidecar"):
            _set_rng_states(self._restored["sidecar"]["rng"])
            if self._restored["sidecar"].get("precision"):  # after Lightning restored rank 0's from the main file
                self.precision_plugin.load_state_dict(self._restored["sidecar"]["precision"])
        self._restored = None
        if self._comm is not None:
            self._check_equal_batches()
            self._sigterm = self._stop_requested = self._requeue = self._requeue_requested = False
            self._take_over_sigterm(self.lightning_module.trainer)
        self._pace_window = None  # the first window (start-up) is not measured

    def _check_equal_batches(self) -> None:
        """Ranks that run different numbers of batches would deadlock at a round: fail early instead."""
        trainer = self.lightning_module.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            if trainer.max_steps == -1:
                raise RuntimeError(
                    "the training data has no length (e.g. an IterableDataset without __len__), so ranks may run "
                    "different numbers of training batches per epoch (uneven data) and deadlock at a round. Set "
                    "Trainer(max_steps=...) and give every rank a stream at least that long, or give the dataset a "
                    "__len__ that is the same on every rank.")
            return
        bounds = torch.tensor([batches, -batches], dtype=torch.float64, device=self.root_device)
        assert self._comm is not None
        self._comm.all_reduce_([bounds], purpose="control", op="max")
        most, fewest = int(bounds[0].item()), int(-bounds[1].item())
        if most != fewest:
            raise RuntimeError(
                f"ranks have different numbers of training batches per epoch (between {fewest} and {most}; "
                f"rank {self.global_rank} has {int(batches)}). Every rank must take the same optimizer steps, or "
                "the synchronization rounds deadlock. Use Lightning's DistributedSampler (the default), give every "
                "rank equally long data, or set limit_train_batches / max_steps.")

    # ----------------------------------------------------------------------------------- optimization
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``training_step``, or, on a step skipped for partial work, a loss with no path to the
        parameters (Lightning refuses ``None`` in distributed runs), marked ``dopt_skipped``."""
        if self._skipping:
            return {"loss": torch.zeros((), device=self.root_device, requires_grad=True), "dopt_skipped": True}
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        if self._skipping:
            # Lightning needs the closure to run (it zeroes the gradients); the optimizer, clipping and the
            # before-optimizer-step hooks do not: a skipped step leaves the replica and optimizer state untouched.
            output = closure()
            if optimizer is self.optimizers[-1]:
                self._skipped_steps += 1
                self._after_step()
            return output
        raw_closure = closure
        loss_scale = self._loss_scale()  # constant until the plugin's scaler.update() after this step
        if self._comm is not None and self._steps < self.warmup_steps:
            closure = self._averaging_gradients(optimizer, closure, loss_scale)
        elif self._comm is not None and self._combines_gradients:
            closure = self._combining_gradients(optimizer, closure, loss_scale)
        if self._preconditioners:
            closure = self._scaling_gradients(optimizer, closure, raw_closure, loss_scale)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if optimizer is self.optimizers[-1]:
            self._after_step()
        return output

    def _averaging_gradients(self, optimizer: Optimizer, closure: Callable[[], Any],
                             loss_scale: float | None) -> Callable[[], Any]:
        """Wrap the closure so gradients are averaged after backward and before clipping and the update."""
        key = id(optimizer)
        if key not in self._grad_averagers:
            assert self._comm is not None
            params = (p for group in optimizer.param_groups for p in group["params"])
            self._grad_averagers[key] = GradientAverager(params, self._comm)
        averager = self._grad_averagers[key]

        def averaged_closure() -> Any:
            output = closure()
            averager.average_(loss_scale)
            return output

        return averaged_closure

    @property
    def _combines_gradients(self) -> bool:
        """Synchronous AdaCons: every step combines gradients, so replicas never diverge and need no rounds."""
        return self.aggregation == "adacons" and self.local_steps == 1

    def _combining_gradients(self, optimizer: Optimizer, closure: Callable[[], Any],
                             loss_scale: float | None) -> Callable[[], Any]:
        """Wrap the closure so gradients are replaced by their AdaCons combination before clipping and update."""
        index = self.optimizers.index(optimizer)
        if index not in self._grad_combiners:
            assert self._comm is not None
            params = (p for group in optimizer.param_groups for p in group["params"])
            combiner = AdaConsGradients(params, self._comm, momentum=self.adacons_momentum,
                                        layerwise=self.adacons_layerwise, guard=self.adacons_guard,
                                        preserve_scale=self.preserve_scale, stale_weights=self.stale_weights)
            pending = self._restored_combiners.pop(index, None)
            if pending is not None:
                combiner.combiner.load_state_dict(pending)
            self._grad_combiners[index] = combiner

        def combined_closure() -> Any:
            output = closure()
            self._grad_combiners[index].combine_(loss_scale)
            return output

        return combined_closure

    def _scaling_gradients(self, optimizer: Optimizer, closure: Callable[[], Any], raw_closure: Callable[[], Any],
                           loss_scale: float | None) -> Callable[[], Any]:
        """Wrap the closure so the gradients reaching clipping and the optimizer are ``D⁻¹ g``."""
        params, preconditioner = self._preconditioners[self.optimizers.index(optimizer)]

        def scaled_closure() -> Any:
            rng_state = capture_rng_state(self.root_device) if isinstance(preconditioner, OASISScaling) else None
            output = closure()
            grads = [p.grad for p in params]
            if rng_state is not None:
                # Lightning's closure object re-runs training_step and backward through .closure() without replacing
                # the step's result (the loss reported for the step stays the one at x, not at a probe point)
                probe = getattr(raw_closure, "closure", raw_closure)
                buffers = list(self.lightning_module.buffers())
                preconditioner.accumulate_hutchinson(
                    lambda vectors: replayed_closure_hvp(probe, params, vectors, rng_state, buffers))
            elif loss_scale is None:
                preconditioner.accumulate(grads)
            elif all_finite(grads):  # the scaler skips this step otherwise: its gradients are not accumulated
                preconditioner.accumulate(grads, loss_scale=loss_scale)
            preconditioner.apply_(grads)  # linear: dividing the scaled gradient by D scales the unscaled one
            return output

        return scaled_closure

    def _loss_scale(self) -> float | None:
        """The gradient scaler's current scale ``S`` under ``precision="16-mixed"``, ``None`` without one.

        The precision plugin unscales the gradients only after the closure, so the wrappers above see ``S · g``:
        they act on ``g`` (averaging, AdaCons, statistics) and hand back ``S ×`` their result, which the plugin's
        unscale and non-finite check then treat like any gradient (one host sync per optimizer step for the
        scale)."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def _after_step(self) -> None:
        self._steps += 1
        sync = self._sync
        local_phase = self._steps > self.warmup_steps and not self._combines_gradients
        round_due = local_phase and (self._steps - self.warmup_steps) % self.local_steps == 0
        if round_due and self._pacer is not None and self._pace_window is not None:
            start, trained_before = self._pace_window
            self._pacer.observe(self._pace_clock() - start, self._trained_steps - trained_before)
        if sync is not None and not local_phase:
            self._handle_flags(self._all_reduce_flags(before_round=False))
            if self.average_buffers:
                sync.average_buffers_("warmup" if self._steps <= self.warmup_steps else "aggregate")
        if sync is not None and round_due:
            if self._overlapped is not None:
                self._handle_flags(self._overlapped.finish())
                self._overlapped.start(self._round, self._local_flags())
            else:
                flags = self._all_reduce_flags()
                self._handle_flags(flags)
                sync.gossip_round(self._round, refresh=sync.refresh_requested(flags))
            self._round += 1
        if round_due:
            for _, preconditioner in self._preconditioners:
                preconditioner.refresh()
        if self._pacer is not None:
            if round_due:
                self._pace_window = (self._pace_clock(), self._trained_steps)
            self._skipping = self._steps >= self.warmup_steps and not self._pacer.next_step_trains()
        if sync is None:
            return
        logged = {f"comm/{key}": float(value) for key, value in self._log_counters().items()}
        if self.consensus_interval and self._steps % self.consensus_interval == 0:
            logged["dopt/consensus_distance"] = sync.consensus_distance()
        self._log(logged, on_step=True, on_epoch=False)

    def _pace_clock(self) -> float:
        """Wall time for the pace windows; on GPU after the queued kernels finish (one stream synchronization per
        round), so a slow device is not mistaken for a fast host."""
        if self.root_device.type == "cuda":
            torch.cuda.current_stream(self.root_device).synchronize()
        return time.perf_counter()

    # ---------------------------------------------------- Lightning's own collectives, with failures named
    @contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        if self._comm is None:
            yield
        else:
            with self._comm.guarded(operation, "control", None):
                yield

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        with self._guard("barrier"):
            super().barrier(*args, **kwargs)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with self._guard("broadcast"):
            return super().broadcast(obj, src)

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        self._refuse_collective_in_skippable_step("reduce (LightningModule.log with sync_dist=True)")
        with self._guard("reduce (LightningModule.log with sync_dist)"):
            return super().reduce(tensor, *args, **kwargs)

    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        self._refuse_collective_in_skippable_step("all_gather")
        with self._guard("all_gather"):
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def _refuse_collective_in_skippable_step(self, operation: str) -> None:
        """With partial work a skipping rank does not run ``training_step``, so a collective there would meet a
        different collective (or none) on that rank: refuse it on the first call, which every rank makes (the
        first steps always train)."""
        module = self.lightning_module
        if self._pacer is not None and module is not None and module._current_fx_name == "training_step":
            raise RuntimeError(
                f"{operation} inside training_step cannot be combined with min_work < 1: a slow rank skips "
                "training_step on some steps and would not join it, deadlocking the ranks. Log per-step values "
                "without sync_dist (or with on_step=False, on_epoch=True), move the collective out of "
                "training_step, or use min_work=1.0")

    # ------------------------------------------------------------------ control: stop requests and NaN checks
    def _local_flags(self, before_round: bool = True) -> torch.Tensor:
        """``[sigterm_0..sigterm_{n-1}, nonfinite_0..nonfinite_{n-1}, pace_0..pace_{n-1}, noise_0..noise_{n-1}]``
        with this rank's four entries set (pace: seconds per trained step, :class:`~lightning_dopt.pacing.WorkPacer`,
        0 without one; noise, only for the flags that precede a round:
        :meth:`~lightning_dopt.rounds.ReplicaSync.noise_ratio`, which may make it an anchor refresh)."""
        assert self._sync is not None and self._comm is not None
        flags = torch.zeros(FLAG_BLOCKS, self.world_size, dtype=torch.float64, device=self._comm.device)
        flags[STOP_BLOCK, self.global_rank] = 2.0 if self._requeue else float(self._sigterm)
        flags[NONFINITE_BLOCK, self.global_rank] = float(not self._sync.is_finite())
        if before_round:
            flags[NOISE_BLOCK, self.global_rank] = self._sync.noise_ratio()
        if self._pacer is not None:
            flags[PACE_BLOCK, self.global_rank] = self._pacer.seconds_per_trained_step
        self._flags_step = self._steps
        return flags.view(-1)

    def _all_reduce_flags(self, before_round: bool = True) -> torch.Tensor:
        """Blocking check point: every rank learns every rank's flags (``4n`` float64, counted as ``control``)."""
        assert self._comm is not None
        flags = self._local_flags(before_round)
        self._comm.all_reduce_([flags], purpose="control", op="max")
        return flags

    def _handle_flags(self, flags: torch.Tensor | None) -> None:
        """Act on all-reduced flags, identically on every rank: raise on a non-finite replica, or request a stop
        at the next batch boundary when some rank received SIGTERM; then adapt this rank's work fraction to the
        ranks' pace."""
        if flags is None:
            return
        blocks = flags.view(FLAG_BLOCKS, -1).cpu().tolist()
        sigterm, nonfinite, paces = blocks[STOP_BLOCK], blocks[NONFINITE_BLOCK], blocks[PACE_BLOCK]
        bad = [rank for rank, value in enumerate(nonfinite) if value]
        if bad:
            names = ", ".join(map(str, bad))
            raise NonFiniteReplicaError(
                f"non-finite values (NaN or Inf) in the replica of rank{'s' if len(bad) > 1 else ''} {names} at "
                f"optimizer step {self._flags_step} (detected by the check before round {self._round}); every rank "
                "stopped before they reached a partner. Lower the learning rate, clip gradients "
                "(Trainer(gradient_clip_val=...)) or check the data; resume from the last checkpoint.")
        if any(sigterm) and not self._stop_requested:
            self._stop_requested = True
            self._sigterm_ranks = [rank for rank, value in enumerate(sigterm) if value]
            self._requeue_requested = max(sigterm) >= 2.0
        if self._pacer is not None:
            self._pacer.adapt(paces)

    def finish_rounds(self) -> None:
        """Wait for the background round in flight (``overlap=True``) and apply it; no communication otherwise. The
        strategy does this itself before evaluation, checkpoints and the end of fit; call it (on every rank at the
        same point) to start a timer or read the replicas after all communication has landed. With ``min_work < 1``
        the pace window in progress is then not measured (the interruption is not training work)."""
        self._drain()

    def _drain(self) -> None:
        """Finish and apply a background round in flight (before evaluation, checkpoints and the end of fit). The
        interruption is not training work: the pace window in progress is not measured."""
        self._pace_window = None
        if self._overlapped is not None:
            self._handle_flags(self._overlapped.finish())

    def _take_over_sigterm(self, trainer: Any) -> None:
        """Replace Lightning's per-batch SIGTERM broadcast (a global lock-step on every batch) by checks at rounds.

        The handler only records the signal (and forwards it to launched children, as Lightning's does); the flag
        travels with the next round's flags, and every rank stops at the same batch boundary (see
        :meth:`_stop_if_requested`)."""
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self._stop_if_requested
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)
        environment = self.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # Lightning saves the checkpoint inside its requeue-signal handler, wherever each rank happens to be: a
            # collective save would then meet a peer's round. Record the signal instead and save at a round.
            signal.signal(environment.requeue_signal or signal.SIGUSR1, self._on_requeue_signal)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._sigterm and self.launcher is not None:
            self.launcher.kill(signum)
        self._sigterm = True

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        rank_zero_info(f"lightning_dopt: requeue signal {signum} received; saving and requeueing at the next round")
        self._sigterm = self._requeue = True

    def _stop_if_requested(self) -> None:
        """At a batch boundary after a round that saw SIGTERM: write a checkpoint on every rank, then stop."""
        if not self._stop_requested:
            return
        trainer = self.lightning_module.trainer
        self._drain()
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        what = "the requeue signal" if self._requeue_requested else "SIGTERM"
        rank_zero_info(f"{what} received by rank(s) {', '.join(map(str, self._sigterm_ranks))}: every rank stopped "
                       f"after optimizer step {self._steps} (round {self._round}) and saved {path}. Resume with "
                       "trainer.fit(..., ckpt_path='hpc') (automatic under SLURM).")
        if self._requeue_requested and self.is_global_zero:
            _requeue_slurm_job()
        raise SIGTERMException()

    def _log_counters(self) -> dict[str, float]:
        stats = self.comm_stats
        return {"bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received, "rounds": stats.rounds,
                "seconds": stats.seconds}

    def _log(self, metrics: Mapping[str, float], on_step: bool, on_epoch: bool) -> None:
        module = self.lightning_module
        if module is None or module._current_fx_name is None:
            return
        # Step values come from rank 0 (no extra collective); epoch values are identical on every rank, and
        # sync_dist makes Lightning's epoch aggregation aware of that (one scalar all-reduce per epoch).
        module.log_dict(dict(metrics), on_step=on_step, on_epoch=on_epoch, batch_size=1,
                        rank_zero_only=not on_epoch, sync_dist=on_epoch)

    def on_train_end(self) -> None:
        """After fit every rank (and the spawn launcher's main process) holds the exact average."""
        super().on_train_end()
        if self._sync is not None:
            self._drain()
            self._sync.average_("final")
        if self._pacer is not None:
            self._report_partial_work()

    def _report_partial_work(self) -> None:
        """Tell (on rank 0) how many optimizer steps each rank skipped: one ``n``-float64 all-reduce."""
        assert self._comm is not None
        skipped = torch.zeros(self.world_size, dtype=torch.float64, device=self._comm.device)
        skipped[self.global_rank] = self._skipped_steps
        self._comm.all_reduce_([skipped], purpose="control", op="max")
        counts = ", ".join(f"rank {rank}: {int(value)}" for rank, value in enumerate(skipped.tolist()))
        rank_zero_info(f"lightning_dopt: optimizer steps skipped for partial work (min_work={self.min_work}) out of "
                       f"{self._steps - self._fit_first_step} in this fit: {counts}")

    # ------------------------------------------------------------------------------------- evaluation
    # Validation inside fit swaps the exact average in and the replica back out. Test, predict and standalone
    # validate are stages of their own: setup() broadcasts rank 0's weights, which are the average after fit
    # (every rank ends fit holding it) and after loading a checkpoint (the main file holds it).
    def _evaluating_on_average(self) -> bool:
        trainer = self.lightning_module.trainer
        return self._sync is not None and trainer.state.fn == TrainerFn.FITTING

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if not self._evaluating_on_average():
            return
        assert self._sync is not None
        self._drain()
        if self.eval_model == "average":
            distance = self._sync.swap_in_average("eval")
        else:
            distance = self._sync.consensus_distance("eval")
        self._log({"dopt/consensus_distance": distance}, on_step=False, on_epoch=True)

    def on_validation_end(self) -> None:
        if self._sync is not None and self._sync.swapped:
            self._sync.restore_local()
        super().on_validation_end()

    # ------------------------------------------------------------------------------------ checkpoints
    @contextmanager
    def _module_holding(self, replica: str) -> Iterator[None]:
        """Temporarily make the module hold ``replica`` ("average" or "local")."""
        sync = self._sync
        if sync is None:
            yield
        elif replica == "average" and not sync.swapped:
            sync.swap_in_average("checkpoint")
            try:
                yield
            finally:
                sync.restore_local()
        elif replica == "local" and sync.swapped:
            sync.toggle()
            try:
                yield
            finally:
                sync.toggle()
        else:
            yield

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The main checkpoint holds the exact average (collective: every rank runs it)."""
        self._drain()
        with self._module_holding("average"):
            return {key: value.clone() for key, value in self.lightning_module.state_dict().items()}

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
        self._drain()
        filepath, save_id = self.broadcast((str(filepath), uuid.uuid4().hex))
        checkpoint["lightning_dopt"] = {
            "world_size": self.world_size, "steps": self._steps, "round": self._round, "save_id": save_id,
            "topology": self.topology, "local_steps": self.local_steps,
        }
        with self._module_holding("local"):
            atomic_save(self._sidecar(save_id), sidecar_path(filepath, self.global_rank, save_id))
        self.barrier("lightning_dopt: sidecars written")
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        self.barrier("lightning_dopt: main file written")
        remove_other_saves(filepath, self.global_rank, keep_save_id=save_id)

    def _sidecar(self, save_id: str) -> dict[str, Any]:
        """This rank's round state (the module must hold the local replica)."""
        assert self._sync is not None
        return {
            "format": SIDECAR_FORMAT, "rank": self.global_rank, "world_size": self.world_size,
            "save_id": save_id, "state_dict": self.lightning_module.state_dict(),
            "optimizer_states": [optimizer.state_dict() for optimizer in self.optimizers],
            "comm_stats": self.comm_stats.state_dict(), "rng": _collect_rng_states(),
            "compression": self._sync.compression.state_dict() if self._sync.compression else None,
            "aggregation": {index: combiner.combiner.state_dict() for index, combiner in self._grad_combiners.items()},
            "pseudo_gradients": self._sync.pseudo_gradients.state_dict() if self._sync.pseudo_gradients else None,
            "scaling": [{"state": preconditioner.state_dict(),
                         "generator": getattr(preconditioner, "generator", None) and
                         preconditioner.generator.get_state()} for _, preconditioner in self._preconditioners],
            # each rank's gradient scaler skips (and so rescales) on its own: the main file holds rank 0's only
            "precision": self.precision_plugin.state_dict(),
        }

    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Every rank deletes its sidecars of ``filepath``; rank 0 then the main file and the empty directory."""
        remove_other_saves(filepath, self.global_rank, keep_save_id=None)
        if self._sync is not None:
            self.barrier("lightning_dopt: sidecars removed")
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_sidecar_dir_if_empty(filepath)

    def load_checkpoint(self, checkpoint_path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Read the main file and, when fitting on as many ranks as wrote it, this rank's sidecar.

        Validation, test and predict use the main file's averaged model."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        meta = checkpoint.get("lightning_dopt")
        if meta is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            self._restored = None
            return checkpoint
        self._restored = {"steps": int(meta["steps"]), "round": int(meta["round"]), "sidecar": None}
        if meta["world_size"] != self.world_size:
            rank_zero_warn(
                f"{checkpoint_path} was written by {meta['world_size']} ranks and is resumed on {self.world_size}: "
                "every rank starts from the averaged model with rank 0's optimizer state; per-rank replicas, "
                "optimizer states and RNG are not restored.")
            return checkpoint
        self._restored["sidecar"] = self._read_sidecar(checkpoint_path, meta["save_id"])
        return checkpoint

    def _read_sidecar(self, checkpoint_path: _PATH, save_id: str) -> dict[str, Any]:
        path = sidecar_path(checkpoint_path, self.global_rank, save_id)
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(
                f"rank {self.global_rank}: missing per-rank checkpoint file {path}. Resuming {checkpoint_path} "
                f"exactly needs every rank's file in the '{os.path.basename(str(checkpoint_path))}.dopt' directory "
                "next to it; copy it there, or load only the averaged weights with "
                "LightningModule.load_from_checkpoint.")
        try:
            fs = get_filesystem(path)
            with fs.open(path, "rb") as handle:
                sidecar = torch.load(handle, map_location="cpu", weights_only=False)
        except Exception as error:
            raise RuntimeError(f"rank {self.global_rank}: per-rank checkpoint file {path} is unreadable "
                               f"(truncated or corrupt): {error}") from error
        if sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("save_id") != save_id:
            raise RuntimeError(f"rank {self.global_rank}: {path} does not belong to {checkpoint_path} (it was "
                               "written by another save); refusing to mix replicas from different saves.")
        return sidecar

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        sidecar = self._restored.get("sidecar") if self._restored else None
        if sidecar is None:
            return super().load_model_state_dict(checkpoint, strict=strict)
        self.lightning_module.load_state_dict(sidecar["state_dict"], strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        sidecar = self._restored.get("sidecar") if self._restored else None
        super().load_optimizer_state_dict(checkpoint if sidecar is None else sidecar)

    def on_exception(self, exception: BaseException) -> None:
        """Tell the peers why this rank is failing (they name it in their own error), and give up any round in
        flight without applying it."""
        if self._comm is not None and self._comm.liveness is not None and not isinstance(exception, PeerFailure):
            self._comm.liveness.report_error(f"{type(exception).__name__}: {exception}")
        if self._overlapped is not None:
            self._overlapped.abandon()
        super().on_exception(exception)

    def teardown(self) -> None:
        if self._overlapped is not None:
            self._overlapped.abandon()
            self._overlapped = None
        if self._comm is not None and self._comm.liveness is not None:
            self._comm.liveness.stop()
        self._sync = None
        self._grad_averagers = {}
        super().teardown()

    # ----------------------------------------------------------------------------------- registration
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        presets = {
            "gossip_local": ({}, "local steps + random pairwise gossip"),
            "gossip_local_spawn": ({"start_method": "spawn"}, "gossip_local with the spawn launcher"),
            "local_sgd": ({"topology": "complete"}, "local steps + exact all-reduce averaging (Local SGD)"),
            "local_sgd_spawn": ({"topology": "complete", "start_method": "spawn"},
                                "local_sgd with the spawn launcher"),
            "adacons": ({"topology": "complete", "aggregation": "adacons"},
                        "synchronous training with AdaCons gradient aggregation"),
            "adacons_spawn": ({"topology": "complete", "aggregation": "adacons", "start_method": "spawn"},
                              "adacons with the spawn launcher"),
        }
        for name, (init_params, description) in presets.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"lightning_dopt: {description}", **init_params)


__all__ = ["AGGREGATIONS", "GossipLocalStrategy", "EVAL_MODELS", "TOPOLOGIES", "sidecar_path"]
