"""An outer optimizer on the compressed mean pseudo-gradient (CompressedOuterRound, ``complete``) on virtual ranks:
outer SGD with lr 1 and no momentum is the compressed Local SGD round; with Nesterov every rank holds the same anchor
after each round and its replica is that anchor plus its unsent residual; bytes per round follow the formula; state
round-trips so a resumed run continues bitwise."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from lightning_dopt.compressed_rounds import CompressedOuterRound, CompressedRound
from lightning_dopt.engine import build_engine
from lightning_dopt.options import Options
from lightning_dopt.topk import TopKCodec
from lightning_dopt.traffic import expected_traffic
from test_gossip_outer import VirtualRun

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


def test_outer_sgd_with_lr_one_and_no_momentum_is_the_compressed_local_sgd_round() -> None:
    plain = VirtualRun(Options(local_steps=2, topology="complete", compression="int8"), 4)
    outer = VirtualRun(Options(local_steps=2, topology="complete", compression="int8",
                               outer_optimizer=functools.partial(torch.optim.SGD, lr=1.0)), 4)
    assert isinstance(plain.engines[0].sync.round, CompressedRound)
    assert isinstance(outer.engines[0].sync.round, CompressedOuterRound)
    plain.step(10)
    outer.step(10)
    for rank in range(4):
        assert torch.allclose(outer.flat(rank), plain.flat(rank), atol=1e-6, rtol=0)
    plain.step(1)  # a local step: the replicas differ again (the comparison above is not vacuous)
    assert float((plain.flat(0) - plain.flat(1)).abs().max()) > 1e-4
    plain.close()
    outer.close()


@pytest.mark.parametrize("codec", [TopKCodec(block_size=64, k=8, bits=2), TopKCodec(block_size=64, k=4, bits=2,
                                                                                    mean_k=20), "int8"],
                         ids=["topk", "topk_mean_k", "int8"])
def test_anchors_agree_after_every_round_and_bytes_follow_the_formula(codec: object) -> None:
    """Every rank steps the same anchor; each replica is its anchor plus what it has not sent (the error-feedback
    residual of a biased codec; nothing for int8, whose replicas are then equal)."""
    options = Options(local_steps=3, topology="complete", compression=codec, outer_optimizer=NESTEROV)
    run = VirtualRun(options, 3)
    run.step(9)  # three rounds
    compressions = [engine.sync.round.compression for engine in run.engines]
    anchors = [torch.cat([a.reshape(-1) for a in c.anchor]) for c in compressions]
    assert all(torch.equal(anchors[0], anchor) for anchor in anchors)
    for rank, compression in enumerate(compressions):
        state = compression.state  # the packed replica, laid out like the anchor
        kept = torch.cat(state.pack(state.new_buffers())) - anchors[rank]
        if compression.residual is None:
            assert torch.equal(run.flat(rank), run.flat(0))
        else:
            residual = torch.cat(compression.residual)
            assert float(residual.abs().max()) > 0
            assert torch.allclose(kept, residual, atol=1e-6, rtol=0)
    module = run.modules[0]
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    expected = expected_traffic(options, params, len(list(module.parameters())), 3, 9, buffer_numel=buffers)
    sent = [engine.comm_stats.bytes_sent_by_purpose["round"] for engine in run.engines]
    assert sum(sent) / 3 == expected.round and expected.rounds == 3
    run.close()


def test_state_round_trip_continues_bitwise() -> None:
    options = Options(local_steps=2, topology="complete", compression=TopKCodec(block_size=64, k=8, bits=2),
                      outer_optimizer=NESTEROV)
    first = VirtualRun(options, 3)
    first.step(4)
    saved = [copy.deepcopy((module.state_dict(), engine.state_dict()))
             for module, engine in zip(first.modules, first.engines)]
    residual = saved[0][1]["round"]["residual"]
    assert residual is not None and any(float(r.abs().max()) > 0 for r in residual)  # error feedback in use
    assert saved[0][1]["round"]["outer"]["state"]  # Nesterov momentum buffers
    first.step(4)

    second = VirtualRun(options, 3)
    for rank, (module, engine) in enumerate(zip(second.modules, second.engines)):
        module.load_state_dict(saved[rank][0])
        second.engines[rank] = build_engine(options, module, [list(module.parameters())], engine.comm, rank,
                                            torch.device("cpu"), steps=4, round_index=2)
        second.engines[rank].load_state_dict(saved[rank][1])
    second.steps = 4
    second.step(4)
    for rank in range(3):
        assert torch.equal(first.flat(rank), second.flat(rank))
    first.close()
    second.close()
