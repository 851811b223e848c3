"""The in-process communicator: collectives, point-to-point order, byte accounting, failures; and the round objects
run on it (N virtual ranks as threads of the test process, no process group)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dopt.comm import PeerFailure, ring_allreduce_bytes
from lightning_dopt.compress import make_codec
from lightning_dopt.gradients import GradientAverager
from lightning_dopt.inprocess import InProcessCommunicator, InProcessGroup
from lightning_dopt.replica import ReplicaSync
from topology_oracles import mixing_matrix


def run(world_size: int, fn, timeout: float = 20.0) -> list:
    group = InProcessGroup(world_size, timeout=timeout)
    comms = group.communicators()
    try:
        return group.run(lambda rank: fn(comms[rank]))
    finally:
        group.close()


def test_all_reduce_is_identical_on_every_rank_and_counted_as_a_ring() -> None:
    def fn(comm: InProcessCommunicator) -> tuple:
        values = torch.arange(6, dtype=torch.float32) * (comm.rank + 1)
        top = torch.tensor([float(comm.rank)])
        half = torch.full((4,), 60000.0, dtype=torch.float16)  # an fp16 sum would overflow: reduced in fp32
        comm.all_reduce_([values], purpose="round", op="mean")
        comm.all_reduce_([top], purpose="control", op="max")
        comm.all_reduce_([half], purpose="round", op="mean")
        return values, top, half, comm.stats
    results = run(3, fn)
    for values, top, half, stats in results:
        assert torch.equal(values, torch.arange(6, dtype=torch.float32) * 2)
        assert top.item() == 2.0
        assert half.dtype == torch.float16 and torch.equal(half, torch.full((4,), 60000.0, dtype=torch.float16))
        assert stats.bytes_sent_by_purpose["round"] == ring_allreduce_bytes(24, 3) + ring_allreduce_bytes(16, 3)
        assert stats.bytes_sent_by_purpose["control"] == ring_allreduce_bytes(4, 3)


def test_broadcast_and_exchange_match_in_posting_order() -> None:
    def fn(comm: InProcessCommunicator) -> tuple:
        start = torch.full((3,), float(comm.rank))
        comm.broadcast_([start], src=1, purpose="start")
        peer = comm.rank ^ 1
        first, second = torch.empty(2), torch.empty(5)
        comm.exchange_each([(peer, [torch.full((2,), 10.0 + comm.rank), torch.full((5,), 20.0 + comm.rank)])],
                           [(peer, [first, second])], purpose="round")
        return start, first, second, comm.stats
    results = run(2, fn)
    for rank, (start, first, second, stats) in enumerate(results):
        assert torch.equal(start, torch.ones(3))
        assert torch.equal(first, torch.full((2,), 10.0 + (1 - rank)))
        assert torch.equal(second, torch.full((5,), 20.0 + (1 - rank)))
        assert stats.bytes_sent_by_purpose["round"] == 28 and stats.bytes_received == 28 + (0 if rank == 1 else 12)
        assert stats.bytes_sent_by_purpose["start"] == (12 if rank == 1 else 0)


def test_mismatched_messages_are_refused() -> None:
    def fn(comm: InProcessCommunicator) -> None:
        peer = comm.rank ^ 1
        comm.exchange([torch.zeros(3 + comm.rank)], [peer], [[torch.empty(3 + comm.rank)]], [peer], purpose="round")
    with pytest.raises(PeerFailure, match="posted different messages"):
        run(2, fn)


def test_a_rank_that_raises_ends_the_others_at_once() -> None:
    def fn(comm: InProcessCommunicator) -> None:
        if comm.rank == 2:
            raise ValueError("boom on rank 2")
        comm.all_reduce_([torch.zeros(1)], purpose="control")
        comm.exchange([], [], [[torch.empty(1)]], [2], purpose="round")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="boom on rank 2"):
        run(3, fn, timeout=30.0)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("missing", ["collective", "message"])
def test_every_wait_is_bounded(missing: str) -> None:
    def fn(comm: InProcessCommunicator) -> None:
        if comm.rank == 1:
            return  # never joins / never sends
        if missing == "collective":
            comm.all_reduce_([torch.zeros(1)], purpose="control")
        else:
            comm.exchange([], [], [[torch.empty(1)]], [1], purpose="round")
    with pytest.raises(PeerFailure, match="rank 0"):
        run(2, fn, timeout=0.5)


def test_bad_group_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        InProcessGroup(0)
    with pytest.raises(ValueError, match="timeout"):
        InProcessGroup(2, timeout=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        InProcessCommunicator(InProcessGroup(2), 2)


# ----------------------------------------------------------------------------------- round objects on it
def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        model[1].running_mean.normal_()
    return model


def flat(sync: ReplicaSync) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).double() for t in sync.state.tensors]).numpy()


@pytest.mark.parametrize("topology,world_size", [("ring", 5), ("exponential", 4), ("torus", 4),
                                                 ("one_peer_exponential", 4), ("random", 4), ("random", 5),
                                                 ("complete", 3)])
def test_rounds_apply_the_topology_mixing_matrix(topology: str, world_size: int) -> None:
    rounds = 4

    def fn(comm: InProcessCommunicator) -> list[np.ndarray]:
        sync = ReplicaSync(make_model(comm.rank), comm, topology, seed=3)
        states = [flat(sync)]
        for index in range(rounds):
            sync.gossip_round(index)
            states.append(flat(sync))
        return states
    states = np.stack([np.stack(s) for s in run(world_size, fn)])  # [rank, round, value]
    expected = states[:, 0]
    for index in range(rounds):
        expected = np.asarray(mixing_matrix(topology, world_size, index, 3)) @ expected
        np.testing.assert_allclose(states[:, index + 1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states[:, -1].mean(0), states[:, 0].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("codec", ["int8", "int4", "bf16"])
def test_compressed_rounds_keep_every_anchor_identical_and_the_mean_unbiased(codec: str) -> None:
    def fn(comm: InProcessCommunicator) -> tuple:
        sync = ReplicaSync(make_model(comm.rank), comm, "random", seed=1, codec=make_codec(codec),
                           anchor_interval=4)
        sync.broadcast_(src=0)
        generator = torch.Generator().manual_seed(10 + comm.rank)
        means = []
        for index in range(8):
            with torch.no_grad():
                for tensor in sync.state.tensors:
                    tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
            before = flat(sync)
            sync.gossip_round(index)
            means.append((before, flat(sync)))
        anchor = torch.cat([a.reshape(-1) for a in sync.compression.anchor])
        return means, anchor, sync.comm.stats.rounds
    results = run(4, fn)
    anchors = [anchor for _, anchor, _ in results]
    assert all(torch.equal(anchors[0], other) for other in anchors[1:])
    assert all(rounds == 8 for _, _, rounds in results)
    for index in range(8):
        before = np.mean([r[0][index][0] for r in results], axis=0)
        after = np.mean([r[0][index][1] for r in results], axis=0)
        spread = np.abs(np.stack([r[0][index][0] for r in results]) - before).max()
        assert np.abs(after - before).max() < 0.2 * spread + 1e-6


def test_gradient_averager_on_virtual_ranks() -> None:
    def fn(comm: InProcessCommunicator) -> torch.Tensor:
        weight = nn.Parameter(torch.zeros(4))
        weight.grad = torch.full((4,), float(comm.rank))
        GradientAverager([weight], comm).average_()
        return weight.grad
    assert all(torch.equal(grad, torch.full((4,), 1.5)) for grad in run(4, fn))


def test_background_groups_are_shared_by_rank_order() -> None:
    def fn(comm: InProcessCommunicator) -> tuple:
        background = comm.background()
        value = torch.tensor([float(comm.rank)])
        background.all_reduce_([value], purpose="round", op="sum")
        return value.item(), background.stats is comm.stats, comm.stats.seconds
    for total, shared, seconds in run(3, fn):
        assert total == 3.0 and shared and seconds == 0.0
