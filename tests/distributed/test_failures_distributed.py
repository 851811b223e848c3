"""Every wait in the communication layer is bounded and says why it ended (gloo, 2 CPU ranks, no Lightning).

One 2-rank run, two failures of rank 1, seen from rank 0:

* rank 1 stays alive but never takes part (stuck in user code, a deadlocked data loader, a paused VM): a blocking
  exchange, an all-reduce, a broadcast and a background round (:class:`~lightning_dopt.rounds.OverlappedRounds`)
  each give up after the process group's timeout with :class:`~lightning_dopt.comm.PeerFailure`;
* then rank 1 starts its half of a 16 MB exchange (``Communicator.exchange``, in a thread) and SIGKILLs itself (its message cut off on the wire): rank 0's
  exchange ends within seconds with an error naming rank 1 as killed.

The Lightning-level counterparts (a rank killed in each phase of ``fit``) are in
``tests/integration/test_reliability.py``.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import re
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import helpers
from lightning_dopt.comm import Communicator
from lightning_dopt.rounds import OverlappedRounds
from lightning_dopt.replica import ReplicaSync

TIMEOUT_S = 1.0  # the process groups' timeout in this test
OPERATIONS = ("exchange", "all_reduce", "broadcast", "background_round")
STUCK_LIMIT_S = 60.0  # the stuck rank waits (outside any collective) until rank 0 is done, at most this long
LARGE = 4_000_000  # 16 MB: more than the socket buffers hold, so the killed rank's send is cut off mid-message


def _stuck_then_killed(rank: int, world_size: int) -> dict[str, tuple[float, str]]:
    comm = Communicator()
    comm.start_liveness("failures", interval=0.25)
    timeout = timedelta(seconds=TIMEOUT_S)
    groups = [dist.new_group(timeout=timeout) for _ in OPERATIONS[:3]]
    overlapped = OverlappedRounds(ReplicaSync(nn.Linear(64, 64), comm, "random", seed=0), comm.background(timeout),
                                  timeout=TIMEOUT_S)
    send, receive = torch.full((LARGE,), float(rank)), torch.empty(LARGE)
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        end = time.monotonic() + STUCK_LIMIT_S
        while not store.check(["failures/stuck-done"]) and time.monotonic() < end:
            time.sleep(0.05)  # heartbeats go on in the background
        posting = threading.Thread(target=comm.exchange, args=([send], [0], [[receive]], [0]),
                                   kwargs={"purpose": "round"}, daemon=True)
        posting.start()  # the same exchange as rank 0's, cut into the same pieces
        time.sleep(0.2)  # the first pieces are on their way
        store.set("failures/posted", "1")
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    seen: dict[str, tuple[float, str]] = {}
    for name in OPERATIONS + ("killed_after_posting",):
        if name == "killed_after_posting":
            store.set("failures/stuck-done", "1")
            store.wait(["failures/posted"], timedelta(seconds=STUCK_LIMIT_S))
            time.sleep(1.0)  # rank 1 is dead by now, part of its message unread in the socket
        start = time.monotonic()
        try:
            if name == "background_round":
                overlapped.start(0, torch.zeros(2 * world_size, dtype=torch.float64))
                overlapped.finish()
            elif name == "killed_after_posting":
                comm.exchange([send], [1], [[receive]], [1], purpose="round")
            else:
                peer = Communicator(groups[OPERATIONS.index(name)], liveness=comm.liveness)
                if name == "exchange":
                    peer.exchange([torch.ones(1000)], [1], [[torch.zeros(1000)]], [1], purpose="round")
                elif name == "all_reduce":
                    peer.all_reduce_([torch.ones(1000)], purpose="round")
                else:
                    peer.broadcast_([torch.ones(1000)], src=1, purpose="start")
            seen[name] = (time.monotonic() - start, "returned without an error")
        except Exception as error:  # noqa: BLE001 - the test inspects the type and message
            seen[name] = (time.monotonic() - start, f"{type(error).__name__}: {error}")
    comm.liveness.stop()
    return seen


def _run_with_casualty(fn: Any, world_size: int, victim: int, timeout: float) -> dict[int, Any]:
    """Like :func:`helpers.run_ranks`, but rank ``victim`` is expected to die by SIGKILL: returns the other ranks'
    results. Past ``timeout`` seconds the test fails (a hang); every child is killed and reaped in the end."""
    context = mp.get_context("spawn")
    results_queue = context.Queue()
    fn_ref = (fn.__module__, fn.__qualname__, sys.modules[fn.__module__].__file__)
    port = helpers.free_port()
    processes = [context.Process(target=helpers._child, daemon=True, name=f"rank{rank}",
                                 args=(rank, world_size, port, fn_ref, pickle.dumps(()), results_queue,
                                       ("lightning_dopt",)))
                 for rank in range(world_size)]
    results: dict[int, Any] = {}
    dead_since: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.start()
        while len(results) < world_size - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - {victim} - set(results))
                raise AssertionError(f"ranks {missing} did not finish within {timeout:g} s (hang); all killed")
            try:
                rank, status, message = results_queue.get(timeout=0.2)
            except queue_module.Empty:
                helpers._check_dead(processes, {**results, victim: None}, dead_since)  # the victim's death is expected
                continue
            if status != "ok":
                raise AssertionError(f"rank {rank} raised:\n{message}")
            results[rank] = pickle.loads(message)
        processes[victim].join(max(0.0, deadline - time.monotonic()))
        assert processes[victim].exitcode == -signal.SIGKILL, processes[victim].exitcode
        return results
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)
        results_queue.close()
        results_queue.cancel_join_thread()


@pytest.mark.timeout(150)
def test_every_wait_on_a_stuck_or_killed_peer_is_bounded_and_says_why() -> None:
    seen = _run_with_casualty(_stuck_then_killed, 2, victim=1, timeout=120)[0]
    print("\n" + "\n".join(f"{name}: {seconds:.2f} s: {message[:240]}" for name, (seconds, message) in seen.items()))
    assert set(seen) == set(OPERATIONS) | {"killed_after_posting"}
    for name, (seconds, message) in seen.items():
        assert message.startswith("PeerFailure: rank 0: "), (name, message)
        # the timeout (or the peer's death) plus the diagnosis (2.5 heartbeat intervals) plus slack for a loaded box
        assert seconds < TIMEOUT_S + 10.0, (name, seconds, message)
    for name in OPERATIONS:
        assert re.search(r"[Tt]imed out|timeout|did not finish within", seen[name][1]), (name, seen[name][1])
    # a point-to-point wait knows whom it waited for; a dead peer is named as such
    assert "with rank 1 failed" in seen["exchange"][1] and "with rank 1 failed" in seen["broadcast"][1]
    killed = seen["killed_after_posting"][1]
    assert killed.startswith("PeerFailure: rank 0: exchange for 'round' with rank 1 failed"), killed
    assert "rank 1 stopped without an error (killed" in killed, killed
