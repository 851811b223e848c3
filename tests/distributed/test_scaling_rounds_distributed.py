"""Preconditioner statistics in rounds, on real gloo process groups (2 CPU ranks, no Lightning).

The statistics of the two ranks differ by orders of magnitude (rank 0 tiny, rank 1 large, in the same quantization
blocks). Whatever path a round takes, the mixed statistics must stay where the ranks' statistics allow: within the
range of the values mixed (for a late round: of the values decayed since the snapshot), so that ``D`` stays within
the range the ranks' own ``D`` span and no coordinate falls to the floor ``eps`` (a step ``1/eps`` times too long).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
from torch import nn

from helpers import run_ranks
from lightning_dopt.comm import Communicator
from lightning_dopt.compress import make_codec
from lightning_dopt.rounds import FLAG_BLOCKS, OverlappedRounds
from lightning_dopt.replica import ReplicaSync
from lightning_dopt.scaling import AdamScaling

WIDTH = 32
BETA = 0.5
LATE_STEPS = 3  # accumulate calls between an overlapped round's snapshot and its application


def rank_gradients(rank: int, seed: int) -> list[torch.Tensor]:
    """Rank 0: gradients of magnitude about 1e-4 (squares 1e-8), rank 1: about 1."""
    generator = torch.Generator().manual_seed(seed)
    scale = 1e-4 if rank == 0 else 1.0
    return [scale * (0.5 + torch.rand((WIDTH, WIDTH), generator=generator)),
            scale * (0.5 + torch.rand(WIDTH, generator=generator))]


def make_parts(rank: int) -> tuple[nn.Module, AdamScaling]:
    model = nn.Linear(WIDTH, WIDTH)
    preconditioner = AdamScaling(list(model.parameters()), beta=BETA, eps=1e-8, relative_floor=0.0)
    for step in range(4):
        preconditioner.accumulate(rank_gradients(rank, step))
    return model, preconditioner


def mixed(preconditioner: AdamScaling) -> list[torch.Tensor]:
    return [t.detach().clone() for t in preconditioner.mixed_state()]


def scenario_compressed(rank: int, codec: str, topology: str) -> dict[str, Any]:
    """One compressed round (a graph round for ``random``, an average round for ``complete``) then a refresh."""
    model, preconditioner = make_parts(rank)
    sync = ReplicaSync(model, Communicator(), topology, seed=0, codec=make_codec(codec),
                       statistics=[preconditioner])
    sync.broadcast_(0)
    before = mixed(preconditioner)
    sync.gossip_round(0)
    preconditioner.refresh()
    return {"before": before, "after": mixed(preconditioner), "diagonal": preconditioner.diagonal(),
            "round_bytes": sync.comm.stats.bytes_sent_by_purpose["round"], "replica_bytes": sync.state.nbytes}


def scenario_overlapped(rank: int) -> dict[str, Any]:
    """A round started at a snapshot and applied after ``LATE_STEPS`` accumulate calls; rank 1's gradients are zero
    meanwhile, so its large statistics decay to ``β³`` of the snapshot (the plain delta rule ``v + m − s`` would take
    them to ``m − (1 − β³) s < 0``)."""
    model, preconditioner = make_parts(rank)
    comm = Communicator()
    sync = ReplicaSync(model, comm, "random", seed=0, statistics=[preconditioner])
    rounds = OverlappedRounds(sync, comm.background(timedelta(seconds=30)), timeout=30.0)
    snapshot = mixed(preconditioner)
    rounds.start(0, torch.zeros(FLAG_BLOCKS * comm.world_size, dtype=torch.float64))
    late = [g if rank == 0 else torch.zeros_like(g) for g in rank_gradients(rank, 99)]
    for _ in range(LATE_STEPS):
        preconditioner.accumulate(late)
    progress = mixed(preconditioner)
    rounds.finish()
    preconditioner.refresh()
    return {"snapshot": snapshot, "progress": progress, "after": mixed(preconditioner),
            "diagonal": preconditioner.diagonal(), "late": late}


def run_all(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(rank)
    out = {f"{codec}-{topology}": scenario_compressed(rank, codec, topology)
           for codec in ("int8", "int4", "fp16") for topology in ("random", "complete")}
    out["overlapped"] = scenario_overlapped(rank)
    return out


@pytest.fixture(scope="module")
def world2() -> list[dict[str, Any]]:
    return run_ranks(run_all, 2, timeout=120.0)


def adam_diagonal(statistics: list[torch.Tensor], eps: float = 1e-8) -> list[torch.Tensor]:
    """``D`` of one rank's own statistics and weight (the last entry)."""
    *moments, weight = statistics
    return [(v.clamp_min(0) / weight).sqrt() + eps for v in moments]


