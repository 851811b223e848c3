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

For a sum or mean of bf16/fp16 tensors ``b`` is the size of their fp32 copy, which is what travels (sums are accumulated
in fp32). Collective sizes are the standard bandwidth-optimal costs (what DDP's ring all-reduce pays); point-to-point
sizes are exact. ``seconds`` is host wall time the training loop spent inside these calls (on CUDA the kernels are
asynchronous, so it measures launch and wait, not device transfer time); a communicator used from a background thread
does not count its time (the training loop records how long it waited for that thread).

Failures: a call that fails (a peer process crashed or was killed, or the process group's timeout expired)
raises :class:`PeerFailure`, whose message names this rank, the operation and its peers, and, from
:class:`Liveness` heartbeats kept in the rendezvous store, which ranks stopped beating or reported an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


PURPOSES = ("start", "warmup", "aggregate", "round", "node", "eval", "monitor", "checkpoint", "control", "final")
"""What a payload was for: ``start`` (initial broadcast), ``warmup`` (DDP-style gradient averaging),
``aggregate`` (AdaCons gradient combination),
``round`` (synchronization rounds; between nodes under ``hierarchy="node"``), ``node`` (inside a node under
``hierarchy="node"``: the per-step gradient and buffer means and the re-assembly of the shards mixed at a round),
``eval`` (consensus model for evaluation), ``monitor`` (consensus distance),
``checkpoint`` (averaged model for the main checkpoint file), ``control`` (small bookkeeping messages),
``final`` (the exact average at the end of fit)."""
TRAINING_PURPOSES = ("warmup", "aggregate", "round", "node")
"""The purposes that replace DDP's gradient all-reduce: what ``CommStats.training_bytes_sent`` counts."""


@dataclass
class CommStats:
    """Cumulative communication counters of one rank."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    rounds: int = 0
    seconds: float = 0.0
    bytes_sent_by_purpose: dict[str, int] = field(default_factory=dict)

    @property
    def training_bytes_sent(self) -> int:
        """Bytes sent for training itself (:data:`TRAINING_PURPOSES`: warm-up, gradient aggregation, rounds, and
        the intra-node traffic of ``hierarchy="node"``)."""
        return sum(self.bytes_sent_by_purpose.get(purpose, 0) for purpose in TRAINING_PURPOSES)

    @property
    def intra_node_bytes_sent(self) -> int:
        """Bytes sent inside a node under ``hierarchy="node"`` (the ``node`` purpose; 0 otherwise)."""
        return self.bytes_sent_by_purpose.get("node", 0)

    def record(self, purpose: str, sent: int, received: int, messages: int, seconds: float) -> None:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}; valid choices: {', '.join(PURPOSES)}")
        with _STATS_LOCK:  # a background round thread may record concurrently with the training loop
            self._add(purpose, sent, received, messages, seconds)

    def _add(self, purpose: str, sent: int, received: int, messages: int, seconds: float) -> None:
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


_STATS_LOCK = threading.Lock()


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``payload_bytes``: ``2(n-1)/n * b``."""
    return 2 * (world_size - 1) * payload_bytes // world_size if world_size > 1 else 0


def tensor_nbytes(tensor: Tensor) -> int:
    """Bytes of a tensor's values."""
    return tensor.numel() * tensor.element_size()


def is_narrow_float(tensor: Tensor) -> bool:
    """A real floating-point dtype with fewer bits than fp32 (bf16, fp16, the fp8 types)."""
    return tensor.is_floating_point() and tensor.element_size() < 4


GLOO_CHUNK_BYTES = 1 << 20
"""Largest point-to-point message on gloo (:meth:`Communicator.exchange_each`)."""


def _pieces(tensor: Tensor, max_bytes: int | None) -> list[Tensor]:
    """``tensor`` as consecutive flat views of at most ``max_bytes`` bytes (``None``: the whole tensor); none for
    an empty tensor. A non-contiguous tensor is sent whole."""
    if not tensor.numel():
        return []
    if max_bytes is None or not tensor.is_contiguous() or tensor_nbytes(tensor) <= max_bytes:
        return [tensor]
    return list(tensor.view(-1).split(max(1, max_bytes // tensor.element_size())))


def _alternate(first: list[Any], second: list[Any]) -> list[Any]:
    """``first[0], second[0], first[1], second[1], …``, then the rest of the longer list."""
    merged = [item for pair in zip(first, second) for item in pair]
    shorter = min(len(first), len(second))
    return merged + first[shorter:] + second[shorter:]


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
        return [torch.empty(numel, dtype=self.tensors[indices[0]].dtype, device=self.tensors[indices[0]].device)
                for indices, numel in zip(self._groups, self.group_sizes)]

    @property
    def group_sizes(self) -> list[int]:
        """Values in each buffer of :meth:`new_buffers`."""
        return [sum(self.tensors[i].numel() for i in indices) for indices in self._groups]

    @property
    def group_count(self) -> int:
        """How many buffers :meth:`new_buffers` returns."""
        return len(self._groups)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.tensors)

    def views(self, buffers: Sequence[Tensor]) -> Iterable[tuple[list[int], list[Tensor], list[Tensor]]]:
        """Per buffer of this layout: the indices of its tensors, the tensors, and their views into the buffer."""
        for indices, buffer in zip(self._groups, buffers):
            tensors = [self.tensors[i] for i in indices]
            views = [view.view_as(t) for view, t in zip(buffer.split([t.numel() for t in tensors]), tensors)]
            yield indices, tensors, views

    @torch.no_grad()
    def pack(self, into: Sequence[Tensor]) -> Sequence[Tensor]:
        """Copy the tensors into the buffers ``into`` and return them."""
        for _, tensors, views in self.views(into):
            torch._foreach_copy_(views, tensors)
        return into

    @torch.no_grad()
    def unpack(self, source: Sequence[Tensor]) -> None:
        """Copy the buffers ``source`` back into the tensors, in place."""
        for _, tensors, views in self.views(source):
            torch._foreach_copy_(tensors, views)

    @torch.no_grad()
    def add_(self, source: Sequence[Tensor], scales: Sequence[float] | None = None) -> None:
        """Add the buffers ``source`` to the tensors, in place: ``x_k ← x_k + δ_k``, or ``x_k ← x_k + scales[k] · δ_k``
        with one factor per tensor (``source`` is then scaled in place)."""
        for indices, tensors, views in self.views(source):
            if scales is not None:
                torch._foreach_mul_(views, [float(scales[i]) for i in indices])
            torch._foreach_add_(tensors, views)


class PeerFailure(RuntimeError):
    """A collective or point-to-point call failed: a peer crashed, was killed, or the timeout expired."""


class Liveness:
    """Heartbeats in the rendezvous store, so a rank whose communication fails can say which peer is gone.

    A daemon thread writes ``time.time()`` under ``<prefix>/beat/<rank>`` every ``interval`` seconds; a rank that
    raises records its error under ``<prefix>/error/<rank>`` (:meth:`report_error`). :meth:`diagnose` reads both
    twice, ``2.5 · interval`` apart, and names the ranks that reported an error or stopped beating (killed,
    out of memory, ...). Cost: one small store write per rank and interval; nothing on the data path.
    """

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str, interval: float = 1.0) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.interval = interval
        self._stopped = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"dopt-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.store.set(f"{self.prefix}/beat/{self.rank}", repr(time.time()))

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the store's host (rank 0) is gone: nothing left to report to
                return

    def stop(self) -> None:
        self._stopped.set()

    def report_error(self, message: str) -> None:
        """Record why this rank is failing (best effort: the store may already be unreachable)."""
        try:
            self.store.set(f"{self.prefix}/error/{self.rank}", message[:2000])
        except Exception:
            pass

    def _read(self, kind: str, rank: int) -> str | None:
        key = f"{self.prefix}/{kind}/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def diagnose(self) -> str:
        """One sentence naming the failed ranks (waits ``2.5 · interval`` to see whose heartbeat stopped)."""
        try:
            first = {rank: self._read("beat", rank) for rank in range(self.world_size)}
            time.sleep(2.5 * self.interval)
            second = {rank: self._read("beat", rank) for rank in range(self.world_size)}
            errors = {rank: self._read("error", rank) for rank in range(self.world_size) if rank != self.rank}
        except Exception:
            return "rank 0 (which hosts the rendezvous store) is unreachable: it probably crashed or was killed"
        failed = [f"rank {rank} raised: {message}" for rank, message in errors.items()
                  if message is not None and not message.startswith(_SECONDARY)]
        silent = [rank for rank in range(self.world_size) if rank != self.rank and errors.get(rank) is None
                  and first[rank] == second[rank]]
        if silent:
            failed.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped without an "
                          "error (killed, e.g. SIGKILL or out of memory)")
        return "; ".join(failed) if failed else "no peer reported an error and all heartbeats are alive (timeout?)"


_SECONDARY = "[secondary] "
"""Prefix of error reports from ranks that failed only because a peer did (ignored when naming the culprit)."""


class CountedCommunicator:
    """What every communicator shares: this rank's :class:`CommStats` and the byte accounting of the module docstring,
    the exchange helper, round counting and gathering the counters. Subclasses move the data: :class:`Communicator`
    over ``torch.distributed``, :class:`~lightning_dopt.inprocess.InProcessCommunicator` between threads.

    ``counts_time=False`` for a communicator driven from a background thread: its calls do not add to
    ``stats.seconds``, which measures how long the training loop itself was blocked.
    """

    rank: int
    world_size: int

    def __init__(self, stats: CommStats | None = None, counts_time: bool = True) -> None:
        self.stats = stats if stats is not None else CommStats()
        self.counts_time = counts_time

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def all_reduce_(self, tensors: Sequence[Tensor], purpose: str, op: str = "mean") -> None:
        raise NotImplementedError

    def exchange_each(self, outgoing: Sequence[tuple[int, Sequence[Tensor]]],
                      incoming: Sequence[tuple[int, Sequence[Tensor]]], purpose: str) -> None:
        raise NotImplementedError

    def _record(self, purpose: str, sent: int, received: int, messages: int, seconds: float) -> None:
        self.stats.record(purpose, sent, received, messages, seconds if self.counts_time else 0.0)

    def _record_all_reduce(self, purpose: str, payload: int, tensors: int, seconds: float) -> None:
        """A ring all-reduce of ``payload`` bytes: ``2(n-1)/n · payload`` sent and received."""
        moved = ring_allreduce_bytes(payload, self.world_size)
        self._record(purpose, moved, moved, tensors, seconds)

    def _record_broadcast(self, purpose: str, tensors: Sequence[Tensor], src: int, seconds: float) -> None:
        """``(n-1) · payload`` sent by the source, ``payload`` received by every other rank."""
        payload = sum(tensor_nbytes(t) for t in tensors)
        is_src = self.rank == src
        self._record(purpose, payload * (self.world_size - 1) if is_src else 0, 0 if is_src else payload,
                     len(tensors), seconds)

    def _record_exchange(self, purpose: str, outgoing: Sequence[tuple[int, Sequence[Tensor]]],
                         incoming: Sequence[tuple[int, Sequence[Tensor]]], seconds: float) -> None:
        """Exactly the bytes of the tensors sent and received; one message per non-empty tensor."""
        sent = sum(tensor_nbytes(t) for _, tensors in outgoing for t in tensors)
        received = sum(tensor_nbytes(t) for _, tensors in incoming for t in tensors)
        messages = sum(1 for _, tensors in (*outgoing, *incoming) for t in tensors if t.numel())
        self._record(purpose, sent, received, messages, seconds)

    def exchange(self, send: Sequence[Tensor], send_to: Sequence[int], recv: Sequence[Sequence[Tensor]],
                 recv_from: Sequence[int], purpose: str) -> None:
        """Send the same tensors ``send`` to every rank in ``send_to``; receive ``recv[k]`` from ``recv_from[k]``."""
        if len(recv) != len(recv_from):
            raise ValueError(f"got {len(recv)} receive buffers for {len(recv_from)} sources")
        self.exchange_each([(peer, send) for peer in send_to], list(zip(recv_from, recv)), purpose)

    def count_round(self) -> None:
        """Count one synchronization round (thread-safe)."""
        with _STATS_LOCK:
            self.stats.rounds += 1

    def gather_stats(self) -> list[CommStats]:
        """Every rank's :class:`CommStats`, in rank order (one small all-reduce, counted as ``control``)."""
        table = torch.zeros(self.world_size, 5 + len(PURPOSES), dtype=torch.float64, device=self.device)
        table[self.rank] = torch.tensor(self.stats.as_vector(), dtype=torch.float64)
        self.all_reduce_([table], purpose="control", op="sum")
        return [CommStats.from_vector(row) for row in table.tolist()]


class Communicator(CountedCommunicator):
    """Counted collectives and point-to-point exchanges on one process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None, stats: CommStats | None = None,
                 liveness: Liveness | None = None, counts_time: bool = True) -> None:
        super().__init__(stats, counts_time)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.liveness = liveness

    def start_liveness(self, prefix: str, interval: float = 1.0) -> None:
        """Start heartbeats in the default rendezvous store (every rank; used to name failed peers)."""
        self.liveness = Liveness(dist.distributed_c10d._get_default_store(), self.rank, self.world_size, prefix,
                                 interval)

    def background(self, timeout: timedelta | None) -> Communicator:
        """A communicator on a new process group over the same ranks, for a background thread, sharing these
        counters. Collective: every rank calls it, in the same order."""
        group = dist.new_group(backend=dist.get_backend(self.group), timeout=timeout)
        return Communicator(group, stats=self.stats, liveness=self.liveness, counts_time=False)

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @contextmanager
    def guarded(self, operation: str, purpose: str, peers: Sequence[int] | None) -> Iterator[None]:
        """Turn a backend error into a :class:`PeerFailure` naming this rank, the call and the failed peers."""
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as error:
            who = "all ranks" if peers is None else "rank" + ("s " if len(peers) > 1 else " ") + \
                ", ".join(map(str, peers))
            elapsed = time.perf_counter() - start
            diagnosis = self.liveness.diagnose() if self.liveness is not None else "no heartbeats (liveness off)"
            message = (f"rank {self.rank}: {operation} for '{purpose}' with {who} failed after {elapsed:.1f} s: "
                       f"{diagnosis}. Backend error: {str(error).splitlines()[0] if str(error) else error!r}")
            if self.liveness is not None:
                self.liveness.report_error(_SECONDARY + message)
            raise PeerFailure(message) from error

    def all_reduce_(self, tensors: Sequence[Tensor], purpose: str, op: str = "mean") -> None:
        """In-place all-reduce of each tensor with ``op`` in {"mean", "sum", "max", "min"}.

        Sums and means of floating-point tensors narrower than fp32 (bf16, fp16) are accumulated in fp32: the
        tensor is reduced as an fp32 copy and rounded back once. (The backends add in the tensor's own dtype, where
        an fp16 sum overflows above 65504, e.g. BatchNorm ``running_var`` times the ranks, and every bf16 addition
        rounds to 8 significant bits.) ``max``/``min`` are exact in any dtype and travel as they are.

        Cost per tensor: a ring all-reduce, ``2(n-1)/n`` times the bytes of what travels (twice a half-precision
        tensor's own bytes for a sum or mean) sent and received.
        """
        reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        start = time.perf_counter()
        payload = 0
        with self.guarded("all-reduce", purpose, None):
            for tensor in tensors:
                travelling = tensor.float() if op in ("mean", "sum") and is_narrow_float(tensor) else tensor
                dist.all_reduce(travelling, op=reduce_op, group=self.group)
                if op == "mean":
                    travelling.div_(self.world_size)
                if travelling is not tensor:
                    tensor.copy_(travelling)
                payload += tensor_nbytes(travelling)
        self._record_all_reduce(purpose, payload, len(tensors), time.perf_counter() - start)

    def broadcast_(self, tensors: Sequence[Tensor], src: int, purpose: str) -> None:
        """Overwrite ``tensors`` on every rank with the source rank's values (``src`` is a group rank)."""
        start = time.perf_counter()
        with self.guarded("broadcast", purpose, None if self.rank == src else [src]):
            for tensor in tensors:
                dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        self._record_broadcast(purpose, tensors, src, time.perf_counter() - start)

    def exchange_each(self, outgoing: Sequence[tuple[int, Sequence[Tensor]]],
                      incoming: Sequence[tuple[int, Sequence[Tensor]]], purpose: str) -> None:
        """Point-to-point round: send each ``(peer, tensors)`` of ``outgoing``, fill each of ``incoming``.

        All messages go in one ``batch_isend_irecv`` call and are waited for before returning. Messages between
        the same two ranks are matched in posting order, so both sides must list their tensors in the same order.
        On gloo each tensor travels as pieces of at most :data:`GLOO_CHUNK_BYTES`, sends and receives alternating:
        gloo moves one large message at a time per connection, so an exchange of two single messages runs at
        half duplex (measured in ``docs/benchmarks.md``, emulated cluster). Both sides cut a tensor at the same
        offsets, since a receive buffer has its partner's tensor's size.
        Cost: exactly the bytes of the outgoing tensors sent and of the incoming tensors received.
        """
        chunk = GLOO_CHUNK_BYTES if dist.get_backend(self.group) == "gloo" else None
        sends = [dist.P2POp(dist.isend, piece, self._global_rank(peer), self.group)
                 for peer, tensors in outgoing for tensor in tensors for piece in _pieces(tensor, chunk)]
        receives = [dist.P2POp(dist.irecv, piece, self._global_rank(peer), self.group)
                    for peer, tensors in incoming for tensor in tensors for piece in _pieces(tensor, chunk)]
        operations = _alternate(sends, receives)
        if not operations:
            return
        peers = sorted({peer for peer, _ in outgoing} | {peer for peer, _ in incoming})
        start = time.perf_counter()
        with self.guarded("exchange", purpose, peers):
            for request in dist.batch_isend_irecv(operations):
                request.wait()
        self._record_exchange(purpose, outgoing, incoming, time.perf_counter() - start)  # messages before cutting

    @property
    def device(self) -> torch.device:
        """Where this group's small control tensors live (the current CUDA device for NCCL)."""
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
