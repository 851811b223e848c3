"""``hierarchy="node"``: one replica per node, gossip between nodes, the exchange split across the node's ranks.

A cluster of ``N`` nodes with ``g`` ranks (GPUs) each, ranks numbered node by node (rank ``= node · g + local``, as
torchrun and SLURM number them). Instead of ``N · g`` replicas drifting apart:

* **Inside a node** the ``g`` ranks keep one replica: every optimizer step averages their gradients (and, after the
  step, their floating-point buffers such as BatchNorm statistics) over the node's process group, so they stay
  identical. Cost per rank and step: a ring all-reduce of the gradients over fast intra-node links,
  ``2(g−1)/g · 4P`` bytes for ``P`` parameters.
* **Between nodes** the node replicas take local steps and meet at rounds of the chosen topology over the ``N``
  nodes (the mixing matrix of :mod:`lightning_dopt.topology` with ``n = N``).
* **Split exchange**: the packed round state (each dtype group's flat buffer) is cut into ``g`` contiguous shards;
  local rank ``k`` runs the round algorithm on shard ``k`` only, with local rank ``k`` of the other nodes (its
  *cross* process group), then each rank broadcasts its mixed shard to the node's other ranks. So a node sends its
  model (or its compressed size) over ``g`` links in parallel, ``1/g`` each, and receives the other shards over
  the fast links: per rank and round, ``P/g`` bytes (codec: its payload of ``P/g`` values) to each out-neighbour
  node, and ``(g−1)/g · P`` bytes received inside the node.

The round algorithms are unchanged: :class:`NodeSplitRound` hands a :class:`~lightning_dopt.rounds.Round` built by
:func:`~lightning_dopt.replica.make_round` a :class:`~lightning_dopt.replica.RoundState` over the shard (1-D views of
the module's tensors, :func:`shard_views`) and the cross communicator. Every rank of a node runs the same schedule
(the mixing matrix depends on the node index only), so the ranks of a node pick the same partner node.

What is preserved: the ranks of a node are bitwise identical after every step (same averaged gradients, same
optimizer state, same buffers, and every shard is mixed by one rank and copied to the others), and across nodes the
round keeps the mean of the node replicas as the flat round keeps the mean of the ranks' (exactly for fp32 mixing up
to rounding, in expectation for unbiased codecs). The exact average over all ranks equals the average of the node
replicas, so evaluation and the final model need no change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dopt.comm import CommStats, Communicator, FlatState
from lightning_dopt.rounds import Round

HIERARCHIES = ("flat", "node")
"""``flat``: every rank is a gossip peer. ``node``: one replica per node (see the module docstring)."""

SHARD_ALIGN = 4096
"""Shard boundaries fall on multiples of this many values (whole codec blocks for every block size dividing it)."""


def check_hierarchy(hierarchy: object) -> str:
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"unknown hierarchy {hierarchy!r}; valid choices: {', '.join(HIERARCHIES)}")
    return hierarchy  # type: ignore[return-value]


@dataclass(frozen=True)
class NodeLayout:
    """Which ranks form a node: ``world_size`` ranks, ``local_world_size`` per node, numbered node by node."""

    world_size: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(f"hierarchy='node' needs the same number of ranks on every node: {self.world_size} ranks "
                             f"do not split into nodes of {self.local_world_size}. Launch the same number of processes "
                             "(devices) on every node, or use hierarchy='flat'")

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    def node_groups(self) -> list[list[int]]:
        """The ranks of each node, node by node (the intra-node process groups)."""
        g = self.local_world_size
        return [list(range(node * g, (node + 1) * g)) for node in range(self.nodes)]

    def cross_groups(self) -> list[list[int]]:
        """For each local rank ``k``, local rank ``k`` of every node, ordered by node (the inter-node groups)."""
        g = self.local_world_size
        return [list(range(local, self.world_size, g)) for local in range(g)]


def new_node_comms(layout: NodeLayout, stats: CommStats, liveness: Any = None, timeout: timedelta | None = None,
                   counts_time: bool = True) -> NodeComms:
    """New node and cross-node process groups for ``layout`` and this rank's communicators on them, counted in
    ``stats``. Collective: every rank calls it, in the same order (``torch.distributed`` creates every subgroup on
    every rank). ``counts_time=False`` for a background round's communicators."""
    node_group, _ = dist.new_subgroups_by_enumeration(layout.node_groups(), timeout=timeout)
    cross_group, _ = dist.new_subgroups_by_enumeration(layout.cross_groups(), timeout=timeout)
    return NodeComms(*(Communicator(group, stats=stats, liveness=liveness, counts_time=counts_time)
                       for group in (node_group, cross_group)))


