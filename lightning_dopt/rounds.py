"""The round algorithms: what a synchronization round does to the packed round state, one class each.

Let ``x_i`` be rank ``i``'s packed round state (its replica, :mod:`lightning_dopt.replica`, plus the statistics that
travel with it) and ``P`` its size in bytes. :func:`~lightning_dopt.replica.make_round` picks the class for the options.

* :class:`GossipRound` applies one round of the topology's mixing matrix ``W`` (:mod:`lightning_dopt.topology`):
  ``x_i ← W_ii x_i + Σ_j W_ij x_j``. ``W`` is doubly stochastic, so ``x̄`` is preserved in real arithmetic. In floating
  point a ½/½ pair preserves it up to one rounding per value and round: both ends compute the same
  ``fl(½ x_i + ½ x_j)`` (the halves are exact, their sum is rounded once, in at least fp32), so they end bitwise
  equal, and their new sum differs from ``x_i + x_j`` by at most one unit in the last place of the result (half an
  ulp for each end). Cost per rank: ``P`` bytes to each out-neighbour and from each in-neighbour.
* :class:`AllReduceRound` (``complete``): ``x_i ← x̄``, one all-reduce (``2(n-1)/n · P``).
* :class:`~lightning_dopt.compressed_rounds.CompressedRound`: either of the above on encoded differences from a shared
  anchor (int8/int4/bf16/fp16).
* :class:`PseudoGradientRound` (``complete`` only): combines the pseudo-gradients ``Δ_i = a − x_i`` (mean or
  AdaCons) and steps the shared anchor ``a`` with them, optionally through an outer optimizer (DiLoCo).
* :class:`GossipOuterRound` (graph topologies): an outer optimizer on each rank's own anchor, stepped with the
  neighbourhood's mixed pseudo-gradient from the neighbourhood's mixed anchor (NoLoCo-style).
* :class:`OverlappedRounds` runs any of the packed-state rounds in a background thread, applied one round late.

A new round algorithm is a :class:`Round` subclass here (or in a file of its own) and one line in ``make_round``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_dopt.comm import PeerFailure
from lightning_dopt.gradients import AdaConsCombiner
from lightning_dopt.topology import mixing_row

if TYPE_CHECKING:
    from lightning_dopt.replica import ReplicaSync, ReplicaTensors, RoundState


# The round's control flags: FLAG_BLOCKS blocks of n float64 (one entry per rank), all-reduced with max.
STOP_BLOCK, NONFINITE_BLOCK, PACE_BLOCK, NOISE_BLOCK = range(4)
FLAG_BLOCKS = 4


class Round:
    """One synchronization round's algorithm. :meth:`mix_` updates the packed round state in place; the other methods
    are for rounds with an anchor (compression) and have neutral defaults."""

    def mix_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        """Round ``round_index`` on the packed round state ``work`` over ``comm`` (every rank calls it)."""
        raise NotImplementedError

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        """Whether round ``round_index`` is an exact-mean round."""
        return False

    def noise_ratio(self) -> Tensor | float:
        """This rank's entry of the flags' ``NOISE_BLOCK`` before a round (0: no anchor to refresh)."""
        return 0.0

    def refresh_requested(self, flags: Tensor) -> bool:
        """Whether the all-reduced flags make the next round an anchor refresh."""
        return False

    def reset_anchor_(self) -> None:
        """Anchor ← the current state (when every rank holds the same state); nothing without an anchor."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (nothing to restore by default)."""


class AllReduceRound(Round):
    """``complete``: ``x_i ← x̄`` by one all-reduce of the round state (``2(n−1)/n · P`` bytes per rank)."""

    @torch.no_grad()
    def mix_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        comm.all_reduce_(work, purpose="round", op="mean")
        comm.count_round()

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return True


class GossipRound(Round):
    """A graph round of ``topology``: ``x_i ← W_ii x_i + Σ_j W_ij x_j`` with row ``i`` of round ``r``'s mixing matrix
    (a pure function of ``(seed, r, n)``). Memory: one receive buffer set per in-neighbour, kept between rounds."""

    def __init__(self, state: RoundState, topology: str, seed: int) -> None:
        self.state = state
        self.topology = topology
        self.seed = seed
        self._received: list[list[Tensor]] = []

    @torch.no_grad()
    def mix_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        row = mixing_row(self.topology, comm.rank, comm.world_size, round_index, self.seed)
        if row.send_to or row.recv_from:
            received = kept_buffers(self._received, len(row.recv_from), self.state.new_buffers)
            comm.exchange(work, row.send_to, received, row.recv_from, purpose="round")
            for group, target in enumerate(work):
                _mix_(target, row.self_weight, [r[group] for r in received], row.recv_weights)
        comm.count_round()


OuterOptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def diloco_outer_optimizer(params: list[Tensor]) -> torch.optim.Optimizer:
    """DiLoCo's published outer optimizer (Douillard et al., 2023): SGD, Nesterov momentum 0.9, learning rate 0.7."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class PseudoGradientRound(Round):
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

    def __init__(self, module: nn.Module | ReplicaTensors, comm: Any, combiner: AdaConsCombiner | None = None,
                 outer_optimizer: OuterOptimizerFactory | None = None) -> None:
        if combiner is not None and (not combiner.preserve_scale or combiner.stale_weights):
            raise ValueError("AdaCons rounds need preserve_scale=True and stale_weights=False")
        params = module.params if hasattr(module, "params") else list(module.parameters())
        self.params = [p for p in params if p.is_floating_point()]
        self.comm = comm
        self.combiner = combiner
        self.anchor = _flat(self.params)
        self.outer = outer_optimizer([self.anchor]) if outer_optimizer is not None else None

    @torch.no_grad()
    def reset_anchor_(self) -> None:
        """Anchor ← the current parameters (call only when every rank holds the same parameters)."""
        self.anchor.copy_(_flat(self.params))

    @torch.no_grad()
    def step_(self) -> None:
        pseudo_gradient = self.anchor - _flat(self.params)
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
        _unflatten(self.anchor, self.params)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor.clone(),
                "combiner": self.combiner.state_dict() if self.combiner is not None else None,
                "outer": self.outer.state_dict() if self.outer is not None else None}

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor.copy_(state["anchor"])
        if self.combiner is not None:
            self.combiner.load_state_dict(state["combiner"])
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])


class GossipOuterRound(Round):
    """An outer optimizer over a graph topology (NoLoCo-style: no all-reduce). Every rank keeps its own anchor ``θ_i``
    (its parameters after its previous outer step). At round ``r``, with row ``i`` of the mixing matrix ``W(r)``::

        x̄_i = Σ_j W_ij x_j,   θ̄_i = Σ_j W_ij θ_j     (one exchange of [x_j, θ_j] with the row's neighbours)
        Δ̄_i = θ̄_i − x̄_i                               (the neighbourhood's pseudo-gradient)
        θ_i ← outer_step(θ̄_i, grad=Δ̄_i)              (the step starts from θ̄_i: the pull toward the neighbours' anchors)
        x_i ← θ_i

    Floating buffers (BatchNorm statistics) travel in the same exchange and are mixed, ``b_i ← Σ_j W_ij b_j``, with
    no outer step. What is preserved: every ``W`` here is doubly stochastic, so ``Σ_i θ̄_i = Σ_i θ_i`` and
    ``Σ_i Δ̄_i = Σ_i Δ_i`` exactly (in real arithmetic); for an outer optimizer linear in its gradients (SGD, with or
    without (Nesterov) momentum, no weight decay) the mean anchor then follows exactly that optimizer applied to the
    mean pseudo-gradient, DiLoCo's update of the average model, while the ranks' anchors differ from each other by
    what gossip has not yet mixed. Adaptive outer optimizers (Adam) preserve no such mean. Outer SGD with lr 1 and no
    momentum gives ``θ_i ← θ̄_i − Δ̄_i = x̄_i``: plain gossip.

    Bytes per neighbour and round: ``4·(2P + B)`` for ``P`` parameter values and ``B`` floating buffer values, twice
    plain gossip's. Memory: the anchor and the outer optimizer's state (fp32, as large as the parameters, each), and
    one receive buffer set per in-neighbour.
    """

    def __init__(self, module: nn.Module | ReplicaTensors, buffers: Sequence[Tensor], topology: str, seed: int,
                 outer_optimizer: OuterOptimizerFactory) -> None:
        params = module.params if hasattr(module, "params") else list(module.parameters())
        self.params = [p for p in params if p.is_floating_point()]
        self.buffers = list(buffers)
        self.topology, self.seed = topology, seed
        self.anchor = _flat(self.params)
        self.outer = outer_optimizer([self.anchor])
        self._received: list[list[Tensor]] = []

    @torch.no_grad()
    def reset_anchor_(self) -> None:
        """Anchor ← the current parameters (at the common start)."""
        self.anchor.copy_(_flat(self.params))

    @torch.no_grad()
    def step_(self, round_index: int, comm: Any) -> None:
        row = mixing_row(self.topology, comm.rank, comm.world_size, round_index, self.seed)
        parts = [_flat(self.params), self.anchor] + ([_flat(self.buffers)] if self.buffers else [])
        if row.send_to or row.recv_from:
            received = kept_buffers(self._received, len(row.recv_from), lambda: [torch.empty_like(p) for p in parts])
            comm.exchange(parts, row.send_to, received, row.recv_from, purpose="round")
            for index, part in enumerate(parts):  # parts[1] is the anchor itself: θ_i ← θ̄_i
                _mix_(part, row.self_weight, [r[index] for r in received], row.recv_weights)
        mixed_x = parts[0]
        self.anchor.grad = self.anchor - mixed_x
        self.outer.step()
        self.anchor.grad = None
        _unflatten(self.anchor, self.params)
        if self.buffers:
            _unflatten(parts[2], self.buffers)
        comm.count_round()

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor.clone(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor.copy_(state["anchor"])
        self.outer.load_state_dict(state["outer"])


def kept_buffers(kept: list[list[Tensor]], count: int, new: Callable[[], list[Tensor]]) -> list[list[Tensor]]:
    """The first ``count`` buffer sets of ``kept``, appending sets made by ``new()`` until there are enough: receive
    and scratch buffers allocated at the first round that needs them and reused by every later one."""
    while len(kept) < count:
        kept.append(new())
    return kept[:count]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    """One flat fp32 copy of ``tensors``."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _unflatten(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` into ``tensors`` (cast to each one's dtype)."""
    for tensor, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(value.view_as(tensor))


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

    def __init__(self, sync: ReplicaSync, comm: Any, timeout: float, round_comm: Any = None) -> None:
        self.sync = sync
        self.comm = comm
        self.round_comm = comm if round_comm is None else round_comm  # hierarchy="node": the node's and cross comms
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
                    self.sync.mix_buffers_(self._mixed, round_index, self.round_comm,
                                           self.sync.refresh_requested(flags))
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
