"""An outer optimizer over a graph topology with compressed anchors and pseudo-gradients (CompressedGossipOuterRound)
on virtual ranks: with a lossless codec it is the uncompressed GossipOuterRound (outer SGD with lr 1 and no momentum
being plain gossip is tested with both in test_gossip_outer.py); refresh rounds give every rank the same reference; bytes per round follow the formula;
error feedback is kept and a resumed run continues bitwise."""

from __future__ import annotations

import pytest
import torch

from lightning_dopt.compressed_rounds import CompressedGossipOuterRound
from lightning_dopt.options import Options
from lightning_dopt.rounds import GossipOuterRound
from lightning_dopt.topk import TopKCodec
from lightning_dopt.traffic import expected_traffic
from test_gossip_outer import NESTEROV, NO_REFRESH, LosslessCodec, VirtualRun


def test_a_lossless_codec_gives_the_uncompressed_outer_round() -> None:
    """Nesterov outer steps and BatchNorm buffers included: the compressed round with an identity codec equals
    GossipOuterRound, so the encoded path adds nothing but the codec's error."""
    exact = VirtualRun(Options(local_steps=3, topology="random", outer_optimizer=NESTEROV), 4)
    lossless = VirtualRun(Options(local_steps=3, topology="random", outer_optimizer=NESTEROV,
                                  compression=LosslessCodec(), anchor_interval=NO_REFRESH), 4)
    assert isinstance(exact.engines[0].sync.round, GossipOuterRound)
    assert isinstance(lossless.engines[0].sync.round, CompressedGossipOuterRound)
    exact.step(15)
    lossless.step(15)
    for rank in range(4):
        assert torch.allclose(lossless.flat(rank), exact.flat(rank), atol=1e-5, rtol=0)
    assert float((exact.flat(0) - exact.flat(1)).abs().max()) > 1e-3
    exact.close()
    lossless.close()


def test_int8_rounds_stay_near_the_uncompressed_ones_and_refreshes_share_the_reference() -> None:
    exact = VirtualRun(Options(local_steps=2, topology="ring", outer_optimizer=NESTEROV), 4)
    int8 = VirtualRun(Options(local_steps=2, topology="ring", outer_optimizer=NESTEROV, compression="int8",
                              anchor_interval=3), 4)
    exact.step(12)
    int8.step(4)  # rounds 0 and 1: graph rounds, the reference is still the common start
    start = int8.engines[0].sync.round.anchors.anchor[0].clone()
    int8.step(8)  # rounds 2..5: rounds 2 and 5 refresh the reference
    references = [engine.sync.round.anchors.anchor[0] for engine in int8.engines]
    assert all(torch.equal(references[0], reference) for reference in references)
    assert not torch.equal(references[0], start)
    gap = max(float((int8.flat(rank) - exact.flat(rank)).abs().max()) for rank in range(4))
    spread = float((exact.flat(0) - exact.flat(2)).abs().max())
    assert 0 < gap < 0.25 * spread, (gap, spread)  # quantization error, small against the replicas' spread
    exact.close()
    int8.close()


@pytest.mark.parametrize(("codec", "topology", "world_size"),
                         [("int8", "random", 4), ("int4", "ring", 3),
                          (TopKCodec(block_size=64, k=8, bits=2), "one_peer_exponential", 4)],
                         ids=["int8-random", "int4-ring", "topk-exponential"])
def test_bytes_follow_the_formula(codec: object, topology: str, world_size: int) -> None:
    options = Options(local_steps=2, topology=topology, compression=codec, outer_optimizer=NESTEROV,
                      anchor_interval=3)
    run = VirtualRun(options, world_size)
    run.step(14)  # seven rounds, two of them refreshes
    module = run.modules[0]
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    expected = expected_traffic(options, params, len(list(module.parameters())), world_size, 14,
                                buffer_numel=buffers)
    sent = [engine.comm_stats.bytes_sent_by_purpose["round"] for engine in run.engines]
    assert expected.rounds == 7 and sum(sent) / world_size == pytest.approx(expected.round, rel=1e-12)
    run.close()


def test_error_feedback_is_kept_and_a_resumed_run_continues_bitwise() -> None:
    options = Options(local_steps=2, topology="random", compression=TopKCodec(block_size=64, k=8, bits=2),
                      outer_optimizer=NESTEROV, anchor_interval=3)
    straight = VirtualRun(options, 3)
    straight.step(12)
    first = VirtualRun(options, 3)
    first.step(6)
    saved = first.checkpoint()
    first.close()
    round_state = saved[0][0]["round"]
    assert any(float(r.abs().max()) > 0 for r in round_state["pseudo_gradients"]["residual"])  # error feedback
    assert round_state["outer"]["state"]  # Nesterov momentum
    resumed = VirtualRun(options, 3)
    resumed.restore(saved)
    resumed.step(6)
    for rank in range(3):
        assert torch.equal(resumed.flat(rank), straight.flat(rank))
        assert torch.equal(resumed.engines[rank].sync.round.anchor[0], straight.engines[rank].sync.round.anchor[0])
    straight.close()
    resumed.close()


def test_scaling_is_still_refused() -> None:
    with pytest.raises(ValueError, match="outer-gossip-scaling|cannot be combined"):
        Options(local_steps=2, topology="random", compression="int8", outer_optimizer=NESTEROV, scaling="adam")
