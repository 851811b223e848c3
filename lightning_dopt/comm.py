"""Communication: the only module that calls ``torch.distributed``.

Everything that crosses the wire goes through a :class:`Communicator`, which counts it in
:class:`CommStats`. Models travel as flat contiguous buffers (:class:`FlatState`), one message per
dtype/device group rather than one per tensor.

Byte accounting (per rank, ``b`` = payload bytes, ``n`` = world size):

==========================  =====================================  ===========================
operation                   counted as sent                        counted as received
==========================  =====================================  ===========================
``all_reduce``              ``2(n-1)/n * b`` (ring all-reduce)     ``2(n-1)/n * b``
``broadcast``               ``(n-1) * b`` on the source, else 0    ``b`` on every other rank
``exchange`` (point-to-p.)  ``b`` per destination (exact)          ``b`` per source (exact)
==========================  =====================================  ===========================

Collective sizes are the standard bandwidth-optimal costs (what DDP's ring all-reduce pays); point-to-point
sizes are exact. ``seconds`` is host wall time spent inside these calls (on CUDA the kernels are
asynchronous, so it measures launch and wait, not device transfer time).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


PURPOSES = ("start", "warmup", "aggregate", "round", "eval", "monitor", "checkpoint", "control", "final")
"""What a payload was for: ``start`` (initial broadcast), ``warmup`` (DDP-style gradient averaging),
``aggregate`` (AdaCons gradient combination),
``round`` (synchronization rounds), ``eval`` (consensus model for evaluation), ``monitor`` (consensus distance),
``checkpoint`` (averaged model for the main checkpoint file), ``control`` (small bookkeeping messages),
``final`` (the exact average at the end of fit)."""


@dataclass
class CommStats:
    """Cumulative communication counters of one rank."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    rounds: int = 0
    seconds: float = 0.0
    bytes_sent_by_purpose: dict[str, int] = field(default_factory=dict)

    def record(self, purpose: str, sent: int, received: int, messages: int, seconds: float) -> None:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}; valid choices: {', '.join(PURPOSES)}")
        self.bytes_sent += sent
        self.bytes_received += received
        self.messages += messages
        self.seconds += seconds
        self.bytes_sent_by_purpose[purpose] = self.bytes_sent_by_purpose.get(purpose, 0) + sent

    def as_vector(self) -> list[float]:
        """Fixed-length numeric form (the same layout on every rank), for gathering."""
        return [float(self.bytes_sent), float(self.bytes_received), float(self.messages), float(self.rounds),
                self.seconds] + [float(self.bytes_sent_by_purpose.get(p, 0)) for p in PURPOSES]

    @classmethod
    def from_vector(cls, vector: Sequence[float]) -> CommStats:
        sent, received, messages, rounds, seconds, *by_purpose = vector
        return cls(int(sent), int(received), int(messages), int(rounds), float(seconds),
                   {p: int(v) for p, v in zip(PURPOSES, by_purpose) if v})

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, dict(value) if isinstance(value, dict) else value)


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``payload_bytes``: ``2(n-1)/n * b``."""
    return 2 * (world_size - 1) * payload_bytes // world_size if world_size > 1 else 0


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class FlatState:
    """A fixed list of tensors laid out as one flat buffer per (dtype, device) group.

    ``pack(into)`` copies the tensors into a set of buffers, ``unpack(source)`` copies buffers back into the
    tensors in place (so optimizers and compiled graphs keep their references). The layout depends only on the
    tensor order, shapes and dtypes, so every rank with the same model has the same layout.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for index, tensor in enumerate(self.tensors):
            groups.setdefault((tensor.dtype, tensor.device), []).append(index)
        self._groups = list(groups.values())

    def new_buffers(self) -> list[Tensor]:
        """Fresh, uninitialised buffers with this layout (one per dtype/device group)."""
        buffers = []
        for indices in self._groups:
            first = self.tensors[indices[0]]
            numel = sum(self.tensors[i].numel() for i in indices)
            buffers.append(torch.empty(numel, dtype=first.dtype, device=first.device))
        return buffers

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors)

    def _views(self, buffers: Sequence[Tensor]) -> Iterable[tuple[list[Tensor], list[Tensor]]]:
        for indices, buffer in zip(self._groups, buffers):
            tensors = [self.tensors[i] for i in indices]
            views = [view.view_as(t) for view, t in zip(buffer.split([t.numel() for t in tensors]), tensors)]
            yield tensors, views

    @torch.no_grad()
    def pack(self, into: Sequence[Tensor]) -> Sequence[Tensor]:
        """Copy the tensors into the buffers ``into`` and return them."""
        for tensors, views in self._views(into):
            torch._foreach_copy_(views, tensors)
        return into

    @torch.no_grad()
    def unpack(self, source: Sequence[Tensor]) -> None:
        """Copy the buffers ``source`` back into the tensors, in place."""
        for tensors, views in self._views(source):
            torch._foreach_copy_(tensors, views)


