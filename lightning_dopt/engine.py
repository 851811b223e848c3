"""The engine: one rank's side of the algorithm, driven by a training loop through a few calls. No Lightning.

A training loop (the Lightning adapters in :mod:`lightning_dopt.strategy` and :mod:`lightning_dopt.simulation`, or
a plain loop) calls, per optimizer step::

    closure = engine.wrap_closure(index, params, closure, ...)   # gradients: warm-up mean, AdaCons, D⁻¹ g
    optimizer.step(closure)                                       # (skipped while engine.skipping: partial work)
    logged = engine.after_step()                                  # schedule: flags, rounds, pacing; metrics to log

and :meth:`Engine.drain` before it reads or writes the replica (evaluation, checkpoints), :meth:`Engine.finish_fit` at
the end. The engine owns the step and round counters, the schedule (warm-up, then a round every ``local_steps``
steps), the control flags that travel before each round (stop requests, non-finite replicas, paces, compression
noise), the pacing windows and the overlapped round in flight. The algorithms themselves are objects it composes,
each with its own state: the round (:class:`~lightning_dopt.replica.ReplicaSync` and its codec or pseudo-gradient
rounds), the gradient combiners (:mod:`lightning_dopt.gradients`), the preconditioners (:mod:`lightning_dopt.scaling`)
and the pacer (:mod:`lightning_dopt.pacing`). :meth:`Engine.state_dict` is the dict of their states: what a
per-rank sidecar checkpoint holds besides the replica and the optimizer.

Communication per round: the round's bytes plus ``2(n−1)/n · 32n`` bytes of flags (``4n`` float64, all-reduced).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dopt.comm import CommStats, PeerFailure
from lightning_dopt.gradients import AdaConsCombiner, AdaConsGradients, GradientAverager
from lightning_dopt.hierarchy import NodeComms
from lightning_dopt.options import Options
from lightning_dopt.pacing import WorkPacer
from lightning_dopt.replica import ReplicaSync, ReplicaTensors
from lightning_dopt.rounds import FLAG_BLOCKS, NOISE_BLOCK, NONFINITE_BLOCK, PACE_BLOCK, STOP_BLOCK, OverlappedRounds
from lightning_dopt.scaling import (OASISScaling, Preconditioner, all_finite, capture_rng_state, make_preconditioner,
                                    replayed_closure_hvp)

Closure = Callable[[], Any]


class NonFiniteReplicaError(FloatingPointError):
    """A replica holds NaN or Inf at a round; raised on every rank before the values reach a partner."""


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of every group of ``optimizer``, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def build_preconditioners(options: Options, optimizer_params: Sequence[Sequence[Tensor]], rank: int,
                          device: torch.device) -> list[tuple[list[Tensor], Preconditioner]]:
    """One frozen-between-rounds diagonal preconditioner per optimizer (``scaling``), or none. OASIS probes draw from
    a generator seeded by ``(seed, optimizer, rank)``."""
    if options.scaling is None:
        return []
    preconditioners = []
    for index, params in enumerate(optimizer_params):
        trainable = [p for p in params if p.requires_grad]
        generator = torch.Generator(device=device).manual_seed(options.seed * 65_537 + 1_000 * index + rank)
        preconditioners.append((trainable, make_preconditioner(
            options.scaling, trainable, beta=options.scaling_beta, eps=options.scaling_eps,
            alpha_min=options.scaling_alpha_min, generator=generator, relative_floor=options.scaling_floor)))
    return preconditioners


def build_sync(options: Options, module: nn.Module | ReplicaTensors, comm: Any,
               preconditioners: Sequence[tuple[list[Tensor], Preconditioner]],
               node: NodeComms | None = None) -> ReplicaSync:
    """The round object for ``options``: gossip/all-reduce, anchored compression, or pseudo-gradient rounds (AdaCons
    or an outer optimizer), with the preconditioners' statistics travelling in each round; under
    ``hierarchy="node"`` (``node`` given) split across the node's ranks and run between nodes."""
    combiner = None
    if options.aggregation == "adacons" and options.local_steps > 1:  # AdaCons on pseudo-gradients at rounds
        replica = module if isinstance(module, ReplicaTensors) else ReplicaTensors.of(module)
        sizes = [p.numel() for p in replica.params if p.is_floating_point()]
        combiner = AdaConsCombiner(comm, sizes if options.adacons_layerwise else None, options.adacons_momentum,
                                   options.adacons_guard, preserve_scale=True, stale_weights=False, purpose="round")
    return ReplicaSync(module, comm, options.topology, options.seed, options.average_buffers, codec=options.codec,
                       anchor_interval=options.anchor_interval, anchor_tolerance=options.anchor_tolerance,
                       round_combiner=combiner, outer_optimizer=options.outer_factory,
                       statistics=[preconditioner for _, preconditioner in preconditioners], node=node)


