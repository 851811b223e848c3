"""What happens at a synchronization round, and the exact averages around it.

A rank's *replica state* is every floating-point parameter and (by default) every persistent floating-point buffer
of the module, e.g. BatchNorm running statistics; integer buffers (``num_batches_tracked``) are *counters*.
Non-persistent buffers (``register_buffer(..., persistent=False)``: constants such as a sinusoidal position table,
left out of ``state_dict``) are neither sent nor averaged.
Let ``x_i`` be rank ``i``'s replica state flattened, ``x̄ = (1/n) Σ_i x_i`` the consensus model and
``P`` the state's size in bytes.

* :meth:`ReplicaSync.gossip_round` applies one round of the topology's mixing matrix ``W``
  (:mod:`lightning_dopt.topology`): ``x_i ← W_ii x_i + Σ_j W_ij x_j``. ``W`` is doubly stochastic, so ``x̄`` is
  preserved in real arithmetic. In floating point a ½/½ pair preserves it up to one rounding per value and round: both
  ends compute the same ``fl(½ x_i + ½ x_j)`` (the halves are exact, their sum is rounded once, in at least fp32), so
  they end bitwise equal, and their new sum differs from ``x_i + x_j`` by at most one unit in the last place of the
  result (half an ulp for each end). Cost per rank: ``P`` bytes to each out-neighbour and from each in-neighbour;
  ``complete`` uses one all-reduce instead (``2(n-1)/n · P``).
* With AdaCons rounds or an outer optimizer (:class:`PseudoGradientRounds`, ``complete`` only) a round combines
  the pseudo-gradients ``Δ_i = a − x_i`` (mean or AdaCons) and steps the shared anchor ``a`` with them.
* :meth:`ReplicaSync.average_` sets every replica to ``x̄`` (all-reduce) and counters to their maximum;
  :meth:`ReplicaSync.average_buffers_` does it for the floating-point buffers alone.
* :meth:`ReplicaSync.swap_in_average` / :meth:`ReplicaSync.restore_local` put ``x̄`` into the module for
  evaluation or export and put the local replica back afterwards, returning the consensus distance
  ``mean_i ||x_i − x̄||² / ||x̄||²`` (one extra 8-byte all-reduce).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_dopt.comm import Communicator, FlatState, PeerFailure, is_narrow_float
from lightning_dopt.compress import CastCodec, Codec, error_feedback_encode
from lightning_dopt.gradients import AdaConsCombiner
from lightning_dopt.topology import mixing_row


# The round's control flags: FLAG_BLOCKS blocks of n float64 (one entry per rank), all-reduced with max.
STOP_BLOCK, NONFINITE_BLOCK, PACE_BLOCK, NOISE_BLOCK = range(4)
FLAG_BLOCKS = 4


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


class ReplicaSync:
    """Keeps the replicas of one module close together: gossip rounds, exact averages, evaluation swaps.

    Buffers are allocated once here (outside any inference-mode context, so they stay writable).
    Memory: two copies of the replica state, plus one per in-neighbour once a gossip round has run.
    """

    def __init__(self, module: nn.Module | ReplicaTensors, comm: Communicator, topology: str, seed: int,
                 average_buffers: bool = True, codec: Codec | None = None, anchor_interval: int = 16,
                 anchor_tolerance: float | None = None, round_combiner: AdaConsCombiner | None = None,
                 outer_optimizer: OuterOptimizerFactory | None = None,
                 statistics: Sequence[MixedStatistics] = ()) -> None:
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
        self.topology = topology
        self.seed = seed
        self._work = self.state.new_buffers()
        self._backup = self.state.new_buffers()
        # Rounds mix the replica state plus the ``statistics`` (e.g. preconditioner statistics) in the same exchange;
        # evaluation, exact averages and the consensus distance concern the replica state alone.
        self.statistics = list(statistics)
        self.extra = FlatState([tensor for part in self.statistics for tensor in part.mixed_state()])
        self.round_state = RoundState(self.state, self.extra)
        self._round_work = self.round_state.new_buffers() if self.extra.tensors else self._work
        self._received: list[list[Tensor]] = []
        self.swapped = False
        self._toggled = False
        self.anchor_interval = anchor_interval
        self.anchor_tolerance = anchor_tolerance
        # the noise check only matters where it can make a round a refresh: graph rounds with a tolerance
        self._measures_noise = anchor_tolerance is not None and topology != "complete"
        self.compression = AnchoredCompression(self.state, comm, codec, seed, measure_noise=self._measures_noise) \
            if codec is not None else None
        # Statistics are never sent as differences from an anchor: a small statistic would decode below zero. They
        # travel cast to bf16 (relative error ≤ 2^-8, sign kept, so a mix stays within the ranks' values).
        self.statistics_compression = AnchoredCompression(self.extra, comm, CastCodec(torch.bfloat16), seed,
                                                          anchored=False) \
            if codec is not None and self.extra.tensors else None
        self.pseudo_gradients: PseudoGradientRounds | None = None
        if round_combiner is not None or outer_optimizer is not None:
            if codec is not None or topology != "complete":
                raise ValueError("AdaCons rounds and outer optimizers combine the pseudo-gradients of all ranks: "
                                 "they need topology='complete' and no compression")
            self.pseudo_gradients = PseudoGradientRounds(replica, comm, round_combiner, outer_optimizer)

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Give every rank the source rank's parameters and buffers (all dtypes): the common start.
        With compression, the common start is also the first anchor."""
        buffers = self.everything.pack(self.everything.new_buffers())
        self.comm.broadcast_(buffers, src=src, purpose="start")
        self.everything.unpack(buffers)
        if self.compression is not None:
            self.compression.reset_anchor_()
        if self.pseudo_gradients is not None:
            self.pseudo_gradients.reset_anchor_()

    @torch.no_grad()
    def noise_ratio(self) -> Tensor | float:
        """The compression error this rank's next graph round would inject, relative to its distance to its
        neighbours (:meth:`AnchoredCompression.predicted_noise_ratio`; 0 without compression, without an
        ``anchor_tolerance`` and for ``complete``, whose rounds are all refreshes): what it contributes to the
        ``NOISE_BLOCK`` of the flags, read before the round. One pass over the replica and the anchor."""
        if self.compression is None or not self._measures_noise:
            return 0.0
        return self.compression.predicted_noise_ratio()

    def refresh_requested(self, flags: Tensor) -> bool:
        """Whether the all-reduced ``flags`` ask for an anchor refresh: some rank's noise ratio exceeds
        ``anchor_tolerance``. One host sync (the flags are read anyway)."""
        if self.compression is None or self.anchor_tolerance is None:
            return False
        return bool(flags.view(FLAG_BLOCKS, -1)[NOISE_BLOCK].max() > self.anchor_tolerance)

    @torch.no_grad()
    def gossip_round(self, round_index: int, refresh: bool = False) -> None:
        """One synchronization round of the configured topology (see the module docstring); with compression,
        ``refresh`` makes it an anchor refresh (as every ``anchor_interval``-th round is)."""
        if self.pseudo_gradients is not None:
            self.pseudo_gradients.round_()
            self.average_buffers_("round")
            if self.extra.tensors:
                extra = self.extra.pack(self.extra.new_buffers())
                self.comm.all_reduce_(extra, purpose="round", op="mean")
                self.extra.unpack(extra)
            self.comm.count_round()
            return
        work = self.round_state.pack(self._round_work)
        self.mix_buffers_(work, round_index, self.comm, refresh)
        self.round_state.unpack(work)

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        """Whether round ``round_index`` is an (exact or compressed) average round: with ``complete``, every
        ``anchor_interval``-th round, and when ``requested`` (:meth:`refresh_requested`)."""
        return requested or self.topology == "complete" or \
            round_index % self.anchor_interval == self.anchor_interval - 1

    @torch.no_grad()
    def mix_buffers_(self, work: list[Tensor], round_index: int, comm: Communicator, refresh: bool = False) -> None:
        """Round ``round_index`` on packed round state ``work`` (updated in place) over ``comm``: ``work`` becomes
        ``Σ_j W_ij(r) x_j`` (compressed: its decoded estimate; an anchor refresh when ``refresh``, for ``complete``
        and every ``anchor_interval``-th round). Touches no module tensor, so it can run in a background thread
        while the training loop keeps stepping."""
        compression = self.compression
        refresh = self.is_refresh(round_index, refresh)
        replica, statistics = self.round_state.split(work)
        if compression is not None and refresh:
            compression.average_round(replica, comm)
            if self.statistics_compression is not None:
                self.statistics_compression.average_round(statistics, comm)
        elif self.topology == "complete":
            comm.all_reduce_(work, purpose="round", op="mean")
        else:
            row = mixing_row(self.topology, comm.rank, comm.world_size, round_index, self.seed)
            if compression is not None and (row.send_to or row.recv_from):
                compression.graph_round(replica, row, comm)
                if self.statistics_compression is not None:
                    self.statistics_compression.graph_round(statistics, row, comm)
            elif row.send_to or row.recv_from:
                received = self._receive_buffers(len(row.recv_from))
                comm.exchange(work, row.send_to, received, row.recv_from, purpose="round")
                for group, target in enumerate(work):
                    _mix_(target, row.self_weight, [r[group] for r in received], row.recv_weights)
        comm.count_round()

    @torch.no_grad()
    def is_finite(self) -> bool:
        """Whether every value of the round state (replica and mixed statistics) is finite: one reduction per
        tensor and one host sync per device, run before a round so a NaN or Inf is caught before it reaches a
        partner."""
        per_device: dict[torch.device, list[Tensor]] = {}
        for tensor in self.round_state.tensors:
            per_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
        return all(bool(torch.stack(results).all()) for results in per_device.values())

    def mark_statistics(self) -> None:
        """Start measuring how much the statistics decay until a late round result is applied."""
        for part in self.statistics:
            part.mark()

    def statistics_scales(self) -> list[float]:
        """For each statistics tensor, the decay since :meth:`mark_statistics` (see :class:`OverlappedRounds`)."""
        return [part.decay_since_mark() for part in self.statistics for _ in part.mixed_state()]

    def _receive_buffers(self, count: int) -> list[list[Tensor]]:
        while len(self._received) < count:
            self._received.append(self.round_state.new_buffers())
        return self._received[:count]

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
    def average_buffers_(self, purpose: str) -> None:
        """Average only the floating-point buffers (used while gradients are averaged during warm-up)."""
        if self.float_buffers.tensors:
            buffers = self.float_buffers.pack(self.float_buffers.new_buffers())
            self.comm.all_reduce_(buffers, purpose=purpose, op="mean")
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


