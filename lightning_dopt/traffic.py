"""Bytes a rank sends, computed from the options alone: the formulas that ``comm_stats`` must match.

The docs, the tests (against ``comm_stats`` on virtual ranks) and the benchmarks (their "formula" columns) all use
these functions, so a formula is written once. Sizes are for an fp32 replica: ``numel`` values of parameters plus
floating-point buffers (the round state). Bytes are what ``CountedCommunicator`` charges: a ring all-reduce of ``b``
bytes costs ``2(n−1)/n · b`` per rank; a point-to-point exchange costs exactly the bytes sent.

Per rank, with ``P`` parameter values in ``m`` tensors, ``B`` floating-point buffer values, ``n`` ranks:

* warm-up step (gradient mean, :class:`~lightning_dopt.gradients.GradientAverager`): ``ring(4(P + m))``, plus
  ``ring(4B)`` for the buffers;
* graph round of an fp32 replica: ``4·numel`` to each rank of this rank's ``send_to`` (random pairs: 1 peer, 0 for
  the rank that rests at an odd count; ``one_peer_exponential``: 1; ``ring``: 2; …);
* ``complete`` fp32 round: ``ring(4·numel)``;
* compressed graph round: ``payload_bytes(numel)`` to each peer; compressed exact-mean round (every
  ``anchor_interval``-th round, every ``complete`` round, and any refresh the noise check asks for): a reduce-scatter
  of encoded chunks to the ``n − 1`` other ranks, then this rank's encoded mean chunk to the ``n − 1`` others
  (chunks aligned to the codec's block size): about ``ring(payload_bytes(numel))``.

* outer optimizer, ``complete``: ``ring(4P)`` (the pseudo-gradient) plus ``ring(4B)`` (the buffers) per round;
* outer optimizer, graph topology: ``4·(2P + B)`` (parameters, anchor, buffers) to each rank of ``send_to``;
* outer optimizer with a codec (``complete``): the compressed exact-mean round of the whole state, every round;
* outer optimizer with a codec, graph topology: ``2·payload_bytes(numel)`` (anchor, pseudo-gradient) to each rank of
  ``send_to``; every ``anchor_interval``-th round the anchor's part is a compressed exact-mean round instead;
* ``hierarchy="node"`` with ``g`` ranks per node: local rank ``k`` sends the round of its shard ``k`` of the state
  (:func:`~lightning_dopt.hierarchy.shard_bounds`) among the ``n / g`` nodes; the traffic inside a node (purpose
  ``node``: gradient means every step, shard broadcasts at rounds) is not counted here.

Not covered (their rounds exist, their formulas are not written here yet): AdaCons (gradient or pseudo-gradient
combination), preconditioner statistics mixed with the replica, replicas with bf16/fp16 tensors.
Control messages (a few floats of flags per round, the stop/pace blocks) are purpose ``control`` and not counted here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from lightning_dopt.comm import ring_allreduce_bytes
from lightning_dopt.compress import Codec
from lightning_dopt.compressed_rounds import aligned_chunks
from lightning_dopt.hierarchy import NodeLayout, shard_bounds
from lightning_dopt.options import Options
from lightning_dopt.topology import mixing_row

FP32 = 4


def gradient_mean_bytes(param_numel: int, param_tensors: int, world_size: int) -> int:
    """One warm-up step's gradient all-reduce per rank: the gradients and one presence flag per tensor."""
    return ring_allreduce_bytes(FP32 * (param_numel + param_tensors), world_size)


def compressed_mean_bytes(numel: int, codec: Codec, rank: int, world_size: int) -> int:
    """Bytes ``rank`` sends in a compressed exact-mean round: the reduce-scatter of its chunks for the ``n − 1`` other
    owners (``codec``), then the all-gather of its own chunk's mean to them (``codec.mean_codec``)."""
    chunks = aligned_chunks(numel, getattr(codec, "block_size", 1), world_size)
    chunk = [codec.payload_bytes(stop - start) if stop > start else 0 for start, stop in chunks]
    start, stop = chunks[rank]
    mean = codec.mean_codec.payload_bytes(stop - start) if stop > start else 0
    return sum(chunk[peer] for peer in range(world_size) if peer != rank) + (world_size - 1) * mean


