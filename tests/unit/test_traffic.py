"""The byte formulas of ``lightning_dopt.traffic`` against what ``comm_stats`` counts, on virtual ranks: warm-up
gradient means, graph rounds of several topologies (an odd count, where one rank rests), all-reduce rounds, and
compressed rounds with their exact-mean anchor refreshes (chunks aligned to the block size)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dopt.comm import ring_allreduce_bytes
from lightning_dopt.compress import make_codec
from lightning_dopt.engine import build_engine
from lightning_dopt.inprocess import InProcessGroup
from lightning_dopt.options import Options
from lightning_dopt.topk import TopKCodec
from lightning_dopt.traffic import compressed_mean_bytes, expected_traffic, gradient_mean_bytes, round_bytes


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


def measured(options: Options, world_size: int, steps: int) -> tuple[dict[str, float], int]:
    """Mean bytes per rank by purpose after ``steps`` steps (forward, backward, the engine's closure and step)."""
    group = InProcessGroup(world_size, timeout=20.0)
    modules = [model(rank) for rank in range(world_size)]
    engines = [build_engine(options, module, [list(module.parameters())], comm, rank, torch.device("cpu"),
                            background=comm.background, timeout=20.0)
               for rank, (module, comm) in enumerate(zip(modules, group.communicators()))]
    inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))

    def step(rank: int) -> None:
        module, params = modules[rank], list(modules[rank].parameters())

        def closure() -> None:
            module.zero_grad()
            module(inputs + rank).square().mean().backward()

        engines[rank].wrap_closure(0, params, closure)()
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
        engines[rank].after_step()

    for _ in range(steps):
        group.run(step)
    stats = [engine.comm_stats for engine in engines]
    group.close()
    return ({purpose: sum(s.bytes_sent_by_purpose.get(purpose, 0) for s in stats) / world_size
             for purpose in ("warmup", "round")}, stats[0].rounds)


CASES = [
    (Options(local_steps=3, warmup_steps=2, topology="random"), 5),
    (Options(local_steps=2, topology="ring", compression="int8", block_size=16, anchor_interval=3,
             anchor_tolerance=None), 4),
    (Options(local_steps=1, topology="complete"), 3),
    (Options(local_steps=2, topology="complete", compression="int4", block_size=8, anchor_tolerance=None), 3),
    (Options(local_steps=2, topology="one_peer_exponential", compression="bf16", warmup_steps=1,
             anchor_tolerance=None), 4),
    (Options(local_steps=2, topology="random", average_buffers=False, warmup_steps=1), 3),
    (Options(local_steps=1, topology="random", compression=TopKCodec(block_size=8, k=2, bits=2), anchor_interval=4,
             anchor_tolerance=None), 4),
    (Options(local_steps=2, topology="complete", compression=TopKCodec(block_size=8, k=1, bits=4, mean_k=5),
             anchor_tolerance=None), 4),
    (Options(local_steps=2, topology="complete", outer_optimizer="diloco", warmup_steps=1), 3),
    (Options(local_steps=2, topology="random", outer_optimizer="diloco"), 5),
    (Options(local_steps=3, topology="ring", outer_optimizer="diloco", average_buffers=False), 4),
]


@pytest.mark.parametrize(("options", "world_size"), CASES, ids=[f"{o.topology}-{o.codec.name if o.codec else o.outer_optimizer}-n{w}" for o, w in CASES])
def test_formulas_equal_the_counted_bytes(options: Options, world_size: int) -> None:
    steps = 9
    counted, rounds = measured(options, world_size, steps)
    reference = model(0)
    params = list(reference.parameters())
    expected = expected_traffic(options, sum(p.numel() for p in params), len(params), world_size, steps,
                                buffer_numel=sum(b.numel() for b in reference.buffers() if b.is_floating_point()))
    assert expected.rounds == rounds > 0
    assert counted == {"warmup": expected.warmup, "round": expected.round}


def test_formula_pieces() -> None:
    assert gradient_mean_bytes(100, 4, 4) == ring_allreduce_bytes(416, 4) == 624
    int8 = make_codec("int8", block_size=256)
    # 1000 values over 3 ranks: chunks of 2, 2 and 0 blocks (512, 488 and 0 values)
    assert compressed_mean_bytes(1000, int8, 0, 3) == int8.payload_bytes(488) + 2 * int8.payload_bytes(512)
    assert compressed_mean_bytes(1000, int8, 2, 3) == int8.payload_bytes(512) + int8.payload_bytes(488)
    topk = TopKCodec(block_size=8, k=1, bits=4, mean_k=5)  # 100 values, 4 ranks: chunks of 32, 32, 32, 4
    assert compressed_mean_bytes(100, topk, 3, 4) == 3 * topk.payload_bytes(32) + 3 * topk.mean_codec.payload_bytes(4)
    assert compressed_mean_bytes(100, topk, 0, 4) == (2 * topk.payload_bytes(32) + topk.payload_bytes(4)
                                                      + 3 * topk.mean_codec.payload_bytes(32))
    assert round_bytes(1000, 0, 4, 0, "ring") == 2 * 4000
    assert round_bytes(1000, 0, 4, 0, "complete") == ring_allreduce_bytes(4000, 4)
    assert round_bytes(1000, 0, 4, 0, "random", codec=int8) == int8.payload_bytes(1000)
    assert round_bytes(1000, 0, 1, 0, "random") == 0


def test_uncovered_options_are_refused() -> None:
    with pytest.raises(ValueError, match="aggregation='adacons'"):
        expected_traffic(Options(topology="complete", local_steps=4, aggregation="adacons"), 10, 1, 2, 8)