class OverlappedRounds:
    """Non-blocking rounds: round ``r``'s exchange runs in a background thread while local steps continue, and its
    result is applied at round ``r + 1`` with the delta rule, so the progress made meanwhile is kept::

        at round r:    s_i ← x_i  (one snapshot);  start  m_i ← Σ_j W_ij(r) s_j  in the background
        at round r+1:  x_i ← x_i + (m_i − s_i);    then start round r+1 from the new x_i

    Statistics that travel with the replica (:class:`MixedStatistics`, e.g. preconditioner EMAs) decay meanwhile
    by a factor ``βᵏ``, so their delta is scaled by it: ``v_i ← v_i + βᵏ (m_i − s_i)``, exactly where the mixed value
    would be had the round been applied at the snapshot (the plain delta could drive an EMA of squares below zero).

    Staleness is one round: each replica mixes with its partners' states of one round earlier. For ½/½ pairs the
    two corrections are opposite, ``(s_j − s_i)/2`` and ``(s_i − s_j)/2``, so the global mean is preserved exactly
    (up to float rounding; in expectation with compression). The thread works on its own buffers and its own
    process group (and a side CUDA stream on GPU): the optimizer never races with it, and the training loop's
    collectives (evaluation, logging) never interleave with the round's messages. Before the exchange the thread
    all-reduces a small ``flags`` vector (one float64 per rank and flag) so that every rank learns, one round
    later, the same stop requests, non-finite replicas, paces and noise ratios (``FLAG_BLOCKS`` blocks of ``n``;
    a noise ratio above the tolerance makes the round an anchor refresh); a round with a
    non-finite replica is not exchanged.

    Memory: the snapshot and the mixing buffer (two copies of the round state) plus the receive buffers.
    Cost per round: the blocking round's bytes plus ``2(n−1)/n · 8 · len(flags)`` bytes of flags.
    """

    def __init__(self, sync: ReplicaSync, comm: Communicator, timeout: float) -> None:
        self.sync = sync
        self.comm = comm
        self.timeout = timeout
        self._snapshot = sync.round_state.new_buffers()
        self._mixed = sync.round_state.new_buffers()
        self._flags: Tensor | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._round_index = -1
        device = self._snapshot[0].device if self._snapshot else torch.device("cpu")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    @torch.no_grad()
    def start(self, round_index: int, flags: Tensor) -> None:
        """Snapshot the round state and start round ``round_index`` (and the flags all-reduce) in the background."""
        if self._thread is not None:
            raise RuntimeError(f"round {self._round_index} is still in flight; finish() it before starting another")
        self.sync.round_state.pack(self._snapshot)
        self.sync.mark_statistics()
        torch._foreach_copy_(self._mixed, self._snapshot)
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        self._flags, self._error, self._round_index = flags, None, round_index
        self._thread = threading.Thread(target=self._run, args=(round_index, flags), daemon=True,
                                        name=f"dopt-round-{round_index}")
        self._thread.start()

    def _run(self, round_index: int, flags: Tensor) -> None:
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
                self.comm.all_reduce_([flags], purpose="control", op="max")
                if not self._flags_nonfinite(flags):
                    self.sync.mix_buffers_(self._mixed, round_index, self.comm, self.sync.refresh_requested(flags))
                if self._stream is not None:
                    self._stream.synchronize()
        except BaseException as error:  # re-raised by finish() in the training loop
            self._error = error

    @torch.no_grad()
    def finish(self) -> Tensor | None:
        """Wait for the round in flight (at most ``timeout`` seconds), apply it with the delta rule and return its
        all-reduced flags; ``None`` when nothing was in flight. Replicas are left unchanged when a flag reports a
        non-finite replica (the caller decides what to do)."""
        thread = self._thread
        if thread is None:
            return None
        start = time.perf_counter()
        thread.join(self.timeout)
        self.comm.stats.record("round", 0, 0, 0, time.perf_counter() - start)
        if thread.is_alive():
            raise PeerFailure(f"rank {self.comm.rank}: background round {self._round_index} did not finish within "
                              f"{self.timeout:.0f} s; a partner is stuck or gone")
        self._thread = None
        if self._error is not None:
            raise self._error
        flags = self._flags
        assert flags is not None
        if not self._flags_nonfinite(flags):
            torch._foreach_sub_(self._mixed, self._snapshot)
            self.sync.round_state.add_(self._mixed, self.sync.statistics_scales())
        return flags

    @staticmethod
    def _flags_nonfinite(flags: Tensor) -> bool:
        """Whether some rank reported a non-finite replica (block ``NONFINITE_BLOCK`` of the flags)."""
        return bool(flags.view(FLAG_BLOCKS, -1)[NONFINITE_BLOCK].max() > 0)

    def abandon(self, wait: float = 5.0) -> None:
        """Give up on a round in flight (after an error elsewhere): wait briefly for the thread, never apply it.
        The thread is a daemon, so a partner that never answers cannot keep the process alive."""
        if self._thread is not None:
            self._thread.join(wait)
            self._thread = None


