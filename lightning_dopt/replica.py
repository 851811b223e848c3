"""A rank's replica and what happens to it as a whole. Rounds themselves are :mod:`lightning_dopt.rounds`.

A rank's *replica state* is every floating-point parameter and (by default) every persistent floating-point buffer
of the module, e.g. BatchNorm running statistics; integer buffers (``num_batches_tracked``) are *counters*.
Non-persistent buffers (``register_buffer(..., persistent=False)``: constants such as a sinusoidal position table,
left out of ``state_dict``) are neither sent nor averaged. Let ``x_i`` be rank ``i``'s replica state flattened,
``x̄ = (1/n) Σ_i x_i`` the consensus model and ``P`` the state's size in bytes.

* :meth:`ReplicaSync.gossip_round` runs one round of the :class:`~lightning_dopt.rounds.Round` that
  :func:`make_round` chose for the options, on the packed round state (replica plus mixed statistics).
* :meth:`ReplicaSync.average_` sets every replica to ``x̄`` (all-reduce) and counters to their maximum;
  :meth:`ReplicaSync.average_buffers_` does it for the floating-point buffers alone.
* :meth:`ReplicaSync.swap_in_average` / :meth:`ReplicaSync.restore_local` put ``x̄`` into the module for
  evaluation or export and put the local replica back afterwards, returning the consensus distance
  ``mean_i ||x_i − x̄||² / ||x̄||²`` (one extra 8-byte all-reduce).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_dopt.comm import FlatState, is_narrow_float
from lightning_dopt.compress import Codec, finite_flag
from lightning_dopt.compressed_rounds import (AnchoredCompression, CompressedGossipOuterRound, CompressedOuterRound,
                                             CompressedRound)
from lightning_dopt.gradients import AdaConsCombiner
from lightning_dopt.hierarchy import NodeComms, NodeSplitRound, shard_bounds, shard_views
from lightning_dopt.rounds import (
    AllReduceRound,
    GossipOuterRound,
    GossipRound,
    OuterOptimizerFactory,
    PseudoGradientRound,
    Round,
)


def _is_averaged(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def persistent_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers of ``module`` that no submodule registered as non-persistent, in ``module.buffers()`` order, each
    once (the buffers ``state_dict`` holds, unless one tensor is registered both ways)."""
    non_persistent = {id(buffer) for sub in module.modules() for name, buffer in sub._buffers.items()
                      if buffer is not None and name in sub._non_persistent_buffers_set}
    return [buffer for buffer in module.buffers() if id(buffer) not in non_persistent]


