"""Compressed rounds: the replicas travel encoded (:mod:`lightning_dopt.compress`) as differences from an anchor that
every rank holds identically, so the error scales with the replicas' spread, not with the weights.

:class:`AnchoredCompression` encodes, exchanges and decodes one flat state (graph rounds and exact-mean refreshes);
:class:`CompressedRound` is the round algorithm built on it: the replica anchored, the mixed statistics cast to bf16,
an exact-mean refresh every ``anchor_interval`` rounds or when the predicted error passes ``anchor_tolerance``;
:class:`CompressedOuterRound` steps an outer optimizer (DiLoCo) with the compressed mean pseudo-gradient;
:class:`CompressedGossipOuterRound` steps one per rank over a graph topology (NoLoCo-style) with compressed anchors and
pseudo-gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_dopt.comm import FlatState
from lightning_dopt.compress import CastCodec, Codec, error_feedback_encode_
from lightning_dopt.rounds import FLAG_BLOCKS, NOISE_BLOCK, Round, kept_buffers
from lightning_dopt.topology import mixing_row

if TYPE_CHECKING:
    from lightning_dopt.replica import RoundState


class AnchoredCompression:
    """Compressed rounds: every rank sends ``Q(x_i − a)`` for an anchor ``a`` that all ranks hold identically.

    Graph round (pairwise or static), with ``q_j = decode(encode(x_j − a))`` decoded the same way everywhere::

        x_i ← a + (W_ii q_i + Σ_j W_ij q_j) + e_i      # the sum is formed before adding a, so both ends of a
                                                     # ½/½ pair compute the same floats: bitwise equal
                                                     # replicas but for their own e_i (below)
    Average round (``complete``, and every ``anchor_interval``-th round of the other topologies): a compressed
    reduce-scatter then all-gather. The difference vector is cut into ``n`` block-aligned chunks; rank ``k``
    receives chunk ``k`` encoded by every rank, averages it (its own part uncompressed), encodes the mean once and
    sends it to every rank; all ranks decode the same payloads, so ``a ← a + mean`` is identical everywhere, and
    ``x_i ← a + e_i``.

    ``e_i`` is the part of rank ``i``'s own difference that a sparse codec (``Codec.sparse``: TopK) did not send, its
    error-feedback residual; 0 for the other codecs. The replica keeps it, so the next local steps compute their
    gradients where this rank's progress has brought it, not at a point that lacks most of it (stale gradients: TopK
    Local SGD at H = 1 on the emulated cluster ended at 82.45 % without, 84.95 % with, docs/benchmarks.md); the next
    difference ``x_i − a`` then already holds ``e_i``, so the encoder is given that difference alone
    (``e_i ← d − decode(encode(d))``), not ``d + e_i``. What is preserved with a sparse codec: a graph round keeps
    ``Σ_i x_i`` exactly for a doubly stochastic ``W`` (each rank's ``q_i + e_i`` is its whole difference); an average
    round keeps ``Σ_i x_i + n·R``, ``R`` the owners' residuals of the mean; after an average round the replicas
    differ by their ``e_i`` alone. The other biased codecs (bf16/fp16 casts) hold back rounding errors only: their
    residuals are added to the next message as usual, and an average round leaves every replica equal.

    With ``anchored=False`` there is no anchor (``a = 0``) and, unless ``error_feedback=True``, no error feedback:
    values travel as themselves. The strategy sends preconditioner statistics that way, cast to bf16, whose relative
    rounding keeps every value's sign; :class:`CompressedGossipOuterRound` sends pseudo-gradients that way, with error
    feedback.

    Error: each decoded value is within one quantization step of the block's range of ``x − a``: the replicas'
    spread plus their common drift since the last refresh, so it does not vanish at consensus, only at a refresh
    (which ``anchor_tolerance`` triggers when the error grows against the replicas' distance, see
    :meth:`predicted_noise_ratio`); stochastic rounding makes it zero-mean, so the global mean is
    preserved in expectation (biased codecs carry the rest in an error-feedback residual). Bytes per rank and round
    for ``P`` fp32 bytes and payload ratio ``c`` (0.258 for int8, 0.133 for int4 at block 256, 0.5 for bf16/fp16;
    a little more when a tensor group is not a multiple of ``n`` blocks, from padding): graph rounds ``c · P`` per
    neighbour; average rounds ``2(n−1)/n · c · P``. With a refresh every 16 rounds of ``random`` gossip at
    ``n = 4`` the mix is ``c · (15 + 1.5)/16`` (0.266 × fp32 gossip for int8, 0.137 for int4).

    Memory (fp32 copies of the state): the anchor, three scratch buffers (allocated at the first round and kept, so
    a round allocates nothing of the model's size but the payloads it sends and receives), an error-feedback
    residual for biased codecs; plus one payload per neighbour.
    """

    def __init__(self, state: FlatState, comm: Any, codec: Codec, seed: int, anchored: bool = True,
                 measure_noise: bool = False, error_feedback: bool | None = None) -> None:
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
        sizes = state.group_sizes
        feedback = anchored if error_feedback is None else error_feedback
        self.residual: list[Tensor] | None = None if codec.unbiased or not feedback else [
            torch.zeros(size, dtype=torch.float32, device=device) for size in sizes]
        # a sparse codec's unsent part stays in the anchored replica (class docstring)
        self.keeps_unsent = anchored and self.residual is not None and codec.sparse
        self.mean_residual: list[Tensor] | None = None if codec.unbiased or not feedback else [
            torch.zeros(stop - start, dtype=torch.float32, device=device)
            for start, stop in (self._chunks(size)[comm.rank] for size in sizes)]
        self._buffers: list[list[Tensor]] = []  # fp32 scratch shaped like the state (graph rounds)
        self._received: list[list[Tensor]] = []  # payload receive buffers (graph rounds)

    def share_buffers(self, other: AnchoredCompression) -> None:
        """Use ``other``'s kept scratch and receive buffers (same state layout and codec): for two compressions that
        never run at the same time, which then keep one set between them."""
        self._buffers, self._received = other._buffers, other._received

    def reset_anchor_(self) -> None:
        """Anchor ← the module's current state (call only when every rank holds the same state); nothing to do when
        not ``anchored``."""
        if self.anchored:
            self.state.pack(self.anchor)

    def _difference(self, mine: Tensor, anchor: Tensor, out: Tensor | None = None) -> Tensor:
        """``x − a`` in fp32 (``x`` itself without an anchor), into ``out`` when given."""
        if out is None:
            return mine.float() - anchor.float() if self.anchored else mine.float()
        return torch.sub(mine.float(), anchor.float(), out=out) if self.anchored else out.copy_(mine)

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

    def _encode(self, values: Tensor, residual: Tensor | None, out: Tensor | None = None,
                scratch: Tensor | None = None, residual_in_values: bool = False,
                codec: Codec | None = None) -> tuple[Tensor, Tensor]:
        """Payload and its decoded value (into ``out`` when given); biased codecs update ``residual`` in place: error
        feedback, encoding ``values + residual`` (formed in ``scratch`` when given), or, with ``residual_in_values``
        (the replica keeps its residual, so ``values`` already hold it), ``values`` alone. Either way the residual
        becomes what was encoded minus its decode, written only after the encode succeeded. ``codec``: default the
        construction's."""
        codec = codec or self.codec
        if values.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=values.device), values
        if residual is not None and not residual_in_values:
            return error_feedback_encode_(codec, values, residual, self.generator, out=out, scratch=scratch)
        payload = codec.encode(values, self.generator)
        decoded = codec.decode(payload, values.numel(), out=out)
        if residual is not None:
            torch.sub(values, decoded, out=residual)
        return payload, decoded

    def _payload(self, values: Tensor, residual: Tensor | None, out: Tensor, scratch: Tensor) -> Tensor:
        """The payload of a part of the replica's difference alone (:meth:`_encode` without the decode, which only
        error feedback needs)."""
        if residual is None and values.numel():
            return self.codec.encode(values, self.generator)
        return self._encode(values, residual, out=out, scratch=scratch, residual_in_values=self.keeps_unsent)[0]

    def _decode(self, payload: Tensor, numel: int, device: torch.device, out: Tensor | None = None,
                codec: Codec | None = None) -> Tensor:
        if numel == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        return (codec or self.codec).decode(payload, numel, out=out)

    def _empty_payload(self, numel: int, device: torch.device, codec: Codec | None = None) -> Tensor:
        return torch.empty((codec or self.codec).payload_bytes(numel) if numel else 0, dtype=torch.uint8,
                           device=device)

    @torch.no_grad()
    def graph_round(self, work: list[Tensor], row: Any, comm: Any = None) -> None:
        """Mix ``work`` (packed replica state, updated in place) with the round's neighbours (over ``comm``,
        default: the communicator given at construction).

        Per group, in three fp32 buffers kept between rounds (no other full-size allocation): ``d = x − a``;
        ``q = decode(encode(d))``; ``s = Σ_j W_ij q_j`` decoded neighbour by neighbour; ``x ← a + (W_ii q + s)``.
        """
        differences, owns, spare = kept_buffers(self._buffers, 3, lambda: [
            torch.empty(mine.numel(), dtype=torch.float32, device=mine.device) for mine in work])
        sent = []
        noise = torch.zeros_like(self.spread)
        drift = torch.zeros_like(self.spread)
        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            residual = self.residual[index] if self.residual is not None else None
            difference = self._difference(mine, anchor, out=differences[index])
            payload, own = self._encode(difference, residual, out=owns[index], scratch=spare[index],
                                        residual_in_values=self.keeps_unsent)
            if self.measure_noise:
                noise += _squared_norm(torch.sub(own, difference, out=spare[index]))
                drift += _squared_norm(difference)
            sent.append(payload)
        received = kept_buffers(self._received, len(row.recv_from), lambda: [
            self._empty_payload(mine.numel(), mine.device) for mine in work])
        (comm or self.comm).exchange(sent, row.send_to, received, row.recv_from, purpose="round")
        spread = torch.zeros_like(noise)
        total_weight = sum(row.recv_weights)
        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            numel, own, neighbours = mine.numel(), owns[index], differences[index]  # d is no longer needed
            for k, (payloads, weight) in enumerate(zip(received, row.recv_weights)):
                decoded = self._decode(payloads[index], numel, mine.device, out=neighbours if k == 0 else spare[index])
                if k == 0:
                    neighbours.mul_(weight)
                else:
                    neighbours.add_(decoded, alpha=weight)
            if self.measure_noise and received:  # distance to the neighbours' (weighted) decoded replicas
                gap = torch.sub(own, neighbours, alpha=1 / total_weight, out=spare[index])
                spread += _squared_norm(gap)
            own.mul_(row.self_weight)
            if received:
                own.add_(neighbours)
            if not self.anchored:
                mine.copy_(own)
            elif mine.dtype == torch.float32:
                torch.add(anchor, own, out=mine)
            else:
                mine.copy_(anchor.float() + own)
        self.keep_unsent_(work)
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
                    drift += _squared_norm(tensor.float() - view.float())
        noise = self.relative_error * drift.sqrt()
        return torch.where(self.spread > 0, noise / self.spread.clamp_min(1e-300),
                           torch.where(noise > 0, torch.inf, 0.0))

    @torch.no_grad()
    def average_round(self, work: list[Tensor], comm: Any = None, keep_unsent: bool = True) -> None:
        """Compressed exact-mean round over ``comm`` (default: the construction's); ``work`` becomes the new anchor
        on every rank.

        Per group, in the three fp32 buffers that graph rounds keep (``d``, ``m``, ``s``; no other allocation of the
        model's size): ``d = x − a``; the peers' chunks of ``d`` are encoded (error-feedback sums formed in ``s``,
        decodes for the residual in ``m``) and exchanged; the own chunk of ``d`` sums the peers' decoded chunks
        (decoded into ``s``) and is divided by ``n``; its mean, encoded with the codec's ``mean_codec``, is decoded
        into the own chunk of ``m``, the peers' into theirs; ``a ← a + m``, ``x ← a + e`` (``e``: what a sparse
        codec did not send of ``d``, class docstring; ``keep_unsent=False`` leaves ``x ← a`` for a caller that sets
        the replica itself and then calls :meth:`keep_unsent_`).
        """
        comm = comm or self.comm
        rank, world_size = comm.rank, comm.world_size
        peers = [peer for peer in range(world_size) if peer != rank]
        differences, means, spare = kept_buffers(self._buffers, 3, lambda: [
            torch.empty(mine.numel(), dtype=torch.float32, device=mine.device) for mine in work])
        outgoing, incoming = {p: [] for p in peers}, {p: [] for p in peers}
        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            difference = self._difference(mine, anchor, out=differences[index])
            chunks = self._chunks(mine.numel())
            for peer in peers:
                start, stop = chunks[peer]
                residual = self.residual[index][start:stop] if self.residual is not None else None
                outgoing[peer].append(self._payload(difference[start:stop], residual, out=means[index][start:stop],
                                                    scratch=spare[index][start:stop]))
                incoming[peer].append(self._empty_payload(chunks[rank][1] - chunks[rank][0], mine.device))
            if self.residual is not None:
                self.residual[index][slice(*chunks[rank])].zero_()  # the own chunk is used uncompressed
        comm.exchange_each(list(outgoing.items()), list(incoming.items()), purpose="round")

        outgoing_means, incoming_means = [], {p: [] for p in peers}
        mean_codec = self.codec.mean_codec
        for index, mine in enumerate(work):
            chunks = self._chunks(mine.numel())
            start, stop = chunks[rank]
            total = differences[index][start:stop]
            for peer in peers:
                total += self._decode(incoming[peer][index], stop - start, mine.device,
                                      out=spare[index][start:stop])
            residual = self.mean_residual[index] if self.mean_residual is not None else None
            payload = self._encode(total.div_(world_size), residual, out=means[index][start:stop],
                                   scratch=spare[index][start:stop], codec=mean_codec)[0]
            outgoing_means.append(payload)
            for peer in peers:
                incoming_means[peer].append(self._empty_payload(chunks[peer][1] - chunks[peer][0], mine.device,
                                                                mean_codec))
        comm.exchange_each([(peer, outgoing_means) for peer in peers], list(incoming_means.items()), purpose="round")

        for index, (mine, anchor) in enumerate(zip(work, self.anchor)):
            mean = means[index]
            for owner, (start, stop) in enumerate(self._chunks(mine.numel())):
                if owner != rank:
                    self._decode(incoming_means[owner][index], stop - start, mine.device, out=mean[start:stop],
                                 codec=mean_codec)
            if not self.anchored:
                mine.copy_(mean)
                continue
            if anchor.dtype == torch.float32:
                anchor.add_(mean)
            else:
                anchor.copy_(anchor.float() + mean)
            mine.copy_(anchor)
        if keep_unsent:
            self.keep_unsent_(work)

    @torch.no_grad()
    def keep_unsent_(self, work: list[Tensor]) -> None:
        """``x_i += e_i``: add this rank's unsent residual to the packed replica ``work`` when the replica keeps it
        (a sparse codec, class docstring); nothing otherwise."""
        if self.keeps_unsent:
            for mine, residual in zip(work, self.residual):
                mine.add_(residual.to(mine.dtype))

    def _chunks(self, numel: int) -> list[tuple[int, int]]:
        return aligned_chunks(numel, getattr(self.codec, "block_size", 1), self.comm.world_size)


def _squared_norm(values: Tensor) -> Tensor:
    """``‖values‖²`` as a float64 scalar: the norm summed in fp32 (blockwise, several times faster than a float64
    reduction, which converts every value first), squared in float64. For the noise estimates only."""
    return torch.linalg.vector_norm(values).double().square()


def aligned_chunks(numel: int, align: int, world_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's chunk of ``numel`` values in an exact-mean round: equal numbers of
    ``align``-value blocks (the codec's block size), the last chunks shorter or empty."""
    blocks = -(-numel // align)
    per_rank = -(-blocks // world_size)
    return [(min(k * per_rank * align, numel), min((k + 1) * per_rank * align, numel)) for k in range(world_size)]


def check_anchor_options(anchor_interval: object, anchor_tolerance: object) -> None:
    """``anchor_interval`` an integer ≥ 1, ``anchor_tolerance`` a number > 0 or ``None``; else a ``ValueError``."""
    if isinstance(anchor_interval, bool) or not isinstance(anchor_interval, int) or anchor_interval < 1:
        raise ValueError(f"anchor_interval must be an integer >= 1; got {anchor_interval!r}")
    if anchor_tolerance is not None and (isinstance(anchor_tolerance, bool) or not isinstance(
            anchor_tolerance, (int, float)) or not 0 < anchor_tolerance < float("inf")):
        raise ValueError(f"anchor_tolerance must be a number > 0 or None; got {anchor_tolerance!r}")


class CompressedRound(Round):
    """Graph or exact-mean rounds on encoded differences from a shared anchor.

    Every ``anchor_interval``-th round (every round for ``complete``), and any round whose flags ask for it
    (some rank's predicted error over its distance to its neighbours exceeds ``anchor_tolerance``), is a compressed
    exact-mean round that refreshes the anchor; the others are graph rounds of ``topology``
    (:class:`AnchoredCompression`). The statistics that travel with the replica are never anchored (a small statistic
    would decode below zero): they are cast to bf16 (relative error ≤ 2⁻⁸, sign kept, so a mix stays within the ranks'
    values). State (checkpointed): the replica's anchor, rounding generator, residuals and noise estimates.
    """

    def __init__(self, state: RoundState, comm: Any, topology: str, seed: int, codec: Codec, anchor_interval: int = 16,
                 anchor_tolerance: float | None = None) -> None:
        check_anchor_options(anchor_interval, anchor_tolerance)
        self.state = state
        self.topology = topology
        self.seed = seed
        self.anchor_interval = anchor_interval
        self.anchor_tolerance = anchor_tolerance
        # the noise check only matters where it can make a round a refresh: graph rounds with a tolerance
        self.measures_noise = anchor_tolerance is not None and topology != "complete"
        self.compression = AnchoredCompression(state.replica, comm, codec, seed, measure_noise=self.measures_noise)
        self.statistics_compression = AnchoredCompression(state.statistics, comm, CastCodec(torch.bfloat16), seed,
                                                          anchored=False) if state.statistics.tensors else None

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return requested or self.topology == "complete" or \
            round_index % self.anchor_interval == self.anchor_interval - 1

    @torch.no_grad()
    def noise_ratio(self) -> Tensor | float:
        """The compression error this rank's next graph round would inject, relative to its distance to its
        neighbours (:meth:`AnchoredCompression.predicted_noise_ratio`; 0 without an ``anchor_tolerance`` and for
        ``complete``, whose rounds are all refreshes). One pass over the replica and the anchor."""
        return self.compression.predicted_noise_ratio() if self.measures_noise else 0.0

    def refresh_requested(self, flags: Tensor) -> bool:
        """Some rank's noise ratio exceeds ``anchor_tolerance`` (one host sync; the flags are read anyway)."""
        if self.anchor_tolerance is None:
            return False
        return bool(flags.view(FLAG_BLOCKS, -1)[NOISE_BLOCK].max() > self.anchor_tolerance)

    def reset_anchor_(self) -> None:
        self.compression.reset_anchor_()

    @torch.no_grad()
    def mix_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        replica, statistics = self.state.split(work)
        if self.is_refresh(round_index, refresh):
            self.compression.average_round(replica, comm)
            if self.statistics_compression is not None:
                self.statistics_compression.average_round(statistics, comm)
        else:
            row = mixing_row(self.topology, comm.rank, comm.world_size, round_index, self.seed)
            if row.send_to or row.recv_from:
                self.compression.graph_round(replica, row, comm)
                if self.statistics_compression is not None:
                    self.statistics_compression.graph_round(statistics, row, comm)
        comm.count_round()

    def state_dict(self) -> dict[str, Any]:
        return self.compression.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compression.load_state_dict(state)


class CompressedOuterRound(Round):
    """An outer optimizer on a compressed mean pseudo-gradient (``complete`` topology): DiLoCo whose all-reduce is a
    compressed exact-mean round; with :class:`~lightning_dopt.topk.TopKCodec` and its error feedback, SparseLoCo's
    sparse pseudo-gradients (Sarfi et al., arXiv 2508.15706) in this package's terms.

    With ``a`` the anchor (the parameters after the previous outer step, identical on every rank, also the
    compression anchor) and ``x_i`` rank ``i``'s replica::

        m = mean_i Q(x_i − a)                    compressed exact-mean round (AnchoredCompression.average_round);
                                                 x_i − a holds e_i, rank i's unsent error-feedback residual
        Δ̂ = a − (a + m) = −m                     the mean pseudo-gradient as all ranks decode it
        a ← outer_step(a, grad=Δ̂)                 parameters only; floating buffers take a + m (their plain mean)
        x_i ← a + e_i                            the replica keeps what it has not sent (0 for unbiased codecs)

    Every rank decodes the same payloads, so the anchors stay identical across ranks. Outer SGD with lr 1 and
    no momentum gives ``a ← a + m``: the compressed Local SGD round (:class:`CompressedRound` with ``complete``).
    Bytes per rank and round: those of the compressed exact-mean round, ``2(n−1)/n · c · P`` (about, see
    :class:`AnchoredCompression`). Memory: the anchor, the previous anchor during the step, the outer optimizer's
    state (fp32, model-sized each) and, for biased codecs, the residuals. Statistics that travel with the replica
    (scaling) are not supported here (the options refuse them).
    """

    def __init__(self, state: RoundState, params: Sequence[Tensor], comm: Any, seed: int, codec: Codec,
                 outer_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]) -> None:
        if state.statistics.tensors:
            raise ValueError("CompressedOuterRound mixes no statistics (scaling); use compression=None with scaling")
        self.state = state
        self.compression = AnchoredCompression(state.replica, comm, codec, seed)
        wanted = {id(p) for p in params}
        self._anchor_params = [view for _, tensors, views in state.replica.views(self.compression.anchor)
                               for tensor, view in zip(tensors, views) if id(tensor) in wanted]
        self.outer = outer_optimizer(self._anchor_params)
        self._previous = [torch.empty_like(anchor) for anchor in self._anchor_params]  # the anchor before the round

    def reset_anchor_(self) -> None:
        self.compression.reset_anchor_()

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return True

    @torch.no_grad()
    def mix_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        replica, _ = self.state.split(work)
        previous = self._previous
        torch._foreach_copy_(previous, self._anchor_params)
        self.compression.average_round(replica, comm, keep_unsent=False)  # anchor = replica = a + m on every rank
        for anchor, before in zip(self._anchor_params, previous):
            anchor.grad = before - anchor  # Δ̂ = a − (a + m)
            anchor.copy_(before)
        self.outer.step()
        for anchor in self._anchor_params:
            anchor.grad = None
        torch._foreach_copy_(replica, self.compression.anchor)
        self.compression.keep_unsent_(replica)
        comm.count_round()

    def state_dict(self) -> dict[str, Any]:
        return {**self.compression.state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compression.load_state_dict({key: value for key, value in state.items() if key != "outer"})
        self.outer.load_state_dict(state["outer"])


class CompressedGossipOuterRound(Round):
    """An outer optimizer over a graph topology with encoded messages: :class:`~lightning_dopt.rounds.GossipOuterRound`
    (NoLoCo-style) whose two messages, the anchor and the pseudo-gradient, travel compressed.

    Rank ``i`` keeps its anchor ``θ_i`` (its parameters after its previous outer step); all ranks hold the same
    reference ``r`` (the common start, then the anchors' compressed mean at each refresh). At round ``t``, with row
    ``i`` of the mixing matrix ``W(t)`` and ``Q`` the codec::

        Δ_i = θ_i − x_i                                   this rank's pseudo-gradient
        p_i = Q(Δ_i + e_i),   e_i ← Δ_i + e_i − p_i       error feedback (biased codecs, e.g. TopKCodec)
        q_i = Q(θ_i − r + f_i)                            the anchor as its offset from r (AnchoredCompression)
        Δ̄_i = W_ii p_i + Σ_j W_ij p_j                     one exchange of p with the row's neighbours
        θ̄_i = r + W_ii q_i + Σ_j W_ij q_j                 one exchange of q
        θ_i ← outer_step(θ̄_i, grad=Δ̄_i)                  parameters; floating buffers take θ̄_i − Δ̄_i (gossip)
        x_i ← θ_i

    Every ``anchor_interval``-th round (``round_index % anchor_interval == anchor_interval − 1``) the anchors take a
    compressed exact mean instead of the graph mix (every rank gets ``θ̄_i = r ← r + mean_j q_j``), which keeps
    ``θ_i − r`` small; the pseudo-gradients are mixed over the graph as in every round. ``anchor_tolerance`` does not
    apply (its noise estimate concerns replicas sent as offsets, not anchors).

    What is preserved: ``W`` is doubly stochastic, so with an unbiased codec (int8, int4) ``E[Σ_i θ̄_i] = Σ_i θ_i`` and
    ``E[Σ_i Δ̄_i] = Σ_i Δ_i``: for an outer optimizer linear in its gradients (SGD, (Nesterov) momentum, no weight
    decay) the mean anchor follows that optimizer on the mean pseudo-gradient in expectation. With a biased codec the
    sums hold up to the error-feedback residuals (what is not sent yet). With an exact codec and outer SGD at lr 1
    without momentum, ``θ_i ← θ̄_i − Δ̄_i = Σ_j W_ij x_j``: plain gossip.

    Bytes per neighbour and round, for payload ratio ``c`` and ``P`` fp32 bytes of round state: ``2 · c · P`` (the
    uncompressed :class:`~lightning_dopt.rounds.GossipOuterRound` sends ``2P``, so 0.258× it for int8); refresh
    rounds send the anchors' compressed mean, ``2(n−1)/n · c · P``, plus ``c · P`` per neighbour. Memory (fp32,
    model-sized): the anchor ``θ``, the reference ``r``, the pseudo-gradient, the outer optimizer's state, three
    scratch buffers (shared by the two messages, kept between rounds) and, for biased codecs, two residuals; plus
    one payload set per neighbour. Preconditioner statistics (scaling) are not mixed (the options refuse them).
    """

    def __init__(self, state: RoundState, params: Sequence[Tensor], comm: Any, topology: str, seed: int, codec: Codec,
                 outer_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], anchor_interval: int = 16) -> None:
        if state.statistics.tensors:
            raise ValueError("CompressedGossipOuterRound mixes no statistics (scaling); use compression=None with "
                             "scaling")
        check_anchor_options(anchor_interval, None)
        self.state, self.topology, self.seed, self.anchor_interval = state, topology, seed, anchor_interval
        self.anchors = AnchoredCompression(state.replica, comm, codec, seed)  # r, and the anchors' messages
        # the pseudo-gradients travel as themselves (no reference), with their own rounding stream and residual
        self.pseudo_gradients = AnchoredCompression(state.replica, comm, codec, seed + 7919, anchored=False,
                                                    error_feedback=True)
        self.pseudo_gradients.share_buffers(self.anchors)  # one message at a time: one set of scratch buffers
        self.anchor = state.replica.new_buffers()  # θ_i
        self.reset_anchor_()
        self._delta = [torch.empty(buffer.numel(), dtype=torch.float32, device=buffer.device)
                       for buffer in self.anchor]
        wanted = {id(p) for p in params}
        pairs = [(view, delta_view, id(tensor) in wanted)
                 for (_, tensors, views), (_, _, delta_views) in zip(state.replica.views(self.anchor),
                                                                     state.replica.views(self._delta))
                 for tensor, view, delta_view in zip(tensors, views, delta_views)]
        self._params = [(view, delta) for view, delta, is_param in pairs if is_param]
        self._buffers = [(view, delta) for view, delta, is_param in pairs if not is_param]
        self.outer = outer_optimizer([view for view, _ in self._params])

    @torch.no_grad()
    def reset_anchor_(self) -> None:
        """``θ_i`` and ``r`` ← the current state (at the common start, where every rank holds the same)."""
        self.state.replica.pack(self.anchor)
        self.anchors.reset_anchor_()

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return round_index % self.anchor_interval == self.anchor_interval - 1

    @torch.no_grad()
    def mix_(self, work: list[Tensor], round_index: int, comm: Any, refresh: bool = False) -> None:
        replica, _ = self.state.split(work)
        for delta, anchor, mine in zip(self._delta, self.anchor, replica):
            delta.copy_(anchor).sub_(mine)  # Δ_i = θ_i − x_i, in fp32
        row = mixing_row(self.topology, comm.rank, comm.world_size, round_index, self.seed)
        if self.is_refresh(round_index):
            self.anchors.average_round(self.anchor, comm)
        elif row.send_to or row.recv_from:
            self.anchors.graph_round(self.anchor, row, comm)
        if row.send_to or row.recv_from:
            self.pseudo_gradients.graph_round(self._delta, row, comm)
        for anchor, delta in self._params:  # θ̄ and Δ̄ now
            anchor.grad = delta.to(anchor.dtype)
        self.outer.step()
        for anchor, delta in self._params:
            anchor.grad = None
        for anchor, delta in self._buffers:
            anchor.sub_(delta.to(anchor.dtype))
        torch._foreach_copy_(replica, self.anchor)
        comm.count_round()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [buffer.clone() for buffer in self.anchor], "reference": self.anchors.state_dict(),
                "pseudo_gradients": self.pseudo_gradients.state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors.load_state_dict(state["reference"])
        self.pseudo_gradients.load_state_dict(state["pseudo_gradients"])
        for mine, saved in zip(self.anchor, state["anchor"]):
            mine.copy_(saved)
        self.outer.load_state_dict(state["outer"])