@torch.no_grad()
def _mix_(target: Tensor, self_weight: float, others: Sequence[Tensor], weights: Sequence[float]) -> None:
    """``target ← self_weight·target + Σ_k weights[k]·others[k]``, accumulated in at least fp32."""
    accumulator = target if target.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) \
        else target.float()
    accumulator.mul_(self_weight)
    for other, weight in zip(others, weights):
        accumulator.add_(other.to(accumulator.dtype), alpha=weight)
    if accumulator is not target:
        target.copy_(accumulator)


class AnchoredCompression:
    """Compressed rounds: every rank sends ``Q(x_i − a)`` for an anchor ``a`` that all ranks hold identically.

    Graph round (pairwise or static), with ``q_j = decode(encode(x_j − a))`` decoded the same way everywhere::

        x_i ← a + (W_ii q_i + Σ_j W_ij q_j)            # the sum is formed before adding a, so both ends of a
                                                     # ½/½ pair compute the same floats: they end bitwise equal
    Average round (``complete``, and every ``anchor_interval``-th round of the other topologies): a compressed
    reduce-scatter then all-gather. The difference vector is cut into ``n`` block-aligned chunks; rank ``k``
    receives chunk ``k`` encoded by every rank, averages it (its own part uncompressed), encodes the mean once and
    sends it to every rank; all ranks decode the same payloads, so ``a ← a + mean`` and ``x_i ← a`` are identical
    everywhere.

    With ``anchored=False`` there is no anchor (``a = 0``) and no error feedback: values travel as themselves. The
    strategy sends preconditioner statistics that way, cast to bf16, whose relative rounding keeps every value's sign.

    Error: each decoded value is within one quantization step of the block's range of ``x − a``: the replicas'
    spread plus their common drift since the last refresh, so it does not vanish at consensus, only at a refresh
    (which ``anchor_tolerance`` triggers when the error grows against the replicas' distance, see
    :meth:`predicted_noise_ratio`); stochastic rounding makes it zero-mean, so the global mean is
    preserved in expectation (biased codecs carry the rest in an error-feedback residual). Bytes per rank and round
    for ``P`` fp32 bytes and payload ratio ``c`` (0.258 for int8, 0.133 for int4 at block 256, 0.5 for bf16/fp16;
    a little more when a tensor group is not a multiple of ``n`` blocks, from padding): graph rounds ``c · P`` per
    neighbour; average rounds ``2(n−1)/n · c · P``. With a refresh every 16 rounds of ``random`` gossip at
    ``n = 4`` the mix is ``c · (15 + 1.5)/16`` (0.266 × fp32 gossip for int8, 0.137 for int4).
    """

    def __init__(self, state: FlatState, comm: Communicator, codec: Codec, seed: int, anchored: bool = True,
                 measure_noise: bool = False) -> None:
        self.state = state
        self.comm = comm
        self.codec = codec
        self.anchored = anchored
        self.measure_noise = measure_noise  # keep what predicted_noise_ratio needs at every graph round
        # Without an anchor the values are sent as they are: a zero-size stand-in per buffer instead of a copy.
        self.anchor = state.new_buffers() if anchored else [torch.zeros(()) for _ in range(state.group_count)]
        self.reset_anchor_()  # this rank's state until the common start (broadcast_) or a restore sets it
        device = state.tensors[0].device if state.tensors else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed * 65_537 + comm.rank)
        # measured at the last graph round: the codec's relative error ‖Q(d) − d‖ / ‖d‖ and ‖Q(d) − neighbours'‖
        self.relative_error = torch.zeros((), dtype=torch.float64, device=device)
        self.spread = torch.zeros((), dtype=torch.float64, device=device)
        sizes = [buffer.numel() for buffer in self.anchor]
        self.residual: list[Tensor] | None = None if codec.unbiased or not anchored else [
            torch.zeros(size, dtype=torch.float32, device=device) for size in sizes]
        self.mean_residual: list[Tensor] | None = None if codec.unbiased or not anchored else [
            torch.zeros(stop - start, dtype=torch.float32, device=device)
            for start, stop in (self._chunks(size)[comm.rank] for size in sizes)]

    def reset_anchor_(self) -> None:
        """Anchor ← the module's current state (call only when every rank holds the same state); nothing to do when
        not ``anchored``."""
        if self.anchored:
            self.state.pack(self.anchor)

    def _difference(self, mine: Tensor, anchor: Tensor) -> Tensor:
        """``x − a`` in fp32 (``x`` itself without an anchor)."""
        return mine.float() - anchor.float() if self.anchored else mine.float()

    def state_dict(self) -> dict[str, Any]:
        def copies(tensors: list[Tensor] | None) -> list[Tensor] | None:
            return None if tensors is None else [t.clone() for t in tensors]

        return {"anchor": copies(self.anchor), "generator": self.generator.get_state(),
                "residual": copies(self.residual), "mean_residual": copies(self.mean_residual),
                "relative_error": self.relative_error.clone(), "spread": self.spread.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_sizes = [tuple(saved.shape) for saved in state["anchor"]]
        if saved_sizes != [tuple(mine.shape) for mine in self.anchor]:
            raise RuntimeError(
                f"the checkpoint's compression anchor has flat groups of sizes {saved_sizes}, this model's round state "
                f"{[tuple(mine.shape) for mine in self.anchor]}: the checkpoint holds a different round state (another "
                "model, or one written before lightning_dopt left non-persistent buffers out of rounds or sent "
                "preconditioner statistics apart from the anchored replica). Resume it "
                "with the code that wrote it, or load only the averaged weights with "
                "LightningModule.load_from_checkpoint and start a new fit")
        for mine, saved in zip(self.anchor, state["anchor"]):
            mine.copy_(saved)
        self.generator.set_state(state["generator"])
        for name in ("relative_error", "spread"):  # absent from states written before adaptive refreshes: 0
            getattr(self, name).copy_(state.get(name, torch.zeros(())))
        for name in ("residual", "mean_residual"):
            current, saved = getattr(self, name), state[name]
            if current is not None and saved is not None:
                for mine, value in zip(current, saved):
                    mine.copy_(value)

    def _encode(self, values: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """Payload and its decoded value; biased codecs update ``residual`` in place (error feedback)."""
        if values.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=values.device), values
        if residual is None:
            payload = self.codec.encode(values, self.generator)
        else:
            payload, new_residual = error_feedback_encode(self.codec, values, residual, self.generator)
            residual.copy_(new_residual)
        return payload, self.codec.decode(payload, values.numel())

    def _decode(self, payload: Tensor, numel: int, device: torch.device) -> Tensor:
        if numel == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        return self.codec.decode(payload, numel)

    def _empty_payload(self, numel: int, device: torch.device) -> Tensor:
        return torch.empty(self.codec.payload_bytes(numel) if numel else 0, dtype=torch.uint8, device=device)

    @torch.no_grad()
    def graph_round(self, work: list[Tensor], row: Any, comm: Communicator | None = None) -> None:
        """Mix ``work`` (packed replica state, updated in place) with the round's neighbours (over ``comm``,
        default: the communicator given at construction)."""
        sent, own = [], []
        noise = torch.zeros_like(self.spread)
        drift = torch.zeros_like(self.spread)
        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            residual = self.residual[index] if self.residual is not None else None
            difference = self._difference(mine, anchor)
            payload, decoded = self._encode(difference, residual)
            if self.measure_noise:
                noise += torch.linalg.vector_norm(decoded - difference, dtype=torch.float64).square()
                drift += torch.linalg.vector_norm(difference, dtype=torch.float64).square()
            sent.append(payload)
            own.append(decoded)
        received = [[self._empty_payload(mine.numel(), mine.device) for mine in work] for _ in row.recv_from]
        (comm or self.comm).exchange(sent, row.send_to, received, row.recv_from, purpose="round")
        spread = torch.zeros_like(noise)
        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            others = [self._decode(payloads[index], mine.numel(), mine.device) for payloads in received]
            if self.measure_noise and others:  # distance to the neighbours' (weighted) decoded replicas
                neighbourhood = others[0] if len(others) == 1 else torch.zeros_like(own[index])
                if len(others) > 1:
                    _mix_(neighbourhood, 0.0, others, [w / sum(row.recv_weights) for w in row.recv_weights])
                spread += torch.linalg.vector_norm(own[index] - neighbourhood, dtype=torch.float64).square()
            mixed = own[index].clone()
            _mix_(mixed, row.self_weight, others, row.recv_weights)
            mine.copy_(anchor.float() + mixed if self.anchored else mixed)
        if self.measure_noise:
            self.relative_error = torch.where(drift > 0, (noise / drift.clamp_min(1e-300)).sqrt(), 0.0)
            if received:
                self.spread = spread.sqrt()

    @torch.no_grad()
    def predicted_noise_ratio(self) -> Tensor:
        """``κ · ‖x_i − a‖ / s``: the error the next graph round would inject (the codec's relative error ``κ`` at the
        last graph round times the drift since the anchor, measured now) over the distance ``s`` to the neighbours'
        decoded replicas at the last graph round. The error grows with the drift since the last anchor refresh;
        the distance does not. +inf when the replicas agreed exactly (a graph round would only add noise), 0 before
        the first graph round. No host sync."""
        drift = torch.zeros_like(self.spread)
        if self.anchored:
            for _, tensors, views in self.state.views(self.anchor):
                for tensor, view in zip(tensors, views):
                    drift += torch.linalg.vector_norm(tensor.float() - view.float(), dtype=torch.float64).square()
        noise = self.relative_error * drift.sqrt()
        return torch.where(self.spread > 0, noise / self.spread.clamp_min(1e-300),
                           torch.where(noise > 0, torch.inf, 0.0))

    @torch.no_grad()
    def average_round(self, work: list[Tensor], comm: Communicator | None = None) -> None:
        """Compressed exact-mean round over ``comm`` (default: the construction's); ``work`` becomes the new anchor
        on every rank."""
        comm = comm or self.comm
        rank, world_size = comm.rank, comm.world_size
        peers = [peer for peer in range(world_size) if peer != rank]
        differences, outgoing, incoming = [], {p: [] for p in peers}, {p: [] for p in peers}
        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            difference = self._difference(mine, anchor)
            chunks = self._chunks(mine.numel())
            for peer in peers:
                start, stop = chunks[peer]
                residual = self.residual[index][start:stop] if self.residual is not None else None
                outgoing[peer].append(self._encode(difference[start:stop], residual)[0])
                incoming[peer].append(self._empty_payload(chunks[rank][1] - chunks[rank][0], mine.device))
            if self.residual is not None:
                self.residual[index][slice(*chunks[rank])].zero_()  # the own chunk is used uncompressed
            differences.append(difference)
        comm.exchange_each(list(outgoing.items()), list(incoming.items()), purpose="round")

        means, outgoing_means, incoming_means = [], [], {p: [] for p in peers}
        for index, (mine, difference) in enumerate(zip(work, differences)):
            chunks = self._chunks(mine.numel())
            start, stop = chunks[rank]
            total = difference[start:stop].clone()
            for peer in peers:
                total += self._decode(incoming[peer][index], stop - start, mine.device)
            residual = self.mean_residual[index] if self.mean_residual is not None else None
            payload, decoded = self._encode(total / world_size, residual)
            outgoing_means.append(payload)
            means.append(decoded)
            for peer in peers:
                incoming_means[peer].append(self._empty_payload(chunks[peer][1] - chunks[peer][0], mine.device))
        comm.exchange_each([(peer, outgoing_means) for peer in peers], list(incoming_means.items()), purpose="round")

        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            chunks = self._chunks(mine.numel())
            mean = torch.empty(mine.numel(), dtype=torch.float32, device=mine.device)
            for owner, (start, stop) in enumerate(chunks):
                mean[start:stop] = means[index] if owner == rank else \
                    self._decode(incoming_means[owner][index], stop - start, mine.device)
            if self.anchored:
                anchor.copy_(anchor.float() + mean)
                mine.copy_(anchor)
            else:
                mine.copy_(mean)

    def _chunks(self, numel: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of each rank's chunk, aligned to the codec's block size."""
        align = getattr(self.codec, "block_size", 1)
        blocks = -(-numel // align)
        per_rank = -(-blocks // self.comm.world_size)
        return [(min(k * per_rank * align, numel), min((k + 1) * per_rank * align, numel))
                for k in range(self.comm.world_size)]


OuterOptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def diloco_outer_optimizer(params: list[Tensor]) -> torch.optim.Optimizer:
    """DiLoCo's published outer optimizer (Douillard et al., 2023): SGD, Nesterov momentum 0.9, learning rate 0.7."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class PseudoGradientRounds:
    """Rounds that combine pseudo-gradients and step the shared anchor (``complete`` topology only).

    With ``a`` the parameters after the previous round (identical on every rank) and ``Δ_i = a − x_i`` rank ``i``'s
    pseudo-gradient (its progress since then, negated)::

        Δ̂ = mean_i Δ_i                         (one all-reduce)   or
        Δ̂ = AdaCons(Δ_1, …, Δ_n) · ‖Δ̄‖ / ‖AdaCons(…)‖     (two all-reduces and n·T coefficients)
        a ← a − Δ̂                               without an outer optimizer (Local SGD when Δ̂ is the mean), or
        a ← outer_step(a, grad=Δ̂)               e.g. DiLoCo: Nesterov SGD, lr 0.7, momentum 0.9
        x_i ← a

    The AdaCons rescaling (the combiner's ``preserve_scale``) is required: a pseudo-gradient's length is how far the
    replicas moved, and AdaCons alone returns a vector of norm ≤ 1. The outer optimizer acts on one flat fp32 copy
    of the parameters, so its state is as large as the model. Floating buffers are averaged by the caller.
    """

    def __init__(self, module: nn.Module | ReplicaTensors, comm: Communicator, combiner: AdaConsCombiner | None = None,
                 outer_optimizer: OuterOptimizerFactory | None = None) -> None:
        if combiner is not None and (not combiner.preserve_scale or combiner.stale_weights):
            raise ValueError("AdaCons rounds need preserve_scale=True and stale_weights=False")
        replica = module if isinstance(module, ReplicaTensors) else ReplicaTensors.of(module)
        self.params = [p for p in replica.params if p.is_floating_point()]
        self.comm = comm
        self.combiner = combiner
        self.anchor = self._flat()
        self.outer = outer_optimizer([self.anchor]) if outer_optimizer is not None else None

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def reset_anchor_(self) -> None:
        """Anchor ← the current parameters (call only when every rank holds the same parameters)."""
        self.anchor.copy_(self._flat())

    @torch.no_grad()
    def round_(self) -> None:
        pseudo_gradient = self.anchor - self._flat()
        if self.combiner is not None:
            self.combiner.combine_(pseudo_gradient)
        else:
            self.comm.all_reduce_([pseudo_gradient], purpose="round", op="mean")
        if self.outer is None:
            self.anchor.sub_(pseudo_gradient)
        else:
            self.anchor.grad = pseudo_gradient
            self.outer.step()
            self.anchor.grad = None
        for param, value in zip(self.params, self.anchor.split([p.numel() for p in self.params])):
            param.copy_(value.view_as(param))

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor.clone(),
                "combiner": self.combiner.state_dict() if self.combiner is not None else None,
                "outer": self.outer.state_dict() if self.outer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor.copy_(state["anchor"])
        if self.combiner is not None:
            self.combiner.load_state_dict(state["combiner"])
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
