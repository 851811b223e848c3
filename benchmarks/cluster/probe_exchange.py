"""How fast can two ranks swap a model over one emulated link with gloo? Three ways of doing the same exchange.

Usage (root)::

    python benchmarks/cluster/probe_exchange.py [--rate-mbit 100] [--values 5824522] [--out results.json]

Two ranks in network namespaces (``netns.py``, ``--rate-mbit`` each way per rank) each send ``--values`` fp32
values to the other and receive as many, timed after a barrier, three times each:

* ``one message``: one ``isend`` + one ``irecv`` in a single ``batch_isend_irecv`` (what
  ``lightning_dopt.comm.Communicator.exchange_each`` did with a flat buffer before it cut messages into pieces);
* ``32 chunks``: the same bytes as 32 interleaved ``isend``/``irecv`` pairs in one ``batch_isend_irecv``;
* ``two groups``: each direction on its own process group (its own TCP connection);
* ``package``: ``Communicator.exchange_each`` as the strategy calls it (pieces of ``GLOO_CHUNK_BYTES``);
* ``all_reduce``: a gloo all-reduce of the same tensor, for reference (with 2 ranks a ring sends it once each way).

The link-rate bound for one direction is ``4 · values · 8 / rate`` seconds; a full-duplex exchange takes that long.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netns  # noqa: E402

RANK_SCRIPT = """
import json, os, sys, time, torch, torch.distributed as dist
from lightning_dopt.comm import Communicator
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
communicator = Communicator()
rank, peer, values, out = dist.get_rank(), 1 - dist.get_rank(), int(sys.argv[1]), sys.argv[2]
other = dist.new_group([0, 1])
x, y = torch.ones(values), torch.empty(values)

def one_message():
    for q in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]):
        q.wait()

def chunks_32():
    ops = []
    for a, b in zip(x.chunk(32), y.chunk(32)):
        ops += [dist.P2POp(dist.isend, a, peer), dist.P2POp(dist.irecv, b, peer)]
    for q in dist.batch_isend_irecv(ops):
        q.wait()

def two_groups():
    send_group, recv_group = (None, other) if rank == 0 else (other, None)
    s, r = dist.isend(x, peer, group=send_group), dist.irecv(y, peer, group=recv_group)
    s.wait(); r.wait()

def package():
    communicator.exchange_each([(peer, [x])], [(peer, [y])], "round")

def all_reduce():
    dist.all_reduce(x)

times = {}
for trial in range(3):
    for f in (one_message, chunks_32, two_groups, package, all_reduce):
        dist.barrier()
        t = time.perf_counter()
        f()
        times.setdefault(f.__name__, []).append(time.perf_counter() - t)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--values", type=int, default=5_824_522, help="fp32 values each way (default: the MLP)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    if (why := netns.missing_requirements()) is not None:
        raise SystemExit(f"the emulated cluster {why}")
    result = probe(args.rate_mbit, args.values)
    print(f"{args.values:,} fp32 values ({4 * args.values / 1e6:.1f} MB) each way, {args.rate_mbit:g} Mbit/s links; "
          f"link-rate bound {result['bound_seconds']:.2f} s")
    for mode, seconds in result["median_seconds"].items():  # type: ignore[union-attr]
        print(f"  {LABELS[mode]:<45} {seconds:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