class ReplicaTensors:
    """The tensors of one replica that rounds read and write, in the module's order: its parameters, its buffers, and
    which of those buffers are persistent (in ``state_dict``). :meth:`of` takes a module's own; a simulated worker
    holds copies of them (:mod:`lightning_dopt.simulation`)."""

    def __init__(self, params: Sequence[Tensor], buffers: Sequence[Tensor], persistent: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.buffers = list(buffers)
        self.persistent = list(persistent)

    @classmethod
    def of(cls, module: nn.Module) -> ReplicaTensors:
        return cls(list(module.parameters()), list(module.buffers()), persistent_buffers(module))


class MixedStatistics(Protocol):
    """State that travels with the replica in every round and is mixed with the same weights, e.g. a
    preconditioner's statistics (:class:`~lightning_dopt.scaling.Preconditioner`). It keeps changing between rounds
    by a decay: after ``k`` updates since :meth:`mark` its value is ``decay_since_mark() · (value at the mark) + new``,
    which lets a round applied late (:class:`OverlappedRounds`) put the mixed value where it belongs."""

    def mixed_state(self) -> list[Tensor]:
        """The live tensors to mix (fixed list, the same shapes on every rank)."""

    def mark(self) -> None:
        """Start measuring the decay (called when a round's snapshot is taken)."""

    def decay_since_mark(self) -> float:
        """The factor by which the values held at :meth:`mark` have been scaled since."""


class RoundState:
    """The tensors a round mixes, as flat buffers: the replica state's, then those of the statistics that travel with
    it. The two parts have buffers of their own (never one buffer across both), so each can be encoded its own way
    and a late round can scale the statistics' part (:meth:`add_`)."""

    def __init__(self, replica: FlatState, statistics: FlatState) -> None:
        self.replica = replica
        self.statistics = statistics

    @property
    def tensors(self) -> list[Tensor]:
        return self.replica.tensors + self.statistics.tensors

    def new_buffers(self) -> list[Tensor]:
        return self.replica.new_buffers() + self.statistics.new_buffers()

    def split(self, buffers: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``buffers`` as (the replica's buffers, the statistics' buffers)."""
        count = self.replica.group_count
        return list(buffers[:count]), list(buffers[count:])

    def pack(self, into: Sequence[Tensor]) -> Sequence[Tensor]:
        replica, statistics = self.split(into)
        self.replica.pack(replica)
        self.statistics.pack(statistics)
        return into

    def unpack(self, source: Sequence[Tensor]) -> None:
        replica, statistics = self.split(source)
        self.replica.unpack(replica)
        self.statistics.unpack(statistics)

    def add_(self, delta: Sequence[Tensor], statistics_scales: Sequence[float]) -> None:
        """``x ← x + δ`` for the replica and ``v_k ← v_k + scales[k] · δ_k`` for each statistics tensor (``delta`` is
        scaled in place)."""
        replica, statistics = self.split(delta)
        self.replica.add_(replica)
        self.statistics.add_(statistics, statistics_scales)


def make_round(state: RoundState, replica: ReplicaTensors, comm: Any, topology: str, seed: int,
               codec: Codec | None = None, anchor_interval: int = 16, anchor_tolerance: float | None = None,
               combiner: AdaConsCombiner | None = None, outer_optimizer: OuterOptimizerFactory | None = None) -> Round:
    """The round object for these options: the one place that maps options to a round algorithm.

    an outer optimizer over a graph topology (uncompressed) → :class:`GossipOuterRound`;
    an outer optimizer with a codec over a graph topology →
    :class:`~lightning_dopt.compressed_rounds.CompressedGossipOuterRound`;
    an outer optimizer with a codec (``complete``) → :class:`~lightning_dopt.compressed_rounds.CompressedOuterRound`;
    pseudo-gradients (AdaCons weights or an outer optimizer; ``complete``, uncompressed) → :class:`PseudoGradientRound`;
    a codec → :class:`~lightning_dopt.compressed_rounds.CompressedRound`; ``complete`` → :class:`AllReduceRound`;
    any other topology → :class:`GossipRound`."""
    if outer_optimizer is not None and combiner is None and codec is None and topology != "complete":
        params = {id(p) for p in replica.params}
        buffers = [tensor for tensor in state.replica.tensors if id(tensor) not in params]
        return GossipOuterRound(replica, buffers, topology, seed, outer_optimizer)
    if outer_optimizer is not None and combiner is None and codec is not None:
        params = [p for p in replica.params if p.is_floating_point()]
        if topology == "complete":
            return CompressedOuterRound(state, params, comm, seed, codec, outer_optimizer)
        return CompressedGossipOuterRound(state, params, comm, topology, seed, codec, outer_optimizer, anchor_interval)
    if combiner is not None or outer_optimizer is not None:
        if codec is not None or topology != "complete":
            raise ValueError("AdaCons rounds combine the pseudo-gradients of all ranks (topology='complete'), and "
                             "outer optimizers step on exact pseudo-gradients (compression=None)")
        return PseudoGradientRound(replica, comm, combiner, outer_optimizer)
    if codec is not None:
        return CompressedRound(state, comm, topology, seed, codec, anchor_interval, anchor_tolerance)
    if topology == "complete":
        return AllReduceRound()
    return GossipRound(state, topology, seed)


class ReplicaSync:
    """One rank's replica and what happens to it as a whole: the common start, rounds (delegated to a :class:`Round`
    built by :func:`make_round` from the options), exact averages, evaluation swaps, the consensus distance.

    Buffers are allocated once here (outside any inference-mode context, so they stay writable).
    Memory: two copies of the replica state, plus the round's own buffers.
    """

    def __init__(self, module: nn.Module | ReplicaTensors, comm: Any, topology: str, seed: int,
                 average_buffers: bool = True, codec: Codec | None = None, anchor_interval: int = 16,
                 anchor_tolerance: float | None = None, round_combiner: AdaConsCombiner | None = None,
                 outer_optimizer: OuterOptimizerFactory | None = None,
                 statistics: Sequence[MixedStatistics] = (), node: NodeComms | None = None) -> None:
        replica = module if isinstance(module, ReplicaTensors) else ReplicaTensors.of(module)
        buffers = replica.persistent
        averaged = [p for p in replica.params if _is_averaged(p)]
        if average_buffers:
            averaged += [b for b in buffers if _is_averaged(b)]
        self.state = FlatState(averaged)
        self.float_buffers = FlatState([b for b in buffers if _is_averaged(b)])
        self.counters = FlatState([b for b in buffers if not _is_averaged(b)])
        self.everything = FlatState(replica.params + replica.buffers)
        self.comm = comm
        self._work = self.state.new_buffers()
        self._backup = self.state.new_buffers()
        # Rounds mix the replica state plus the ``statistics`` (e.g. preconditioner statistics) in the same exchange;
        # evaluation, exact averages and the consensus distance concern the replica state alone.
        self.statistics = list(statistics)
        self.extra = FlatState([tensor for part in self.statistics for tensor in part.mixed_state()])
        self.round_state = RoundState(self.state, self.extra)
        self._round_work = self.round_state.new_buffers() if self.extra.tensors else self._work
        self.swapped = False
        self._toggled = False
        # hierarchy="node": the round runs between nodes on this rank's shard (lightning_dopt.hierarchy)
        self.node = node
        self.round_comm: Any = comm if node is None else node
        if node is None:
            self.round = make_round(self.round_state, replica, comm, topology, seed, codec, anchor_interval,
                                    anchor_tolerance, round_combiner, outer_optimizer)
        else:
            part, parts = node.local_rank, node.local_world_size
            shard = RoundState(FlatState(shard_views(self.state, part, parts)),
                               FlatState(shard_views(self.extra, part, parts)))
            inner = make_round(shard, replica, node.cross, topology, seed, codec, anchor_interval, anchor_tolerance,
                               round_combiner, outer_optimizer)
            bounds = [[shard_bounds(buffer.numel(), parts)[k] for buffer in self._round_work] for k in range(parts)]
            self.round = NodeSplitRound(inner, bounds, part)

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Give every rank the source rank's parameters and buffers (all dtypes): the common start.
        With compression, the common start is also the first anchor."""
        buffers = self.everything.pack(self.everything.new_buffers())
        self.comm.broadcast_(buffers, src=src, purpose="start")
        self.everything.unpack(buffers)
        self.round.reset_anchor_()

    @property
    def compression(self) -> AnchoredCompression | None:
        """The replica's anchored compression (``None`` for uncompressed rounds)."""
        return self.round.compression if isinstance(self.round, CompressedRound) else None

    @property
    def pseudo_gradients(self) -> PseudoGradientRound | None:
        """The pseudo-gradient round (AdaCons rounds, outer optimizer), ``None`` for the other rounds."""
        return self.round if isinstance(self.round, PseudoGradientRound) else None

    def noise_ratio(self) -> Tensor | float:
        """This rank's entry of the flags' ``NOISE_BLOCK``, read before a round (:meth:`Round.noise_ratio`)."""
        return self.round.noise_ratio()

    def refresh_requested(self, flags: Tensor) -> bool:
        """Whether the all-reduced ``flags`` make the next round an anchor refresh (:meth:`Round.refresh_requested`)."""
        return self.round.refresh_requested(flags)

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        """Whether round ``round_index`` is an exact-mean round (:meth:`Round.is_refresh`)."""
        return self.round.is_refresh(round_index, requested)

    @torch.no_grad()
    def gossip_round(self, round_index: int, refresh: bool = False) -> None:
        """One synchronization round (see the module docstring); with compression, ``refresh`` makes it an anchor
        refresh (as every ``anchor_interval``-th round is)."""
        if isinstance(self.round, GossipOuterRound):
            self.round.step_(round_index, self.comm)
            return
        if isinstance(self.round, PseudoGradientRound):
            self.round.step_()
            self.average_buffers_("round")
            if self.extra.tensors:
                extra = self.extra.pack(self.extra.new_buffers())
                self.comm.all_reduce_(extra, purpose="round", op="mean")
                self.extra.unpack(extra)
            self.comm.count_round()
            return
        work = self.round_state.pack(self._round_work)
        self.mix_buffers_(work, round_index, self.round_comm, refresh)
        self.round_state.unpack(work)

    @torch.no_grad()
    def mix_buffers_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        """Round ``round_index`` on packed round state ``work`` (updated in place) over ``comm``. Touches no module
        tensor, so it can run in a background thread while the training loop keeps stepping."""
        self.round.mix_(work, round_index, comm, refresh)

    @torch.no_grad()
    def is_finite(self) -> bool:
        """Whether every value of the round state (replica and mixed statistics) is finite: one reduction per
        tensor and one host sync per device, run before a round so a NaN or Inf is caught before it reaches a
        partner."""
        per_device: dict[torch.device, list[Tensor]] = {}
        for tensor in self.round_state.tensors:
            per_device.setdefault(tensor.device, []).append(finite_flag(tensor))
        return all(bool(torch.stack(results).all()) for results in per_device.values())

    def mark_statistics(self) -> None:
        """Start measuring how much the statistics decay until a late round result is applied."""
        for part in self.statistics:
            part.mark()

    def statistics_scales(self) -> list[float]:
        """For each statistics tensor, the decay since :meth:`mark_statistics` (see :class:`OverlappedRounds`)."""
        return [part.decay_since_mark() for part in self.statistics for _ in part.mixed_state()]

    @torch.no_grad()
    def average_(self, purpose: str) -> None:
        """Set every replica to the exact average and every counter to its maximum over ranks."""
        self.comm.all_reduce_(self.state.pack(self._work), purpose=purpose, op="mean")
        self.state.unpack(self._work)
        if self.counters.tensors:
            counters = self.counters.pack(self.counters.new_buffers())
            self.comm.all_reduce_(counters, purpose=purpose, op="max")
            self.counters.unpack(counters)

    @torch.no_grad()
    def average_buffers_(self, purpose: str, comm: Any = None) -> None:
        """Average only the floating-point buffers over ``comm`` (default: all ranks; used while gradients are
        averaged, during warm-up and inside a node under ``hierarchy="node"``)."""
        if self.float_buffers.tensors:
            buffers = self.float_buffers.pack(self.float_buffers.new_buffers())
            (comm or self.comm).all_reduce_(buffers, purpose=purpose, op="mean")
            self.float_buffers.unpack(buffers)

    @torch.no_grad()
    def consensus_distance(self, purpose: str = "monitor") -> float:
        """``mean_i ||x_i − x̄||² / ||x̄||²`` without changing the module (one all-reduce of the state)."""
        if self.swapped:
            raise RuntimeError("consensus_distance() needs the local replica; the average is swapped in")
        self.state.pack(self._backup)
        self.comm.all_reduce_(self.state.pack(self._work), purpose=purpose, op="mean")
        return self._distance(local=self._backup, average=self._work, purpose=purpose)

    @torch.no_grad()
    def swap_in_average(self, purpose: str = "eval") -> float:
        """Keep the local replica aside and load ``x̄`` into the module; returns the consensus distance."""
        if self.swapped:
            raise RuntimeError("the average is already swapped in")
        distance = self.consensus_distance(purpose)
        self.state.unpack(self._work)
        self.swapped = True
        return distance

    @torch.no_grad()
    def restore_local(self) -> None:
        """Put the local replica kept by :meth:`swap_in_average` back into the module."""
        if not self.swapped:
            raise RuntimeError("restore_local() without swap_in_average()")
        if not self._toggled:
            self.state.unpack(self._backup)
        self.swapped = self._toggled = False

    @torch.no_grad()
    def toggle(self) -> None:
        """While swapped: exchange the module's content (``x̄``) and the kept local replica. Calling it twice
        restores the previous situation; no communication."""
        if not self.swapped:
            raise RuntimeError("toggle() is only meaningful while the average is swapped in")
        self.state.pack(self._work)
        self.state.unpack(self._backup)
        self._work, self._backup = self._backup, self._work
        self._toggled = not self._toggled

    @contextmanager
    def holding(self, replica: str) -> Iterator[None]:
        """Make the module hold ``replica`` (``"average"``: the exact average, one all-reduce; ``"local"``: this
        rank's replica) inside the ``with`` block, and put back what it held before."""
        if replica == "average" and not self.swapped:
            self.swap_in_average("checkpoint")
            try:
                yield
            finally:
                self.restore_local()
        elif replica == "local" and self.swapped:
            self.toggle()
            try:
                yield
            finally:
                self.toggle()
        else:
            yield

    def _distance(self, local: Sequence[Tensor], average: Sequence[Tensor], purpose: str) -> float:
        spread = torch.zeros((), dtype=torch.float64, device=local[0].device) if local else torch.zeros(())
        norm = spread.clone()
        for mine, mean in zip(local, average):
            if is_narrow_float(mine):  # the difference in fp32, not in bf16/fp16
                mine, mean = mine.float(), mean.float()
            spread += torch.linalg.vector_norm(mine - mean, dtype=torch.float64) ** 2
            norm += torch.linalg.vector_norm(mean, dtype=torch.float64) ** 2
        self.comm.all_reduce_([spread], purpose=purpose, op="mean")
        spread_value, norm_value = spread.item(), norm.item()
        if norm_value > 0:
            return spread_value / norm_value
        return 0.0 if spread_value == 0 else math.inf
