"""Adaptive anchor refresh of compressed gossip (4 gloo ranks, int4, no Lightning).

What a compressed graph round injects, ``Q(x_i − a) − (x_i − a)``, grows with the replicas' drift since the last
anchor refresh, not with how far apart they are. Every rank takes a common step (the progress all ranks make) plus a
step of its own before each round; the flags' ``NOISE_BLOCK`` is emulated as the strategy does it (a max all-reduce
of :meth:`ReplicaSync.noise_ratio`, read before the round). Measured from outside, against the exact mix of the
replicas: the error each rank's new value carries, relative to its distance to its partner.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import run_ranks
from lightning_dopt.comm import Communicator
from lightning_dopt.compress import make_codec
from lightning_dopt.replica import ReplicaSync
from lightning_dopt.topology import mixing_row

ROUNDS = 40
STEP = 0.01
TOLERANCE = 0.5


def flat(sync: ReplicaSync) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in sync.state.tensors])


def gossip(rank: int, world_size: int, own_step: float, tolerance: float | None) -> list[dict[str, Any]]:
    """``ROUNDS`` int4 rounds of random gossip (``anchor_interval=16``); per round: its kind, the error of this
    rank's new value against the exact mix, the distance to its partner before the round, one round's progress."""
    torch.manual_seed(0)
    comm = Communicator()
    sync = ReplicaSync(nn.Linear(64, 64), comm, "random", seed=0, codec=make_codec("int4"), anchor_interval=16,
                       anchor_tolerance=tolerance)
    sync.broadcast_(0)
    records = []
    for round_index in range(ROUNDS):
        common = torch.Generator().manual_seed(round_index)
        mine = torch.Generator().manual_seed(1_000 * rank + round_index)
        progress = 0.0
        with torch.no_grad():
            for tensor in sync.state.tensors:
                step = STEP * torch.randn(tensor.shape, generator=common)
                tensor.add_(step + own_step * STEP * torch.randn(tensor.shape, generator=mine))
                progress += float(step.norm() ** 2)
        ratio = torch.tensor([float(sync.noise_ratio())], dtype=torch.float64)
        comm.all_reduce_([ratio], purpose="control", op="max")
        refresh = tolerance is not None and float(ratio) > tolerance
        before = flat(sync)
        everyone = [torch.empty_like(before) for _ in range(world_size)]
        dist.all_gather(everyone, before)
        sync.gossip_round(round_index, refresh=refresh)
        row = mixing_row("random", rank, world_size, round_index, 0)
        exact = row.self_weight * before + sum(w * everyone[j] for j, w in zip(row.recv_from, row.recv_weights))
        records.append({"kind": "refresh" if refresh or round_index % 16 == 15 else "graph",
                        "error": float((flat(sync) - exact).norm()),
                        "distance": float((before - everyone[row.recv_from[0]]).norm()),
                        "progress": progress ** 0.5})
    return records


def run_all(rank: int, world_size: int) -> dict[str, Any]:
    return {(own_step, tolerance): gossip(rank, world_size, own_step, tolerance)
            for own_step in (0.0, 0.3) for tolerance in (None, TOLERANCE)}


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    return run_ranks(run_all, 4, timeout=150.0)


def graph_ratios(world4: list[dict[str, Any]], key: tuple[float, float | None]) -> list[float]:
    return [r["error"] / r["distance"] for rank in world4 for r in rank[key] if r["kind"] == "graph"]


def test_graph_rounds_inject_at_most_the_tolerance_times_the_partner_distance(world4: list[dict[str, Any]]) -> None:
    # ranks apart by 0.3 of a round's progress: with a refresh every 16 rounds only, the error outgrows the distance
    assert max(graph_ratios(world4, (0.3, None))) > 2 * TOLERANCE
    adaptive = graph_ratios(world4, (0.3, TOLERANCE))
    assert adaptive and max(adaptive) <= TOLERANCE
    refreshes = sum(r["kind"] == "refresh" for r in world4[0][(0.3, TOLERANCE)])
    assert 3 < refreshes < ROUNDS  # more refreshes than every 16th round, fewer than every round


def test_at_exact_consensus_every_round_refreshes_and_injects_less_than_a_round_of_progress(
        world4: list[dict[str, Any]]) -> None:
    fixed, adaptive = world4[0][(0.0, None)], world4[0][(0.0, TOLERANCE)]
    # identical replicas: a graph round can only add error, and it grows with the drift since the anchor
    assert max(r["error"] / r["progress"] for r in fixed) > 0.5
    assert all(r["kind"] == "refresh" for r in adaptive[1:])
    assert max(r["error"] / r["progress"] for rank in world4 for r in rank[(0.0, TOLERANCE)]) < 0.3
