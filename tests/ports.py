"""Ports for test rendezvous that no other process is handed by the kernel.

A port found free by binding port 0 lies in the kernel's ephemeral range, and the kernel may hand it to any
other socket (another test's gloo pair, an outgoing connection) before the rendezvous server binds it: the run
then fails with ``EADDRINUSE``. Ports below (or above) ``ip_local_port_range`` are never handed out
automatically, so a free one stays free unless someone binds it by number.
"""

import random
import socket

_LOWEST = 10_000


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low, high = (int(value) for value in ranges.read().split())
        return low, high
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def free_port() -> int:
    """A TCP port outside the ephemeral range that was free on 127.0.0.1 a moment ago."""
    low, high = _ephemeral_range()
    candidates = [*range(_LOWEST, low), *range(high + 1, 65_536)]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room outside the range: take the kernel's
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