class Communicator:
    """Counted collectives and point-to-point exchanges on one process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def all_reduce_(self, tensors: Sequence[Tensor], purpose: str, op: str = "mean") -> None:
        """In-place all-reduce of each tensor with ``op`` in {"mean", "sum", "max", "min"}.

        Cost per tensor: a ring all-reduce, ``2(n-1)/n`` times its bytes sent and received.
        """
        reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        start = time.perf_counter()
        for tensor in tensors:
            dist.all_reduce(tensor, op=reduce_op, group=self.group)
            if op == "mean":
                tensor.div_(self.world_size)
        payload = sum(_nbytes(t) for t in tensors)
        moved = ring_allreduce_bytes(payload, self.world_size)
        self.stats.record(purpose, moved, moved, len(tensors), time.perf_counter() - start)

    def broadcast_(self, tensors: Sequence[Tensor], src: int, purpose: str) -> None:
        """Overwrite ``tensors`` on every rank with the source rank's values (``src`` is a group rank)."""
        start = time.perf_counter()
        for tensor in tensors:
            dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        payload = sum(_nbytes(t) for t in tensors)
        is_src = self.rank == src
        self.stats.record(purpose, payload * (self.world_size - 1) if is_src else 0, 0 if is_src else payload,
                          len(tensors), time.perf_counter() - start)

    def exchange(self, send: Sequence[Tensor], send_to: Sequence[int], recv: Sequence[Sequence[Tensor]],
                 recv_from: Sequence[int], purpose: str) -> None:
        """Send the same tensors ``send`` to every rank in ``send_to``; receive ``recv[k]`` from ``recv_from[k]``."""
        if len(recv) != len(recv_from):
            raise ValueError(f"got {len(recv)} receive buffers for {len(recv_from)} sources")
        self.exchange_each([(peer, send) for peer in send_to], list(zip(recv_from, recv)), purpose)

    def exchange_each(self, outgoing: Sequence[tuple[int, Sequence[Tensor]]],
                      incoming: Sequence[tuple[int, Sequence[Tensor]]], purpose: str) -> None:
        """Point-to-point round: send each ``(peer, tensors)`` of ``outgoing``, fill each of ``incoming``.

        All messages go in one ``batch_isend_irecv`` call and are waited for before returning. Messages between
        the same two ranks are matched in posting order, so both sides must list their tensors in the same order.
        Cost: exactly the bytes of the outgoing tensors sent and of the incoming tensors received.
        """
        operations = [dist.P2POp(dist.isend, tensor, self._global_rank(peer), self.group)
                      for peer, tensors in outgoing for tensor in tensors if tensor.numel()]
        operations += [dist.P2POp(dist.irecv, tensor, self._global_rank(peer), self.group)
                       for peer, tensors in incoming for tensor in tensors if tensor.numel()]
        if not operations:
            return
        start = time.perf_counter()
        for request in dist.batch_isend_irecv(operations):
            request.wait()
        sent = sum(_nbytes(t) for _, tensors in outgoing for t in tensors)
        received = sum(_nbytes(t) for _, tensors in incoming for t in tensors)
        self.stats.record(purpose, sent, received, len(operations), time.perf_counter() - start)

    def gather_stats(self) -> list[CommStats]:
        """Every rank's :class:`CommStats`, in rank order (one small all-reduce, counted as ``control``)."""
        table = torch.zeros(self.world_size, 5 + len(PURPOSES), dtype=torch.float64, device=self._device())
        table[self.rank] = torch.tensor(self.stats.as_vector(), dtype=torch.float64)
        self.all_reduce_([table], purpose="control", op="sum")
        return [CommStats.from_vector(row) for row in table.tolist()]

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