@dataclass
class NodeComms:
    """The two communicators of one rank under ``hierarchy="node"``: ``node`` over its node's ranks (group rank =
    local rank) and ``cross`` over local rank ``k`` of every node (group rank = node index)."""

    node: Any
    cross: Any

    @property
    def local_rank(self) -> int:
        return self.node.rank

    @property
    def local_world_size(self) -> int:
        return self.node.world_size


def shard_bounds(numel: int, parts: int, align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``parts`` contiguous shards of ``numel`` values: equal numbers of ``align``-value
    blocks, the last shards shorter or empty."""
    blocks = -(-numel // align)
    per_part = -(-blocks // parts)
    return [(min(k * per_part * align, numel), min((k + 1) * per_part * align, numel)) for k in range(parts)]


def shard_views(state: FlatState, part: int, parts: int) -> list[Tensor]:
    """1-D views of ``state``'s tensors covering shard ``part`` of each of its flat buffers (:func:`shard_bounds`),
    in buffer order. Every group keeps at least one (possibly empty) view, so ``FlatState(shard_views(...))`` has
    the same groups as ``state`` and its buffers are exactly the shards. Raises ``ValueError`` for a tensor that
    is not contiguous (a shard is a view of its memory)."""
    views: list[Tensor] = []
    for _, tensors, _ in state.views(state.new_buffers()):
        numel = sum(t.numel() for t in tensors)
        start, stop = shard_bounds(numel, parts)[part]
        offset, group = 0, []
        for tensor in tensors:
            if not tensor.is_contiguous():
                raise ValueError(f"hierarchy='node' splits the replica into views of its tensors and needs them "
                                 f"contiguous; found a {tuple(tensor.shape)} tensor with strides {tensor.stride()} "
                                 "(e.g. channels_last). Make the module's parameters contiguous, or use "
                                 "hierarchy='flat'")
            low, high = max(start - offset, 0), min(stop - offset, tensor.numel())
            if low < high:
                group.append(tensor.detach().view(-1)[low:high])
            offset += tensor.numel()
        views.extend(group or [tensors[0].detach().view(-1)[:0]])
    return views


class NodeSplitRound(Round):
    """A round between nodes with the exchange split across the node's ranks (module docstring).

    ``inner`` is the round algorithm over this rank's shard (built on the shard's round state and the cross
    communicator); ``bounds[k]`` are shard ``k``'s ``[start, stop)`` in each flat buffer of the packed round state.
    :meth:`mix_` takes the packed round state of the whole replica and a :class:`NodeComms`: the inner round mixes
    this rank's shard in place, then every shard is broadcast from its rank to the node (``node`` purpose).
    Anchors, noise estimates and state are the inner round's (each rank checkpoints its shard's)."""

    def __init__(self, inner: Round, bounds: Sequence[Sequence[tuple[int, int]]], local_rank: int) -> None:
        self.inner = inner
        self.bounds = [list(part) for part in bounds]
        self.local_rank = local_rank

    def _shard(self, work: Sequence[Tensor], part: int) -> list[Tensor]:
        return [buffer[start:stop] for buffer, (start, stop) in zip(work, self.bounds[part])]

    @torch.no_grad()
    def mix_(self, work: list[Tensor], round_index: int, comm: NodeComms, refresh: bool = False) -> None:
        self.inner.mix_(self._shard(work, self.local_rank), round_index, comm.cross, refresh)
        for part in range(len(self.bounds)):
            shard = [piece for piece in self._shard(work, part) if piece.numel()]
            if shard:
                comm.node.broadcast_(shard, src=part, purpose="node")

    def is_refresh(self, round_index: int, requested: bool = False) -> bool:
        return self.inner.is_refresh(round_index, requested)

    def noise_ratio(self) -> Tensor | float:
        return self.inner.noise_ratio()

    def refresh_requested(self, flags: Tensor) -> bool:
        return self.inner.refresh_requested(flags)

    def reset_anchor_(self) -> None:
        self.inner.reset_anchor_()

    def state_dict(self) -> dict[str, Any] | None:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.inner.load_state_dict(state)
