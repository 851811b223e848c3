"""How fast can two ranks swap a model over one emulated link with gloo? The same exchange done the five ways of
:data:`LABELS` (``bench.py --probe``).

Two ranks in network namespaces (``netns.py``, ``rate_mbit`` each way) each send ``values`` fp32 values to the other
and receive as many, timed after a barrier, three times each. ``package`` is ``Communicator.exchange_each`` as the
strategy calls it; with 2 ranks the reference all-reduce sends the tensor once each way. The link-rate bound for one
direction, which a full-duplex exchange would take, is ``4 · values · 8 / rate`` seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import netns  # this folder, on sys.path in bench.py

RANK_SCRIPT = """
import json, os, sys, time, torch, torch.distributed as dist
from lightning_dopt.comm import Communicator
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
communicator, other = Communicator(), dist.new_group([0, 1])
rank, peer, values, out = dist.get_rank(), 1 - dist.get_rank(), int(sys.argv[1]), sys.argv[2]
x, y = torch.ones(values), torch.empty(values)
send_group, recv_group = (None, other) if rank == 0 else (other, None)

def pairs(n):  # n interleaved isend/irecv pairs in one batch_isend_irecv
    ops = [dist.P2POp(op, t, peer) for a, b in zip(x.chunk(n), y.chunk(n))
           for op, t in ((dist.isend, a), (dist.irecv, b))]
    return [q.wait() for q in dist.batch_isend_irecv(ops)]

modes = {"one_message": lambda: pairs(1), "chunks_32": lambda: pairs(32),
         "two_groups": lambda: [q.wait() for q in (dist.isend(x, peer, group=send_group),
                                                   dist.irecv(y, peer, group=recv_group))],
         "package": lambda: communicator.exchange_each([(peer, [x])], [(peer, [y])], "round"),
         "all_reduce": lambda: dist.all_reduce(x)}
times = {}
for trial in range(3):
    for name, exchange in modes.items():
        dist.barrier()
        t = time.perf_counter()
        exchange()
        times.setdefault(name, []).append(time.perf_counter() - t)
open(out + str(rank), "w").write(json.dumps(times))
dist.destroy_process_group()
"""

LABELS = {"one_message": "one message each way (`batch_isend_irecv`)", "chunks_32": "32 interleaved chunks each way",
          "two_groups": "one process group per direction",
          "package": "`Communicator.exchange_each` (1 MiB pieces, alternating)", "all_reduce": "all-reduce (reference)"}


def probe(rate_mbit: float, values: int, python: str = sys.executable) -> dict[str, object]:
    """Median seconds per exchange mode over both ranks and three trials, plus the link-rate bound."""
    with tempfile.TemporaryDirectory(prefix="dopt_probe_") as work, netns.signals_raise(), \
            netns.EmulatedCluster(2, rate_mbit=rate_mbit) as cluster:
        out = str(Path(work) / "times")
        run = netns.run_ranks(cluster, lambda rank: [python, "-c", RANK_SCRIPT, str(values), out],
                              lambda rank: cluster.rank_env(rank, 29690), timeout=300, log_dir=Path(work) / "logs")
        if not run.ok:
            raise RuntimeError(f"probe failed: {run.log_tail(run.failed_rank or 0)}")
        per_rank = [json.loads(Path(out + str(rank)).read_text()) for rank in range(2)]
    medians = {mode: statistics.median(per_rank[0][mode] + per_rank[1][mode]) for mode in LABELS}
    return {"rate_mbit": rate_mbit, "values": values, "bound_seconds": 4 * values * 8 / (rate_mbit * 1e6),
            "median_seconds": medians, "all_seconds": per_rank}

