"""``N`` virtual ranks in one process: a communicator with :class:`~lightning_dopt.comm.Communicator`'s interface whose
ranks are threads of this process instead of processes on a network.

Every algorithm object (rounds, codecs, AdaCons, gradient averaging, pacing flags) talks to its ranks only through a
communicator, so the very same objects run unchanged on :class:`InProcessCommunicator`: fast unit tests without process
groups, and :class:`~lightning_dopt.simulation.SimulatedStrategy`'s ``N`` workers on one device.

Semantics, matching ``torch.distributed`` as the algorithms use it:

* collectives (``all_reduce_``, ``broadcast_``, ``gather_stats``) are called by every rank in the same order; each is
  two barrier waits (everyone has deposited; everyone has read). Sums are accumulated in rank order, so every rank
  gets bitwise the same result (in at least fp32, as :meth:`Communicator.all_reduce_` does for bf16/fp16);
* point-to-point messages (``exchange``, ``exchange_each``) go through one FIFO queue per ordered pair of ranks: a
  send never blocks, a receive waits for the matching message, and messages between two ranks match in posting order;
* byte counters are those of :class:`~lightning_dopt.comm.Communicator` (ring all-reduce cost for collectives, exact
  sizes for point-to-point), so a simulated run reports what a real one would send;
* every wait is bounded by ``timeout``; a rank that raises aborts the group (:meth:`InProcessGroup.abort`), so the
  others fail at once with :class:`~lightning_dopt.comm.PeerFailure` naming it instead of waiting.

Cost: memory copies only (a received message is a clone of the sent tensor); no serialization.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_dopt.comm import PURPOSES, CommStats, CountedCommunicator, PeerFailure, is_narrow_float, tensor_nbytes

T = TypeVar("T")
_POLL_S = 0.05  # how often a blocked receive looks whether the group was aborted


def _settle(tensors: Any) -> None:
    """On CUDA, wait until the current stream has written ``tensors``: another rank's thread reads them on its own
    stream (threads of one process share the device but not the stream order). Nothing to do on CPU."""
    devices = {tensor.device for tensor in tensors if isinstance(tensor, Tensor) and tensor.is_cuda}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()


class InProcessGroup:
    """The shared meeting point of ``world_size`` virtual ranks (threads of this process).

    Args:
        world_size: number of virtual ranks, ≥ 1.
        timeout: bound in seconds on every wait (a barrier or a receive).
        device: where control tensors (flags, gathered counters) live.
    """

    def __init__(self, world_size: int, timeout: float = 60.0, device: torch.device | str = "cpu") -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0; got {timeout!r}")
        self.world_size = world_size
        self.timeout = float(timeout)
        self.device = torch.device(device)
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Any] = [None] * world_size
        self._mailboxes = {(src, dst): queue.SimpleQueue() for src in range(world_size) for dst in range(world_size)}
        self._children: list[InProcessGroup] = []
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._pool: ThreadPoolExecutor | None = None

    def communicators(self) -> list[InProcessCommunicator]:
        """One communicator per virtual rank, in rank order (each with its own counters)."""
        return [InProcessCommunicator(self, rank) for rank in range(self.world_size)]

    def abort(self, reason: str) -> None:
        """Wake every rank waiting in this group (and its background groups) with a :class:`PeerFailure`."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
            children = list(self._children)
        self._barrier.abort()
        for child in children:
            child.abort(reason)

    def child(self, index: int) -> InProcessGroup:
        """The ``index``-th background group (created on first request; every rank asks in the same order)."""
        with self._lock:
            while len(self._children) <= index:
                self._children.append(InProcessGroup(self.world_size, self.timeout, self.device))
            return self._children[index]

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """``[fn(0), …, fn(world_size − 1)]``, each in its own thread, concurrently (collectives need every rank
        running). Every wait inside is bounded by ``timeout``; the first exception aborts the group (the other ranks
        fail at once) and is re-raised here, preferring the rank's own error over the failures it caused. Threads
        are kept for the next call."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.world_size, thread_name_prefix="dopt-virtual-rank")
        futures = [self._pool.submit(self._run_rank, fn, rank) for rank in range(self.world_size)]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(future.done() and future.exception() is not None for future in futures):
            self.abort("another rank failed")
            wait(futures, timeout=self.timeout)
            errors = [future.exception() for future in futures if future.done() and future.exception() is not None]
            primary = [error for error in errors if not isinstance(error, PeerFailure)]
            raise (primary or errors)[0]
        return [future.result() for future in futures]

    def _run_rank(self, fn: Callable[[int], T], rank: int) -> T:
        try:
            return fn(rank)
        except BaseException as error:
            if not isinstance(error, PeerFailure):
                self.abort(f"rank {rank} raised {type(error).__name__}: {error}")
            raise

    def close(self) -> None:
        """Stop the worker threads of :meth:`run` (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---------------------------------------------------------------------------------- primitives
    def _wait(self, rank: int, operation: str) -> None:
        """Barrier wait; on CUDA this rank's stream has finished its reads and writes before (:func:`_settle`)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            reason = self._failure or f"not every rank joined within {self.timeout:.0f} s"
            raise PeerFailure(f"rank {rank}: {operation} failed: {reason}") from None

    def _collective(self, rank: int, value: Any, operation: str) -> list[Any]:
        """Every rank deposits ``value``; returns all ranks' values in rank order (collective)."""
        _settle(value)
        self._slots[rank] = value
        self._wait(rank, operation)
        return list(self._slots)

    def _post(self, src: int, dst: int, tensor: Tensor) -> None:
        message = tensor.detach().clone()
        _settle([message])
        self._mailboxes[(src, dst)].put(message)

    def _take(self, src: int, dst: int, operation: str) -> Tensor:
        deadline = time.monotonic() + self.timeout
        mailbox = self._mailboxes[(src, dst)]
        while True:
            if self._failure is not None:
                raise PeerFailure(f"rank {dst}: {operation} from rank {src} failed: {self._failure}")
            try:
                return mailbox.get(timeout=_POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise PeerFailure(f"rank {dst}: {operation} from rank {src} received nothing within "
                                      f"{self.timeout:.0f} s; the partner is stuck or gone") from None


class InProcessCommunicator(CountedCommunicator):
    """A virtual rank's communicator: :class:`~lightning_dopt.comm.Communicator`'s interface and byte accounting over
    an :class:`InProcessGroup` (see the module docstring)."""

    liveness = None

    def __init__(self, group: InProcessGroup, rank: int, stats: CommStats | None = None,
                 counts_time: bool = True) -> None:
        if not 0 <= rank < group.world_size:
            raise ValueError(f"rank must be in [0, {group.world_size}); got {rank!r}")
        super().__init__(stats, counts_time)
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self._backgrounds = 0

    @property
    def device(self) -> torch.device:
        return self.group.device

    def start_liveness(self, prefix: str, interval: float = 1.0) -> None:
        """Nothing to do: a virtual rank that fails aborts its group, which names it."""

    def background(self, timeout: timedelta | None = None) -> InProcessCommunicator:
        """A communicator on a separate group over the same virtual ranks, sharing these counters (for a background
        round thread). Every rank calls it in the same order. Its waits are bounded by the group's timeout (the
        ``timeout`` argument is accepted for interface parity with ``Communicator.background``)."""
        child = self.group.child(self._backgrounds)
        self._backgrounds += 1
        return InProcessCommunicator(child, self.rank, stats=self.stats, counts_time=False)

    @contextmanager
    def guarded(self, operation: str, purpose: str, peers: Sequence[int] | None) -> Iterator[None]:
        """Failures are already :class:`PeerFailure`; kept for interface parity with ``Communicator``."""
        yield

    @torch.no_grad()
    def all_reduce_(self, tensors: Sequence[Tensor], purpose: str, op: str = "mean") -> None:
        """In-place all-reduce with ``op`` in {"mean", "sum", "max", "min"}; sums in rank order, in at least fp32."""
        if op not in ("mean", "sum", "max", "min"):
            raise ValueError(f"unknown op {op!r}; valid choices: mean, sum, max, min")
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}; valid choices: {', '.join(PURPOSES)}")
        start = time.perf_counter()
        everyone = self.group._collective(self.rank, list(tensors), "all-reduce")
        results = []
        for index, tensor in enumerate(tensors):
            contributions = [ranks_tensors[index] for ranks_tensors in everyone]
            if op in ("max", "min"):
                stacked = torch.stack([c.to(tensor.device) for c in contributions])
                results.append(stacked.amax(0) if op == "max" else stacked.amin(0))
                continue
            total = contributions[0].to(tensor.device, torch.float32 if is_narrow_float(tensor) else tensor.dtype,
                                        copy=True)
            for contribution in contributions[1:]:
                total += contribution.to(tensor.device)
            results.append(total.div_(self.world_size) if op == "mean" else total)
        self.group._wait(self.rank, "all-reduce")  # everyone has read every contribution
        for tensor, result in zip(tensors, results):
            tensor.copy_(result)
        self._record_all_reduce(purpose, sum(tensor_nbytes(r) for r in results), len(tensors),
                                time.perf_counter() - start)

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[Tensor], src: int, purpose: str) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s values."""
        start = time.perf_counter()
        everyone = self.group._collective(self.rank, list(tensors), "broadcast")
        if self.rank != src:
            for tensor, source in zip(tensors, everyone[src]):
                tensor.copy_(source)
        self.group._wait(self.rank, "broadcast")
        self._record_broadcast(purpose, tensors, src, time.perf_counter() - start)

    @torch.no_grad()
    def exchange_each(self, outgoing: Sequence[tuple[int, Sequence[Tensor]]],
                      incoming: Sequence[tuple[int, Sequence[Tensor]]], purpose: str) -> None:
        """Point-to-point round: post every outgoing tensor, then fill every incoming buffer (matched in posting
        order per pair of ranks). Cost: exactly the bytes of the tensors sent and received."""
        start = time.perf_counter()
        for peer, tensors in outgoing:
            for tensor in tensors:
                if tensor.numel():
                    self.group._post(self.rank, peer, tensor)
        for peer, tensors in incoming:
            for buffer in tensors:
                if not buffer.numel():
                    continue
                message = self.group._take(peer, self.rank, "exchange")
                if message.shape != buffer.shape or message.dtype != buffer.dtype:
                    raise PeerFailure(f"rank {self.rank}: exchange from rank {peer} got a {message.dtype} tensor of "
                                      f"shape {tuple(message.shape)} for a {buffer.dtype} buffer of shape "
                                      f"{tuple(buffer.shape)}: the two ranks posted different messages")
                buffer.copy_(message)
                _settle([buffer])  # before the message's memory is freed for reuse
        self._record_exchange(purpose, outgoing, incoming, time.perf_counter() - start)