def build_engine(options: Options, module: nn.Module | ReplicaTensors, optimizer_params: Sequence[Sequence[Tensor]],
                 comm: Any | None, rank: int, device: torch.device, steps: int = 0, round_index: int = 0,
                 background: Callable[[], Any] | None = None, timeout: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, node: NodeComms | None = None,
                 node_background: Callable[[], NodeComms] | None = None) -> Engine:
    """The engine of one rank: preconditioners for ``optimizer_params`` (one list per optimizer; none outside fit), the
    round object over ``module`` on ``comm`` (``None``: a single rank, no communication), with ``overlap`` a
    background communicator from ``background()`` whose rounds are waited for at most ``timeout`` seconds, and
    under ``hierarchy="node"`` the node's and the cross-node communicators (``node``; with ``overlap``, a second
    pair from ``node_background()`` for the background rounds)."""
    if (options.hierarchy == "node") != (node is not None and comm is not None):
        raise ValueError(f"hierarchy={options.hierarchy!r} needs node communicators exactly when it is 'node' and "
                         f"there is more than one rank; got node={node!r}")
    preconditioners = build_preconditioners(options, optimizer_params, rank, device)
    sync = build_sync(options, module, comm, preconditioners, node) if comm is not None else None
    overlap = None
    if sync is not None and options.overlap and background is not None:
        if node is not None and node_background is None:
            raise ValueError("overlap with hierarchy='node' needs node_background: the background round's node and "
                             "cross-node communicators")
        overlap = (background(), timeout, node_background() if node is not None else None)
    return Engine(options, sync, preconditioners, rank, steps, round_index, overlap, clock)


def device_clock(device: torch.device) -> Callable[[], float]:
    """Wall time for the pace windows; on GPU after the queued kernels finish (one stream synchronization per round),
    so a slow device is not mistaken for a fast host."""
    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return time.perf_counter()

    return clock


def _then(closure: Closure, work: Callable[[float | None], None], loss_scale: float | None) -> Closure:
    """``closure`` followed by ``work(loss_scale)`` on the gradients it left (before clipping and the update)."""
    def wrapped() -> Any:
        output = closure()
        work(loss_scale)
        return output

    return wrapped


