"""The emulated cluster of ``benchmarks/cluster/netns.py``: ranks in separate network namespaces reach each other
through the rate-limited bridge, and every namespace and link is gone afterwards, whatever way the run ends.

Skipped without root or without ``ip``/``tc``.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

NETNS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster" / "netns.py"


def _load_netns():
    spec = importlib.util.spec_from_file_location("dopt_cluster_netns", NETNS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


netns = _load_netns()
MISSING = netns.missing_requirements()  # as root this creates and deletes a probe namespace: ask once
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"emulated cluster {MISSING}")

ALL_REDUCE = textwrap.dedent("""
    import os, sys, datetime, torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=30))
    x = torch.full((1000,), float(dist.get_rank() + 1))
    dist.all_reduce(x)
    open(sys.argv[1] + os.environ["RANK"], "w").write(repr(x[0].item()))
    dist.destroy_process_group()
""")


def _ours(cluster_id: str) -> list[str]:
    return [n for n in netns.list_namespaces() if n.startswith(cluster_id + "-")]


def _links_in_root() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def test_gloo_all_reduce_crosses_the_bridge_and_everything_is_removed(tmp_path: Path) -> None:
    with netns.EmulatedCluster(2, rate_mbit=100) as cluster:
        assert sorted(_ours(cluster.cluster_id)) == sorted(cluster.namespaces)
        qdiscs = cluster.qdiscs()
        assert qdiscs.count("tbf") == 4 and "100Mbit" in qdiscs  # both directions of both ranks' links
        before = [cluster.tx_bytes(rank) for rank in range(2)]
        run = netns.run_ranks(cluster, lambda rank: [sys.executable, "-c", ALL_REDUCE, str(tmp_path / "out")],
                              lambda rank: cluster.rank_env(rank, master_port=29611), timeout=60,
                              log_dir=tmp_path / "logs")
        assert run.ok, run.log_tail(0) + run.log_tail(1)
        assert [(tmp_path / f"out{rank}").read_text() for rank in range(2)] == ["3.0", "3.0"]
        sent = [cluster.tx_bytes(rank) - b for rank, b in zip(range(2), before)]
        assert all(s > 4000 for s in sent), sent  # 4 kB of floats each way went out through the veths
        cluster_id = cluster.cluster_id
    assert _ours(cluster_id) == []
    assert "dn0" not in _links_in_root() and cluster_id not in _links_in_root()


def test_a_failing_rank_ends_the_run_and_the_cluster_is_removed(tmp_path: Path) -> None:
    waits_forever = [sys.executable, "-c", "import time; time.sleep(120)"]
    fails = [sys.executable, "-c", "raise SystemExit(3)"]
    started = time.monotonic()
    with netns.EmulatedCluster(2, rate_mbit=100) as cluster:
        run = netns.run_ranks(cluster, lambda rank: fails if rank == 1 else waits_forever,
                              lambda rank: cluster.rank_env(rank, master_port=29612), timeout=60,
                              log_dir=tmp_path)
        cluster_id = cluster.cluster_id
    assert not run.ok and run.failed_rank == 1 and not run.timed_out
    assert run.returncodes[1] == 3 and run.returncodes[0] is not None and run.returncodes[0] < 0  # killed
    assert time.monotonic() - started < 20
    assert _ours(cluster_id) == []


def test_timeout_kills_every_rank(tmp_path: Path) -> None:
    with netns.EmulatedCluster(2, rate_mbit=None) as cluster:
        run = netns.run_ranks(cluster, lambda rank: [sys.executable, "-c", "import time; time.sleep(120)"],
                              lambda rank: cluster.rank_env(rank, master_port=29613), timeout=1.0, log_dir=tmp_path)
        cluster_id = cluster.cluster_id
    assert run.timed_out and not run.ok and all(rc is not None and rc < 0 for rc in run.returncodes)
    assert _ours(cluster_id) == []


def test_an_exception_in_the_block_removes_the_cluster() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with netns.EmulatedCluster(2) as cluster:
            cluster_id = cluster.cluster_id
            assert len(_ours(cluster_id)) == 3
            raise RuntimeError("boom")
    assert _ours(cluster_id) == []


def test_sigterm_to_the_driver_removes_the_cluster_and_kills_the_ranks(tmp_path: Path) -> None:
    driver = textwrap.dedent(f"""
        import importlib.util, sys, pathlib
        spec = importlib.util.spec_from_file_location("n", {str(NETNS_PATH)!r})
        n = importlib.util.module_from_spec(spec); sys.modules["n"] = n; spec.loader.exec_module(n)
        with n.signals_raise(), n.EmulatedCluster(2) as cluster:
            print(cluster.cluster_id, flush=True)
            n.run_ranks(cluster, lambda r: [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                        lambda r: cluster.rank_env(r, 29614), timeout=100, log_dir=pathlib.Path({str(tmp_path)!r}))
    """)
    process = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        cluster_id = process.stdout.readline().strip()
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"rank{r}.log").exists() and "up" in (tmp_path / f"rank{r}.log").read_text()
                      for r in range(2)):
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.05)
        assert len(_ours(cluster_id)) == 3
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0  # the interrupt propagated after cleaning up
    assert _ours(cluster_id) == []


def test_cleanup_removes_leftovers_of_dead_processes_only() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = f"{netns.PREFIX}{dead.pid}-0-r0"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        with netns.EmulatedCluster(1) as live:  # created by this (running) process: must survive the cleanup
            removed = netns.cleanup_leftovers()
            assert f"netns {leftover}" in removed
            assert leftover not in netns.list_namespaces()
            assert sorted(_ours(live.cluster_id)) == sorted(live.namespaces)
    finally:
        subprocess.run(["ip", "netns", "delete", leftover], capture_output=True)
    assert _ours(live.cluster_id) == []
