"""An emulated cluster on one Linux machine: one network namespace per rank, joined by rate-limited veth links.

Rank ``k`` of cluster ``dopt<pid>-<seq>`` lives in namespace ``dopt<pid>-<seq>-r<k>`` (veth ``dn<k>``, address
``10.201.0.<k+1>``); the other ends ``p<k>`` join bridge ``br0`` in namespace ``dopt<pid>-<seq>-br``. A ``tc tbf`` on
both ends limits what the rank sends and receives, like a switch port of ``rate_mbit``; nothing is created in the
root namespace. Needs root. Every exit path removes what was created (:class:`EmulatedCluster` is a context manager,
:func:`run_ranks` kills every rank when one fails or times out, :func:`signals_raise` turns SIGTERM/SIGHUP into
``KeyboardInterrupt``); :func:`cleanup_leftovers` removes those of SIGKILLed processes (``bench.py --cleanup``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "dopt"  # every namespace this module creates is named ``dopt<pid>-<seq>-...``
_NAME = re.compile(rf"^{PREFIX}(\d+)-\d+-")
_SEQUENCE = itertools.count()


def missing_requirements() -> str | None:
    """Why an emulated cluster cannot be built here (not root, no ``ip``/``tc``), or ``None``."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links and tc qdiscs)"
    if missing := [tool for tool in ("ip", "tc") if shutil.which(tool) is None]:
        return f"needs {' and '.join(missing)} (iproute2)"
    probe = f"doptprobe{os.getpid()}"
    try:
        for argv in (("ip", "netns", "add", probe), ("ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"),
                     ("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                      "100mbit", "burst", "32kbit", "latency", "400ms")):
            if (result := _run(*argv, check=False)).returncode != 0:
                return f"cannot create a network namespace with a tbf qdisc here: {result.stderr.strip()}"
    finally:
        _run("ip", "netns", "delete", probe, check=False)
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]


def _delete_namespace(namespace: str) -> None:
    """SIGKILL what still runs inside ``namespace`` (only ones started there by this module), then delete it."""
    for pid in (int(p) for p in _run("ip", "netns", "pids", namespace, check=False).stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _run("ip", "netns", "delete", namespace, check=False)


@dataclass
class EmulatedCluster:
    """``world_size`` ranks on a bridge, each rank's link limited to ``rate_mbit`` Mbit/s each way (``None``:
    unlimited; ``limit_ingress=False``: sending only), addresses ``<subnet>.<rank + 1>/24``. A context manager: the
    namespaces exist inside the ``with`` block and are deleted on every way out of it.

    ``ranks_per_node = g > 1`` emulates nodes of ``g`` GPUs with one NIC each: the ``g`` ranks of a node share one
    namespace (``...-n<node>``), each with its own rate-limited link; a source-address routing rule per link sends a
    rank's traffic to other nodes through its own link, and traffic between the ranks of a node goes through the
    namespace's loopback, unlimited (the node's fast interconnect)."""

    world_size: int
    rate_mbit: float | None = 100.0
    ranks_per_node: int = 1
    limit_ingress: bool = True
    burst_bytes: int = 64 * 1024
    latency_ms: float = 50.0
    subnet: str = "10.201.0"
    cluster_id: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{next(_SEQUENCE)}")
    created: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.world_size <= 250:
            raise ValueError(f"world_size must be 1 to 250 (one /24 subnet), got {self.world_size}")
        if self.ranks_per_node < 1 or self.world_size % self.ranks_per_node:
            raise ValueError(f"ranks_per_node must divide world_size ({self.world_size}), got {self.ranks_per_node}")

    @property
    def bridge_namespace(self) -> str:
        return f"{self.cluster_id}-br"

    def namespace(self, rank: int) -> str:
        """The namespace rank ``rank`` runs in: its own, or its node's when ``ranks_per_node > 1``."""
        if self.ranks_per_node == 1:
            return f"{self.cluster_id}-r{rank}"
        return f"{self.cluster_id}-n{rank // self.ranks_per_node}"

    @staticmethod
    def interface(rank: int) -> str:
        """The rank's interface inside its namespace (use it as ``GLOO_SOCKET_IFNAME``)."""
        return f"dn{rank}"

    def address(self, rank: int) -> str:
        return f"{self.subnet}.{rank + 1}"

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_namespace] + list(dict.fromkeys(self.namespace(k) for k in range(self.world_size)))

    def create(self) -> EmulatedCluster:
        """Build the namespaces, bridge, links and qdiscs; on a failure remove what was built."""
        if (why := missing_requirements()) is not None:
            raise RuntimeError(f"EmulatedCluster {why}")
        try:
            with _signals_deferred():
                self._add_namespace(self.bridge_namespace)
            br = self.bridge_namespace
            _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", br, "link", "set", "br0", "up")
            for rank in range(self.world_size):
                ns, dev, port = self.namespace(rank), self.interface(rank), f"p{rank}"
                if ns not in self.created:
                    with _signals_deferred():
                        self._add_namespace(ns)
                    if self.ranks_per_node > 1:
                        # several links in one subnet: each answers ARP only for its own address (else a peer could
                        # send to a rank through another rank's link) and accepts replies routed by source address
                        for key, value in (("arp_ignore", 1), ("arp_announce", 2), ("rp_filter", 0)):
                            for scope in ("all", "default"):
                                _run("ip", "netns", "exec", ns, "sysctl", "-qw",
                                     f"net.ipv4.conf.{scope}.{key}={value}")
                # Both ends are created inside namespaces: nothing ever appears in the root namespace.
                _run("ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
                _run("ip", "-n", br, "link", "set", port, "master", "br0", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.address(rank)}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")  # packets to one's own address go through lo
                if self.ranks_per_node > 1:  # this rank's traffic leaves through its own link (one NIC per GPU)
                    table = str(100 + rank)
                    _run("ip", "-n", ns, "route", "add", f"{self.subnet}.0/24", "dev", dev, "src",
                         self.address(rank), "table", table)
                    _run("ip", "-n", ns, "rule", "add", "from", self.address(rank), "table", table)
                if self.rate_mbit is not None:
                    self._limit(ns, dev)
                    if self.limit_ingress:
                        self._limit(br, port)
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_namespace(self, namespace: str) -> None:
        _run("ip", "netns", "add", namespace)
        self.created.append(namespace)

    def _limit(self, namespace: str, device: str) -> None:
        _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
             "burst", str(self.burst_bytes), "latency", f"{self.latency_ms}ms")

    def destroy(self) -> None:
        """Kill what still runs in the namespaces and delete them (and every link); idempotent, signals deferred."""
        with _signals_deferred():
            for namespace in reversed(self.created):
                _delete_namespace(namespace)
            self.created.clear()

    def __enter__(self) -> EmulatedCluster:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(rank), *argv]

    def rank_env(self, rank: int, master_port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a one-process-per-node launch, less other launchers' variables."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")) and k != "GROUP_RANK"}
        g = self.ranks_per_node
        env.update(MASTER_ADDR=self.address(0), MASTER_PORT=str(master_port), RANK=str(rank),
                   WORLD_SIZE=str(self.world_size), NODE_RANK=str(rank // g), LOCAL_RANK=str(rank % g),
                   LOCAL_WORLD_SIZE=str(g), GLOO_SOCKET_IFNAME=self.interface(rank))
        return env

    def tx_bytes(self, rank: int) -> int:
        """Bytes the rank's interface has sent so far (kernel counter, headers included)."""
        return int(_run(*self.command(rank, ["cat", f"/sys/class/net/{self.interface(rank)}/statistics/tx_bytes"]))
                   .stdout.strip())

    def qdiscs(self) -> str:
        """``tc qdisc show`` of every namespace."""
        return "\n".join(f"{ns}: {_run('tc', '-n', ns, 'qdisc', 'show', check=False).stdout.strip()}"
                         for ns in self.created)


@dataclass
class RankRun:
    """Outcome of :func:`run_ranks`: exit codes (negative: killed by that signal), the first rank that failed on
    its own, whether the time ran out, the wall time and each rank's log."""

    returncodes: list[int | None]
    failed_rank: int | None
    timed_out: bool
    seconds: float
    logs: list[Path]

    @property
    def ok(self) -> bool:
        return self.failed_rank is None and not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def log_tail(self, rank: int, lines: int = 30) -> str:
        try:
            return "".join(self.logs[rank].read_text(errors="replace").splitlines(keepends=True)[-lines:])
        except OSError:
            return ""


def _kill_all(processes: Sequence[subprocess.Popen[bytes]], grace: float = 3.0) -> None:
    """SIGTERM each rank's process group, then SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def run_ranks(cluster: EmulatedCluster, argv: Callable[[int], Sequence[str]], env: Callable[[int], Mapping[str, str]],
              timeout: float, log_dir: Path, poll: float = 0.2) -> RankRun:
    """Start ``argv(rank)`` with ``env(rank)`` inside every rank's namespace and wait for all of them, output in
    ``log_dir/rank<k>.log``. When one rank exits with a non-zero code, ``timeout`` seconds pass or an exception
    (e.g. ``KeyboardInterrupt``) arrives, every rank is killed (SIGTERM to its process group, then SIGKILL), so a
    crashed rank never leaves the others hanging in a collective."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"rank{rank}.log" for rank in range(cluster.world_size)]
    processes: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    failed_rank, timed_out = None, False
    try:
        for rank in range(cluster.world_size):
            with logs[rank].open("wb") as log:
                processes.append(subprocess.Popen(cluster.command(rank, argv(rank)), env=dict(env(rank)), stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
        while any(p.poll() is None for p in processes):
            if failed := [rank for rank, p in enumerate(processes) if p.poll() not in (None, 0)]:
                failed_rank = failed[0]
                break
            if time.monotonic() - started > timeout:
                timed_out = True
                break
            time.sleep(poll)
        else:
            failed = [rank for rank, p in enumerate(processes) if p.returncode != 0]
            failed_rank = failed[0] if failed else None
    finally:
        _kill_all(processes)
    return RankRun([p.returncode for p in processes], failed_rank, timed_out, time.monotonic() - started, logs)


class _Deferred:
    pending: list[int] = []
    depth = 0


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold the signals :func:`signals_raise` turns into ``KeyboardInterrupt`` until the block is done (around the
    creation and deletion of namespaces)."""
    _Deferred.depth += 1
    try:
        yield
    finally:
        _Deferred.depth -= 1
        if _Deferred.depth == 0 and _Deferred.pending:
            signum = _Deferred.pending.pop()
            _Deferred.pending.clear()
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _raise_interrupt(signum: int, frame: object) -> None:
    if _Deferred.depth > 0:
        _Deferred.pending.append(signum)
        return
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Inside the block SIGTERM, SIGHUP and SIGINT raise ``KeyboardInterrupt`` (deferred while namespaces are made or
    deleted), so ``finally`` blocks and context managers clean up. Main thread only."""
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def cleanup_leftovers(force: bool = False) -> list[str]:
    """Delete the namespaces and links named ``dopt<pid>...`` whose ``<pid>`` is gone (all: ``force``)."""
    removed = []
    for namespace in list_namespaces():
        match = _NAME.match(namespace)
        if match and (force or not _pid_alive(int(match.group(1)))):
            _delete_namespace(namespace)
            removed.append(f"netns {namespace}")
    # Links are only ever created inside namespaces; this catches anything that escaped to the root namespace.
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        match = re.match(rf"^{PREFIX}(\d+)", name)
        if match and (force or not _pid_alive(int(match.group(1)))):
            _run("ip", "link", "delete", name, check=False)
            removed.append(f"link {name}")
    return removed
