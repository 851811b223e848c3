"""Run a function on ``world_size`` gloo ranks in fresh processes, with a hard deadline.

``run_ranks(fn, world_size, *args, timeout=60.0)`` starts one ``spawn`` process per rank
(``torch.multiprocessing.get_context("spawn").Process``), initialises a gloo process group on a free
localhost port in each, calls ``fn(rank, world_size, *args)`` and returns the ranks' results in rank order.

* ``fn`` must be a module-level function and ``args`` / the results picklable. Children import ``fn``'s
  module by name (they inherit ``sys.path``; the ``conftest.py`` beside this file puts this folder on it)
  and fall back to loading it from its file, so it also works under pytest's ``importlib`` import mode.
* Results come back through a queue as plain pickles (no shared-memory tensors), so a rank may exit as soon as
  it has sent its result.
* A rank that raises fails the test at once with an ``AssertionError`` naming the rank and carrying the
  child's traceback; a rank that dies without a result (segfault, ``os._exit``) fails it too. Past
  ``timeout`` seconds (a hung collective, a deadlock) every child is killed and an ``AssertionError`` is
  raised. Children are always reaped: nothing outlives ``run_ranks``.
* Each child uses one intra-op thread and always destroys its process group.
* Speed: ``import lightning_dopt`` imports Lightning (seconds per process on a small CPU box). These tests use
  no Lightning, so by default the children import ``lightning_dopt``'s submodules without running the package
  ``__init__`` (``light_packages``); pass ``light_packages=()`` to import packages normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

_DEATH_GRACE_S = 2.0  # how long a dead child's queued result may take to arrive before it counts as lost


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
              light_packages: Sequence[str] = ("lightning_dopt",)) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each run on its own gloo rank."""
    module = sys.modules.get(fn.__module__)
    if module is None or "<locals>" in fn.__qualname__:
        raise ValueError(f"run_ranks needs a module-level function of an importable module; got {fn!r}")
    fn_ref = (fn.__module__, fn.__qualname__, getattr(module, "__file__", None))
    payload = pickle.dumps(args)
    deadline = time.monotonic() + timeout
    for attempt in range(3):
        try:
            return _run_once(fn_ref, payload, world_size, deadline, timeout, tuple(light_packages))
        except _PortInUse:
            if attempt == 2:
                raise AssertionError("could not find a free port for the gloo store in 3 attempts") from None
    raise AssertionError("unreachable")


class _PortInUse(Exception):
    pass


def _run_once(fn_ref: tuple[str, str, str | None], payload: bytes, world_size: int, deadline: float,
              timeout: float, light_packages: tuple[str, ...]) -> list[Any]:
    context = mp.get_context("spawn")
    results_queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_child, args=(rank, world_size, port, fn_ref, payload, results_queue, light_packages),
                        name=f"rank{rank}", daemon=True)
        for rank in range(world_size)
    ]
    results: dict[int, Any] = {}
    dead_since: dict[int, float] = {}
    try:
        for process in processes:
            process.start()
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise AssertionError(f"run_ranks({fn_ref[1]}, world_size={world_size}) timed out after {timeout:g} s; "
                                     f"ranks {missing} did not finish (hung collective?); all ranks killed")
            try:
                rank, status, message = results_queue.get(timeout=min(0.2, remaining))
            except queue_module.Empty:
                _check_dead(processes, results, dead_since)
                continue
            if status == "ok":
                results[rank] = pickle.loads(message)
                continue
            if status == "init" and "address already in use" in message.lower():
                raise _PortInUse()
            errors = {rank: message, **_drain_errors(results_queue)}
            rank = next((r for r, m in errors.items() if not _is_secondary(m)), rank)
            note = "".join(f"\n(rank {other} failed too: {_last_line(text)})"
                           for other, text in sorted(errors.items()) if other != rank)
            raise AssertionError(f"rank {rank} of {world_size} raised in {fn_ref[1]}:\n{errors[rank]}{note}")
        return [results[rank] for rank in range(world_size)]
    finally:
        _reap(processes, grace=min(5.0, max(0.5, deadline - time.monotonic())) if len(results) == world_size else 0.0)
        results_queue.close()
        results_queue.cancel_join_thread()


def _check_dead(processes: Sequence[Any], results: dict[int, Any], dead_since: dict[int, float]) -> None:
    now = time.monotonic()
    for rank, process in enumerate(processes):
        if rank in results or process.exitcode is None:
            continue
        first_seen = dead_since.setdefault(rank, now)
        if now - first_seen > _DEATH_GRACE_S:
            raise AssertionError(f"rank {rank} exited with code {process.exitcode} without returning a result")


def _drain_errors(results_queue: Any) -> dict[int, str]:
    """Tracebacks of the other ranks that report a failure within half a second."""
    failed = {}
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        try:
            rank, status, message = results_queue.get(timeout=0.1)
        except queue_module.Empty:
            break
        if status != "ok":
            failed[rank] = message
    return failed


def _is_secondary(message: str) -> bool:
    """A rank that failed because a peer went away first (gloo reports the closed connection)."""
    return any(text in _last_line(message) for text in ("Connection closed by peer", "Connection reset by peer"))


def _last_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[-1] if lines else "?"


def _reap(processes: Sequence[Any], grace: float) -> None:
    """Let finished children exit for ``grace`` seconds, then kill whatever is left and wait for it."""
    end = time.monotonic() + grace
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, end - time.monotonic()))
    for process in processes:
        if process.pid is not None and process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join(10)


# ------------------------------------------------------------------------------------------------ child side
def _child(rank: int, world_size: int, port: int, fn_ref: tuple[str, str, str | None], payload: bytes,
           results_queue: Any, light_packages: tuple[str, ...]) -> None:
    phase = "setup"
    try:
        torch.set_num_threads(1)
        for name in light_packages:
            _install_light_package(name)
        fn = _resolve(fn_ref)
        args = pickle.loads(payload)
        if "GLOO_SOCKET_IFNAME" not in os.environ and any(name == "lo" for _, name in socket.if_nameindex()):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        phase = "init"
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                                timeout=timedelta(seconds=30))
        phase = "run"
        result = fn(rank, world_size, *args)
        results_queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results_queue.put((rank, phase, traceback.format_exc()))
    finally:
        # Flush the message before closing the group: a peer that fails because this rank's connections closed
        # must not report first and hide this rank's error.
        results_queue.close()
        results_queue.join_thread()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _install_light_package(name: str) -> None:
    """Register package ``name`` without executing its ``__init__``, so its submodules import on their own."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType(name, f"{name} (imported by tests/distributed/helpers.py without its __init__)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules[name] = package


def _resolve(fn_ref: tuple[str, str, str | None]) -> Callable[..., Any]:
    module_name, qualname, path = fn_ref
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if path is None:
            raise
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target