class Engine:
    """One rank's schedule, control flags and algorithm objects (see the module docstring).

    Args:
        options: the algorithm options.
        sync: the round object over this rank's module, or ``None`` on a single rank (no communication).
        preconditioners: from :func:`build_preconditioners`, one per optimizer (empty without ``scaling``).
        rank: this rank's index among ``world_size``.
        steps, round_index: counters to start from (a resumed fit's).
        overlap_comm: a communicator of its own for the background round (``overlap=True``), the bound in
            seconds on waiting for it, and under ``hierarchy="node"`` the background round's node communicators.
        clock: wall time for the pace windows (``min_work < 1``).
    """

    def __init__(self, options: Options, sync: ReplicaSync | None,
                 preconditioners: Sequence[tuple[list[Tensor], Preconditioner]] = (), rank: int = 0,
                 steps: int = 0, round_index: int = 0,
                 overlap_comm: tuple[Any, float | None, NodeComms | None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.options = options
        self.sync = sync
        self.comm = sync.comm if sync is not None else None
        self.node: NodeComms | None = sync.node if sync is not None else None
        self.world_size = self.comm.world_size if self.comm is not None else 1
        self.rank = rank
        self.preconditioners = list(preconditioners)
        self.steps = steps
        self.round = round_index
        self.fit_first_step = steps
        self.overlapped = OverlappedRounds(sync, *overlap_comm) if sync is not None and overlap_comm else None
        self.pacer = WorkPacer(options.min_work) if sync is not None and options.min_work < 1.0 else None
        self.clock = clock
        self.skipping = False  # the next optimizer step (all its micro-batches) is skipped (partial work)
        self.skipped_steps = 0
        self._pace_window: tuple[float, int] | None = None  # (start time, trained steps) of the window measured
        self._grad_averagers: dict[tuple[int, bool], GradientAverager] = {}
        self._grad_combiners: dict[int, AdaConsGradients] = {}
        self._restored_combiners: dict[int, dict[str, Any]] = {}
        # stop requests: set by the training loop's signal handlers, learned by every rank through the flags
        self.sigterm = False
        self.requeue = False
        self.stop_requested = False
        self.requeue_requested = False
        self.stop_ranks: list[int] = []
        self._flags_step = 0

    @property
    def comm_stats(self) -> CommStats:
        return self.comm.stats if self.comm is not None else CommStats()

    @property
    def trained_steps(self) -> int:
        return self.steps - self.skipped_steps

    # ----------------------------------------------------------------------------------------- gradients
    def wrap_closure(self, index: int, params: Sequence[Tensor], closure: Closure, raw_closure: Closure | None = None,
                     loss_scale: float | None = None, buffers: Sequence[Tensor] = (),
                     device: torch.device | None = None) -> Closure:
        """``closure`` (forward and backward of optimizer ``index`` over ``params``) wrapped so that the gradients it
        leaves are those of the algorithm, before clipping and the update: the mean over ranks during warm-up,
        the AdaCons combination (synchronous AdaCons), then ``D⁻¹ g`` (scaling).

        ``loss_scale``: the gradient scaler's current scale ``S`` under fp16 AMP (the gradients are ``S · g``): every
        wrapper acts on ``g`` and hands back ``S ×`` its result. ``raw_closure`` (OASIS probes; Lightning's closure
        object, whose ``closure()`` re-runs the step without replacing its result), ``buffers`` (restored after the
        probes) and ``device`` (whose generator the probes replay)."""
        if self.comm is not None and self.steps < self.options.warmup_steps:
            closure = _then(closure, self._averager(index, params).average_, loss_scale)
        elif self.comm is not None and self.options.combines_gradients:
            closure = _then(closure, self._combiner(index, params).combine_, loss_scale)
        elif self.node is not None:
            closure = _then(closure, self._averager(index, params, self.node.node).average_, loss_scale)
        if self.preconditioners:
            closure = self._scaling(index, closure, raw_closure or closure, loss_scale, buffers,
                                    device or torch.device("cpu"))
        return closure

    @property
    def wraps_gradients(self) -> bool:
        """Whether this step's gradients need work before the update (:meth:`wrap_closure` changes the closure)."""
        averages = self.comm is not None and (self.steps < self.options.warmup_steps or self.options.combines_gradients)
        return averages or self.node is not None or bool(self.preconditioners)

    def _averager(self, index: int, params: Sequence[Tensor], comm: Any = None) -> GradientAverager:
        """The gradient mean over all ranks (warm-up), or over the node's ranks when ``comm`` is the node's."""
        key = (index, comm is not None)
        if key not in self._grad_averagers:
            self._grad_averagers[key] = GradientAverager(params, comm or self.comm,
                                                         purpose="warmup" if comm is None else "node")
        return self._grad_averagers[key]

    def _combiner(self, index: int, params: Sequence[Tensor]) -> AdaConsGradients:
        if index not in self._grad_combiners:
            options = self.options
            combiner = AdaConsGradients(params, self.comm, momentum=options.adacons_momentum,
                                        layerwise=options.adacons_layerwise, guard=options.adacons_guard,
                                        preserve_scale=options.preserve_scale, stale_weights=options.stale_weights)
            pending = self._restored_combiners.pop(index, None)
            if pending is not None:
                combiner.combiner.load_state_dict(pending)
            self._grad_combiners[index] = combiner
        return self._grad_combiners[index]

    def _scaling(self, index: int, closure: Closure, raw_closure: Closure, loss_scale: float | None,
                 buffers: Sequence[Tensor], device: torch.device) -> Closure:
        params, preconditioner = self.preconditioners[index]

        def scaled_closure() -> Any:
            rng_state = capture_rng_state(device) if isinstance(preconditioner, OASISScaling) else None
            output = closure()
            grads = [p.grad for p in params]
            if rng_state is not None:
                probe = getattr(raw_closure, "closure", raw_closure)
                preconditioner.accumulate_hutchinson(
                    lambda vectors: replayed_closure_hvp(probe, params, vectors, rng_state, list(buffers)))
            elif loss_scale is None:
                preconditioner.accumulate(grads)
            elif all_finite(grads):  # the scaler skips this step otherwise: its gradients are not accumulated
                preconditioner.accumulate(grads, loss_scale=loss_scale)
            preconditioner.apply_(grads)  # linear: dividing the scaled gradient by D scales the unscaled one
            return output

        return scaled_closure

    # ------------------------------------------------------------------------------------------ schedule
    def skip_step(self) -> None:
        """This step was skipped for partial work (the optimizer did not run); count it like a trained one."""
        self.skipped_steps += 1

    def after_step(self) -> dict[str, float]:
        """After every optimizer step (trained or skipped): control flags, the round when one is due, the
        preconditioner refresh, the pace, and whether the next step trains. Returns the metrics to log this step."""
        self.steps += 1
        options, sync = self.options, self.sync
        local_phase = self.steps > options.warmup_steps and not options.combines_gradients
        round_due = local_phase and (self.steps - options.warmup_steps) % options.local_steps == 0
        if round_due and self.pacer is not None and self._pace_window is not None:
            start, trained_before = self._pace_window
            self.pacer.observe(self.clock() - start, self.trained_steps - trained_before)
        if sync is not None and not local_phase:
            self.handle_flags(self.all_reduce_flags(before_round=False))
            if options.average_buffers:
                sync.average_buffers_("warmup" if self.steps <= options.warmup_steps else "aggregate")
        elif self.node is not None and options.average_buffers:  # the node's ranks stay one replica
            sync.average_buffers_("node", self.node.node)
        if sync is not None and round_due:
            if self.overlapped is not None:
                self.handle_flags(self.overlapped.finish())
                self.overlapped.start(self.round, self.local_flags())
            else:
                flags = self.all_reduce_flags()
                self.handle_flags(flags)
                sync.gossip_round(self.round, refresh=sync.refresh_requested(flags))
            self.round += 1
        if round_due:
            for _, preconditioner in self.preconditioners:
                preconditioner.refresh()
        if self.pacer is not None:
            if round_due:
                self._pace_window = (self.clock(), self.trained_steps)
            self.skipping = self.steps >= options.warmup_steps and not self.pacer.next_step_trains()
        if sync is None:
            return {}
        stats = self.comm_stats
        logged = {"comm/bytes_sent": float(stats.bytes_sent), "comm/bytes_received": float(stats.bytes_received),
                  "comm/rounds": float(stats.rounds), "comm/seconds": float(stats.seconds)}
        if options.consensus_interval and self.steps % options.consensus_interval == 0:
            logged["dopt/consensus_distance"] = sync.consensus_distance()
        return logged

    def start_fit(self) -> None:
        """At the start of training: forget stop requests and the pace window of a previous fit."""
        self.sigterm = self.stop_requested = self.requeue = self.requeue_requested = False
        self._pace_window = None  # the first window (start-up) is not measured

    def drain(self) -> None:
        """Finish and apply a background round in flight (before evaluation, checkpoints and the end of fit). The
        interruption is not training work: the pace window in progress is not measured."""
        self._pace_window = None
        if self.overlapped is not None:
            self.handle_flags(self.overlapped.finish())

    def finish_fit(self) -> None:
        """After the last step: drain, then every rank takes the exact average."""
        if self.sync is not None:
            self.drain()
            self.sync.average_("final")

    def abandon(self) -> None:
        """Give up a background round in flight without applying it (after an error)."""
        if self.overlapped is not None:
            self.overlapped.abandon()

    def fail(self, error: BaseException) -> None:
        """This rank is failing: tell the peers why (they name it in their own error, through the heartbeats; not for a
        failure a peer caused) and give up the round in flight."""
        liveness = getattr(self.comm, "liveness", None)
        if liveness is not None and not isinstance(error, PeerFailure):
            liveness.report_error(f"{type(error).__name__}: {error}")
        self.abandon()

    def close(self) -> None:
        """The end of a stage: stop the heartbeats and release the round's and the gradient combiners' buffers
        (counters stay readable)."""
        self.abandon()
        liveness = getattr(self.comm, "liveness", None)
        if liveness is not None:
            liveness.stop()
        self.sync = self.overlapped = None
        self._grad_averagers, self._grad_combiners = {}, {}

    def partial_work_report(self) -> str:
        """How many optimizer steps each rank skipped in this fit (one ``n``-float64 all-reduce; collective)."""
        assert self.comm is not None
        skipped = torch.zeros(self.world_size, dtype=torch.float64, device=self.comm.device)
        skipped[self.rank] = self.skipped_steps
        self.comm.all_reduce_([skipped], purpose="control", op="max")
        counts = ", ".join(f"rank {rank}: {int(value)}" for rank, value in enumerate(skipped.tolist()))
        return (f"lightning_dopt: optimizer steps skipped for partial work (min_work={self.options.min_work}) out of "
                f"{self.steps - self.fit_first_step} in this fit: {counts}")

    def check_equal_batches(self, batches: float, max_steps: int = -1) -> None:
        """Ranks that run different numbers of batches per epoch would deadlock at a round: fail early instead (one
        2-float64 all-reduce; collective). ``batches`` is infinite for data without a length, which needs a
        ``max_steps`` (``-1``: none)."""
        assert self.comm is not None
        if not math.isfinite(batches):
            if max_steps == -1:
                raise RuntimeError(
                    "the training data has no length (e.g. an IterableDataset without __len__), so ranks may run "
                    "different numbers of training batches per epoch (uneven data) and deadlock at a round. Set "
                    "Trainer(max_steps=...) and give every rank a stream at least that long, or give the dataset a "
                    "__len__ that is the same on every rank.")
            return
        bounds = torch.tensor([batches, -batches], dtype=torch.float64, device=self.comm.device)
        self.comm.all_reduce_([bounds], purpose="control", op="max")
        most, fewest = int(bounds[0].item()), int(-bounds[1].item())
        if most != fewest:
            raise RuntimeError(
                f"ranks have different numbers of training batches per epoch (between {fewest} and {most}; "
                f"rank {self.rank} has {int(batches)}). Every rank must take the same optimizer steps, or "
                "the synchronization rounds deadlock. Use Lightning's DistributedSampler (the default), give every "
                "rank equally long data, or set limit_train_batches / max_steps.")

    # ---------------------------------------------------------------------------------------- control flags
    def local_flags(self, before_round: bool = True) -> Tensor:
        """``[stop_0..stop_{n-1}, nonfinite_0..nonfinite_{n-1}, pace_0..pace_{n-1}, noise_0..noise_{n-1}]``
        with this rank's four entries set (stop: 1 for SIGTERM, 2 for a requeue signal; pace: seconds per trained
        step, :class:`~lightning_dopt.pacing.WorkPacer`, 0 without one; noise, only for the flags that precede a
        round: :meth:`~lightning_dopt.replica.ReplicaSync.noise_ratio`, which may make it an anchor refresh)."""
        assert self.sync is not None and self.comm is not None
        flags = torch.zeros(FLAG_BLOCKS, self.world_size, dtype=torch.float64, device=self.comm.device)
        flags[STOP_BLOCK, self.rank] = 2.0 if self.requeue else float(self.sigterm)
        flags[NONFINITE_BLOCK, self.rank] = float(not self.sync.is_finite())
        if before_round:
            flags[NOISE_BLOCK, self.rank] = self.sync.noise_ratio()
        if self.pacer is not None:
            flags[PACE_BLOCK, self.rank] = self.pacer.seconds_per_trained_step
        self._flags_step = self.steps
        return flags.view(-1)

    def all_reduce_flags(self, before_round: bool = True) -> Tensor:
        """Blocking check point: every rank learns every rank's flags (``4n`` float64, counted as ``control``)."""
        assert self.comm is not None
        flags = self.local_flags(before_round)
        self.comm.all_reduce_([flags], purpose="control", op="max")
        return flags

    def handle_flags(self, flags: Tensor | None) -> None:
        """Act on all-reduced flags, identically on every rank: raise on a non-finite replica, or request a stop
        at the next batch boundary when some rank asked for one; then adapt this rank's work fraction to the
        ranks' pace."""
        if flags is None:
            return
        blocks = flags.view(FLAG_BLOCKS, -1).cpu().tolist()
        stops, nonfinite, paces = blocks[STOP_BLOCK], blocks[NONFINITE_BLOCK], blocks[PACE_BLOCK]
        bad = [rank for rank, value in enumerate(nonfinite) if value]
        if bad:
            names = ", ".join(map(str, bad))
            raise NonFiniteReplicaError(
                f"non-finite values (NaN or Inf) in the replica of rank{'s' if len(bad) > 1 else ''} {names} at "
                f"optimizer step {self._flags_step} (detected by the check before round {self.round}); every rank "
                "stopped before they reached a partner. Lower the learning rate, clip gradients "
                "(Trainer(gradient_clip_val=...)) or check the data; resume from the last checkpoint.")
        if any(stops) and not self.stop_requested:
            self.stop_requested = True
            self.stop_ranks = [rank for rank, value in enumerate(stops) if value]
            self.requeue_requested = max(stops) >= 2.0
        if self.pacer is not None:
            self.pacer.adapt(paces)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The algorithm objects' states (the replica and the optimizers are the training loop's)."""
        sync = self.sync
        return {
            "comm_stats": self.comm_stats.state_dict(),
            "round": sync.round.state_dict() if sync is not None else None,
            "aggregation": {index: combiner.combiner.state_dict() for index, combiner in self._grad_combiners.items()},
            "scaling": [{"state": preconditioner.state_dict(),
                         "generator": getattr(preconditioner, "generator", None) and
                         preconditioner.generator.get_state()} for _, preconditioner in self.preconditioners],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the replica itself was restored)."""
        sync = self.sync
        if self.comm is not None and state.get("comm_stats"):
            self.comm.stats.load_state_dict(state["comm_stats"])
        if sync is not None:
            sync.round.load_state_dict(state["round"])
        for (_, preconditioner), saved in zip(self.preconditioners, state.get("scaling") or []):
            preconditioner.load_state_dict(saved["state"])
            if isinstance(preconditioner, OASISScaling) and preconditioner.generator is not None:
                preconditioner.generator.set_state(saved["generator"])
        self._restored_combiners = dict(state.get("aggregation") or {})