@pytest.mark.parametrize("case", [f"{c}-{t}" for c in ("int8", "int4", "fp16") for t in ("random", "complete")])
def test_compressed_rounds_keep_statistics_and_d_within_the_ranks_range(world2: list[dict[str, Any]],
                                                                        case: str) -> None:
    records = [rank[case] for rank in world2]
    lows = [torch.minimum(a, b) for a, b in zip(records[0]["before"], records[1]["before"])]
    highs = [torch.maximum(a, b) for a, b in zip(records[0]["before"], records[1]["before"])]
    d_lows = [torch.minimum(a, b) for a, b in zip(*(adam_diagonal(r["before"]) for r in records))]
    d_highs = [torch.maximum(a, b) for a, b in zip(*(adam_diagonal(r["before"]) for r in records))]
    tolerance = 2.0 ** -8  # bf16's relative rounding of what travels
    for record in records:
        for value, low, high in zip(record["after"], lows, highs):
            assert bool((value >= low * (1 - tolerance)).all()) and bool((value <= high * (1 + tolerance)).all())
        for d, low, high in zip(record["diagonal"], d_lows, d_highs):
            assert bool((d >= low * (1 - tolerance)).all()) and bool((d <= high * (1 + tolerance)).all()), \
                f"D left [{low.min().item():.3g}, {high.max().item():.3g}]: min {d.min().item():.3g}"
    if case.endswith("complete"):  # the exact-mean round leaves the statistics (and D) identical on both ranks
        assert all(torch.equal(a, b) for a, b in zip(records[0]["after"], records[1]["after"]))
    # the replica travels compressed; the statistics (and the weight) travel as bf16, two bytes per value
    statistics_values = sum(t.numel() for t in records[0]["before"])
    replica_values = records[0]["replica_bytes"] // 4
    codec = make_codec(case.split("-")[0])
    assert codec is not None
    graph = codec.payload_bytes(replica_values) + 2 * statistics_values
    if case.endswith("random"):
        assert records[0]["round_bytes"] == graph
    else:  # reduce-scatter + all-gather of block-aligned chunks: (n-1)/n of two payloads, padding included
        assert records[0]["round_bytes"] >= graph


def test_a_late_round_scales_its_statistics_delta_by_the_decay_since_the_snapshot(
        world2: list[dict[str, Any]]) -> None:
    records = [rank["overlapped"] for rank in world2]
    decay = BETA ** LATE_STEPS
    mean_snapshot = [(a + b) / 2 for a, b in zip(records[0]["snapshot"], records[1]["snapshot"])]
    for record in records:
        # exactly where the mix belongs: v = βᵏ m + u, u the progress since the snapshot
        for got, progress, snapshot, mean in zip(record["after"], record["progress"], record["snapshot"],
                                                 mean_snapshot):
            expected = progress + decay * (mean - snapshot)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
            assert bool((got >= 0).all()), "an EMA of squares went below zero"
    plain = [progress + (mean - snapshot)  # rank 1 under the rule without the decay
             for progress, snapshot, mean in zip(records[1]["progress"], records[1]["snapshot"], mean_snapshot)]
    assert all(bool((value < 0).all()) for value in plain[:-1]), "the plain delta rule must fail here"
    for record in records:
        # D from the mix lies between the D each rank would have from either snapshot, decayed, plus its own progress
        candidates = [adam_diagonal([progress + decay * (snapshot - own) for progress, snapshot, own in
                                     zip(record["progress"], other["snapshot"], record["snapshot"])])
                      for other in records]
        for d, first, second in zip(record["diagonal"], *candidates):
            assert bool((d >= torch.minimum(first, second) * (1 - 1e-5)).all())
            assert bool((d <= torch.maximum(first, second) * (1 + 1e-5)).all())
