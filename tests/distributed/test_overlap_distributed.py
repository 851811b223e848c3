"""Non-blocking rounds (:class:`OverlappedRounds`) on real gloo process groups (4 CPU ranks, no Lightning).

One 4-rank world runs every scenario (each with its own model) and returns what every rank saw; the tests compare
those records with references computed here. Failure scenarios (a partner that raises or vanishes while a round is
in flight) run in 2-rank worlds of their own.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import run_ranks
from lightning_dopt.comm import Communicator, PeerFailure
from lightning_dopt.rounds import FLAG_BLOCKS, OverlappedRounds
from lightning_dopt.replica import ReplicaSync

ROUNDS = 24
WIDTH = 48


def make_model(seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH))
    with torch.no_grad():
        for tensor in list(model.parameters()) + [model[1].running_mean]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def state(sync: ReplicaSync) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).double() for t in sync.state.tensors]).numpy().copy()


def no_flags(comm: Communicator) -> torch.Tensor:
    return torch.zeros(FLAG_BLOCKS * comm.world_size, dtype=torch.float64)


def local_progress(sync: ReplicaSync, rank: int, round_index: int) -> np.ndarray:
    """Add a rank- and round-specific step to the replica (stands for the local steps between rounds)."""
    generator = torch.Generator().manual_seed(1_000 * rank + round_index)
    deltas = [0.01 * torch.randn(t.shape, generator=generator) for t in sync.state.tensors]
    with torch.no_grad():
        for tensor, delta in zip(sync.state.tensors, deltas):
            tensor.add_(delta)
    return torch.cat([d.reshape(-1).double() for d in deltas]).numpy()


def _world4(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(rank)
    comm = Communicator()
    background = comm.background(timedelta(seconds=30))
    out: dict[str, Any] = {}

    # lr 0: overlapped rounds with nothing happening between them
    for codec in (None, "int8"):
        from lightning_dopt.compress import make_codec
        sync = ReplicaSync(make_model(10 + rank), comm, "random", seed=3, codec=make_codec(codec))
        if codec is not None:
            sync.compression.anchor[0].zero_()  # a common anchor without a broadcast (replicas stay distinct)
        overlapped = OverlappedRounds(sync, background, timeout=30.0)
        history = [state(sync)]
        for r in range(ROUNDS):
            overlapped.finish()
            overlapped.start(r, no_flags(comm))
            history.append(state(sync))
        overlapped.finish()
        history.append(state(sync))
        out[f"lr0_{codec}"] = np.stack(history)

    # blocking reference of the same lr-0 schedule (fp32)
    sync = ReplicaSync(make_model(10 + rank), comm, "random", seed=3)
    blocking = [state(sync)]
    for r in range(ROUNDS):
        sync.gossip_round(r)
        blocking.append(state(sync))
    out["blocking"] = np.stack(blocking)

    # local progress between rounds: the delta rule keeps it and preserves the mean
    sync = ReplicaSync(make_model(10 + rank), comm, "random", seed=5)
    overlapped = OverlappedRounds(sync, background, timeout=30.0)
    start_state, progress = state(sync), np.zeros_like(state(sync))
    for r in range(ROUNDS):
        progress += local_progress(sync, rank, r)
        overlapped.finish()
        overlapped.start(r, no_flags(comm))
    overlapped.finish()
    out["progress"] = (start_state, progress, state(sync))

    # flags: every rank learns every rank's flags one round later; a non-finite flag skips the exchange
    sync = ReplicaSync(make_model(10 + rank), comm, "random", seed=7)
    overlapped = OverlappedRounds(sync, background, timeout=30.0)
    before = state(sync)
    flags = no_flags(comm)
    flags[world_size + 2] = float(rank == 2)
    flags[1] = float(rank == 1)
    overlapped.start(0, flags)
    out["flags"] = overlapped.finish().tolist()
    out["flags_unchanged"] = bool(np.array_equal(before, state(sync)))
    out["in_flight_twice"] = None
    overlapped.start(1, no_flags(comm))
    try:
        overlapped.start(2, no_flags(comm))
    except RuntimeError as error:
        out["in_flight_twice"] = str(error)
    overlapped.finish()
    out["rounds"] = comm.stats.rounds
    return out


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    return run_ranks(_world4, 4, timeout=180)


def _consensus(states: np.ndarray) -> float:
    mean = states.mean(axis=0)
    return float(((states - mean) ** 2).sum() / (mean ** 2).sum())


def test_lr0_overlapped_gossip_reaches_consensus_and_preserves_the_mean(world4: list[dict[str, Any]]) -> None:
    histories = np.stack([rank["lr0_None"] for rank in world4])  # (ranks, rounds + 2, d)
    means = histories.mean(axis=0)
    np.testing.assert_allclose(means, np.broadcast_to(means[0], means.shape), rtol=0, atol=1e-6)
    first, last = _consensus(histories[:, 0]), _consensus(histories[:, -1])
    assert first > 0.5 and last < 1e-6, (first, last)


def test_lr0_overlapped_round_equals_the_blocking_round_one_call_later(world4: list[dict[str, Any]]) -> None:
    overlapped = np.stack([rank["lr0_None"] for rank in world4])
    blocking = np.stack([rank["blocking"] for rank in world4])
    # with nothing happening between rounds, finishing round r (call r + 2) gives blocking round r's result, up to
    # the rounding of x + (m - s) with x = s (one float32 ulp per round)
    np.testing.assert_allclose(overlapped[:, 2:], blocking[:, 1:], rtol=0, atol=2e-6)


def test_lr0_overlapped_int8_gossip_converges(world4: list[dict[str, Any]]) -> None:
    histories = np.stack([rank["lr0_int8"] for rank in world4])
    first, last = _consensus(histories[:, 0]), _consensus(histories[:, -1])
    assert last < 1e-3 * first, (first, last)
    drift = np.abs(histories[:, -1].mean(axis=0) - histories[:, 0].mean(axis=0)).max()
    assert drift < 0.05, drift  # unbiased rounding: the mean moves by at most a few quantization steps


def test_delta_rule_keeps_local_progress_and_preserves_the_mean(world4: list[dict[str, Any]]) -> None:
    starts = np.stack([rank["progress"][0] for rank in world4])
    progress = np.stack([rank["progress"][1] for rank in world4])
    finals = np.stack([rank["progress"][2] for rank in world4])
    np.testing.assert_allclose(finals.mean(axis=0), starts.mean(axis=0) + progress.mean(axis=0), rtol=0, atol=1e-5)
    assert _consensus(finals) < 0.05 * _consensus(starts)


def test_flags_reach_every_rank_and_a_non_finite_flag_skips_the_exchange(world4: list[dict[str, Any]]) -> None:
    expected = [0.0, 1.0, 0.0, 0.0] + [0.0, 0.0, 1.0, 0.0] + [0.0] * 8  # stop, non-finite, pace, noise blocks
    assert all(rank["flags"] == expected for rank in world4)
    assert all(rank["flags_unchanged"] for rank in world4)
    assert all("still in flight" in rank["in_flight_twice"] for rank in world4)
    # 3 scenarios × 24 rounds + 2 flag rounds (the first skipped its exchange but still counts) + 24 blocking
    assert {rank["rounds"] for rank in world4} == {4 * ROUNDS + 1}


# ------------------------------------------------------------------------------------------ failures in flight
def _partner_fails(rank: int, world_size: int, how: str) -> str:
    comm = Communicator()
    comm.start_liveness("test", interval=0.5)
    background = comm.background(timedelta(seconds=60))
    sync = ReplicaSync(make_model(rank), comm, "random", seed=0)
    overlapped = OverlappedRounds(sync, background, timeout=60.0)
    if rank == 1:
        if how == "raises":
            comm.liveness.report_error("ValueError: boom in training_step")
        comm.liveness.stop()
        dist.destroy_process_group(background.group)
        time.sleep(4)
        return "gone"
    time.sleep(1.0)
    started = time.monotonic()
    overlapped.start(0, no_flags(comm))
    try:
        overlapped.finish()
    except PeerFailure as error:
        return f"{time.monotonic() - started:.1f}|{error}"
    return "no error"


@pytest.mark.parametrize("how", ["raises", "vanishes"])
def test_a_failed_partner_ends_the_round_in_flight_with_its_rank_named(how: str) -> None:
    result = run_ranks(_partner_fails, 2, how, timeout=90)[0]
    assert "|" in result, result
    seconds, message = result.split("|", 1)
    assert float(seconds) < 30, result
    assert message.startswith("rank 0: ") and "rank 1" in message, message
    if how == "raises":
        assert "rank 1 raised: ValueError: boom in training_step" in message
    else:
        assert "rank 1 stopped without an error" in message