def round_bytes(numel: int, rank: int, world_size: int, round_index: int, topology: str, seed: int = 0,
                codec: Codec | None = None, anchor_interval: int = 16, refresh: bool = False,
                outer_numel: int = 0) -> int:
    """Bytes ``rank`` sends in round ``round_index`` for ``numel`` fp32 values of round state (module docstring);
    ``outer_numel`` > 0: an outer optimizer over these many parameter values (the rest of ``numel`` are buffers)."""
    if world_size < 2:
        return 0
    if codec is not None and outer_numel and topology == "complete":  # one compressed exact mean of the whole state
        return compressed_mean_bytes(numel, codec, rank, world_size)
    if codec is not None and outer_numel:  # anchors (or their compressed mean) and pseudo-gradients to the neighbours
        peers = len(mixing_row(topology, rank, world_size, round_index, seed).send_to)
        anchors = compressed_mean_bytes(numel, codec, rank, world_size) \
            if round_index % anchor_interval == anchor_interval - 1 else peers * codec.payload_bytes(numel)
        return anchors + peers * codec.payload_bytes(numel)
    if outer_numel and topology == "complete":  # the pseudo-gradient, then the buffers
        return ring_allreduce_bytes(FP32 * outer_numel, world_size) + \
            ring_allreduce_bytes(FP32 * (numel - outer_numel), world_size)
    if outer_numel:
        peers = len(mixing_row(topology, rank, world_size, round_index, seed).send_to)
        return peers * FP32 * (numel + outer_numel)
    if codec is not None and (refresh or topology == "complete" or round_index % anchor_interval == anchor_interval - 1):
        return compressed_mean_bytes(numel, codec, rank, world_size)
    if codec is None and topology == "complete":
        return ring_allreduce_bytes(FP32 * numel, world_size)
    peers = len(mixing_row(topology, rank, world_size, round_index, seed).send_to)
    return peers * (FP32 * numel if codec is None else codec.payload_bytes(numel))


@dataclass(frozen=True)
class Traffic:
    """Bytes sent per rank over a run, by purpose (mean over ranks), and the count of rounds."""

    warmup: float
    round: float
    rounds: int

    @property
    def total(self) -> float:
        return self.warmup + self.round


def expected_traffic(options: Options, param_numel: int, param_tensors: int, world_size: int, steps: int,
                     buffer_numel: int = 0, refreshed_rounds: Collection[int] = (), ranks_per_node: int = 1) -> Traffic:
    """Warm-up and round bytes per rank (mean over ranks) of ``steps`` optimizer steps with ``options``.

    Rounds follow the engine's schedule: ``warmup_steps`` gradient-mean steps, then a round after every
    ``local_steps`` steps. Compressed runs refresh their anchor every ``anchor_interval``-th round and wherever the
    noise check asks (``anchor_tolerance``): pass those round indices as ``refreshed_rounds``; with
    ``anchor_tolerance=None`` there are none. ``ranks_per_node``: the ranks sharing a replica under
    ``hierarchy="node"``. Raises ``ValueError`` for the options whose formulas are not written."""
    if options.aggregation != "mean" or options.scaling is not None:
        raise ValueError("expected_traffic covers mean aggregation without scaling "
                         f"(got aggregation={options.aggregation!r}, scaling={options.scaling!r})")
    state_numel = param_numel + (buffer_numel if options.average_buffers else 0)
    warmup_steps = min(options.warmup_steps, steps)
    warmup = warmup_steps * gradient_mean_bytes(param_numel, param_tensors, world_size)
    if options.average_buffers and buffer_numel:
        warmup += warmup_steps * ring_allreduce_bytes(FP32 * buffer_numel, world_size)
    rounds = (steps - warmup_steps) // options.local_steps
    codec = options.codec
    refreshed = set(refreshed_rounds)
    outer_numel = param_numel if options.outer_optimizer is not None else 0
    g = ranks_per_node if options.hierarchy == "node" else 1
    layout = NodeLayout(world_size, g)  # g = 1: every rank its own replica, the whole state its shard
    total = sum(round_bytes(stop - start, rank // g, layout.nodes, index, options.topology, options.seed, codec,
                            options.anchor_interval, index in refreshed, outer_numel)
                for index in range(rounds) for rank in range(world_size)
                for start, stop in [shard_bounds(state_numel, g)[rank % g]])
    return Traffic(warmup=float(warmup), round=total / world_size, rounds=rounds)
