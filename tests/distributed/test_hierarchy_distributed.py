"""``hierarchy="node"`` on 3 nodes × 2 ranks of gloo (6 processes, no Lightning): the engine with its node and
cross-node communicators, driven by a plain training loop.

One 6-rank world runs every scenario (starting ranks costs a fresh interpreter each). Rank ``r`` is local rank
``r % 2`` of node ``r // 2``. Each scenario trains a small MLP with BatchNorm on per-rank data for 8 steps with
``local_steps=2`` (rounds after steps 2, 4, 6 and 8), records every rank's state after each step and its byte
counters, then checkpoints at step 4, trains on, and replays steps 5–8 from the checkpoint in a new engine.
Scenarios: fp32 rounds, int8 rounds, int8 rounds overlapped with the next local steps (``overlap=True``), and int8
rounds with Adam-type scaling (its statistics, sharded like the replica, travel in the rounds).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from helpers import run_ranks
from lightning_dopt.comm import Communicator, FlatState, ring_allreduce_bytes
from lightning_dopt.compress import make_codec
from lightning_dopt.engine import build_engine
from lightning_dopt.hierarchy import NodeComms, NodeLayout, new_node_comms, shard_bounds
from lightning_dopt.options import Options
from lightning_dopt.topology import mixing_row

NODES, LOCAL = 3, 2
WORLD = NODES * LOCAL
STEPS, LOCAL_STEPS, CHECKPOINT_STEP = 8, 2, 4
SEED = 0


def make_model() -> nn.Module:
    """19,864 parameters and 512 float buffers: the round state is cut into shards of 12,288 and 8,088 values."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 40))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 32, generator=generator), torch.randint(0, 40, (16,), generator=generator)


def state_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in [*model.parameters(), *model.buffers()]])


def node_comms(world: Communicator, background: bool = False) -> NodeComms:
    return new_node_comms(NodeLayout(WORLD, LOCAL), world.stats, counts_time=not background)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, engine: Any, rank: int, steps: range,
          on_step: Any = None) -> None:
    params = list(model.parameters())
    for step in steps:
        inputs, targets = batch(rank, step)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            return loss

        optimizer.step(engine.wrap_closure(0, params, closure))
        engine.after_step()
        if on_step is not None:
            on_step(step)


def scenario(rank: int, world: Communicator, comms: NodeComms, compression: str | None,
             overlap: bool = False, scaling: str | None = None) -> dict[str, Any]:
    options = Options(local_steps=LOCAL_STEPS, topology="random", seed=SEED, compression=compression,
                      anchor_tolerance=None, hierarchy="node", overlap=overlap, scaling=scaling)

    def build(steps: int = 0, round_index: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = build_engine(options, model, [list(model.parameters())], world, rank, torch.device("cpu"), steps,
                              round_index, background=lambda: world.background(None), timeout=60.0, node=comms,
                              node_background=lambda: node_comms(world, background=True))
        return model, optimizer, engine

    model, optimizer, engine = build()
    engine.sync.broadcast_(0)
    states, sent, checkpoint = [], [], None

    def record(step: int) -> None:
        nonlocal checkpoint
        states.append(state_of(model))
        sent.append(dict(engine.comm_stats.bytes_sent_by_purpose))
        if step == CHECKPOINT_STEP:
            engine.drain()  # as the strategy does before a save
            checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "engine": engine.state_dict()})  # what a checkpoint file would hold

    train(model, optimizer, engine, rank, range(1, STEPS + 1), record)
    engine.finish_fit()
    final = state_of(model)
    round_state_sizes = [b.numel() for b in FlatState(
        [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]).new_buffers()]

    resumed, optimizer2, engine2 = build(CHECKPOINT_STEP, CHECKPOINT_STEP // LOCAL_STEPS)
    resumed.load_state_dict(checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optimizer"])
    engine2.load_state_dict(checkpoint["engine"])
    train(resumed, optimizer2, engine2, rank, range(CHECKPOINT_STEP + 1, STEPS + 1))
    return {"states": states, "sent": sent, "final": final, "resumed": state_of(resumed),
            "uninterrupted": states[-1], "sizes": round_state_sizes,
            "grad_values": sum(p.numel() for p in model.parameters()), "grad_tensors": len(list(model.parameters()))}


def world_run(rank: int, world_size: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    results = {}
    for name, compression, overlap, scaling in (("fp32", None, False, None), ("int8", "int8", False, None),
                                                ("int8_overlap", "int8", True, None), ("int8_adam", "int8", False, "adam")):
        world = Communicator()  # fresh counters per scenario
        results[name] = scenario(rank, world, node_comms(world), compression, overlap, scaling)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(world_run, WORLD, timeout=180.0)


def partners(round_index: int) -> dict[int, list[int]]:
    """Node → the nodes it receives from at ``round_index`` (the mixing rows over nodes)."""
    return {node: mixing_row("random", node, NODES, round_index, SEED).recv_from for node in range(NODES)}


@pytest.mark.parametrize("codec", ["fp32", "int8", "int8_overlap", "int8_adam"])
def test_a_node_is_one_replica_and_nodes_mix_at_rounds(ranks: list[dict[str, Any]], codec: str) -> None:
    runs = [r[codec] for r in ranks]
    for step in range(STEPS):
        for node in range(NODES):
            first, second = runs[2 * node]["states"][step], runs[2 * node + 1]["states"][step]
            assert torch.equal(first, second), (codec, step + 1, node)  # bitwise: one replica per node
        if codec == "int8_overlap":  # a round lands one round late, on top of the steps taken meanwhile
            continue
        if (step + 1) % LOCAL_STEPS:  # a local step: the nodes trained on different data
            assert not torch.equal(runs[0]["states"][step], runs[2]["states"][step])
            assert not torch.equal(runs[2]["states"][step], runs[4]["states"][step])
        else:  # after a round: a paired node equals its partner (both ends compute the same ½/½ mix)
            for node, sources in partners((step + 1) // LOCAL_STEPS - 1).items():
                for source in sources:
                    assert torch.equal(runs[2 * node]["states"][step], runs[2 * source]["states"][step])
    finals = [run["final"] for run in runs]
    assert all(torch.equal(finals[0], final) for final in finals)


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_bytes_between_and_inside_nodes_match_the_formulas(ranks: list[dict[str, Any]], codec: str) -> None:
    codec_object = make_codec(None if codec == "fp32" else codec)
    for rank, result in enumerate(ranks):
        run = result[codec]
        node, local = divmod(rank, LOCAL)
        shards = [shard_bounds(size, LOCAL)[local] for size in run["sizes"]]
        shard_values = [stop - start for start, stop in shards]
        shard_bytes = sum(4 * n if codec_object is None else codec_object.payload_bytes(n) for n in shard_values if n)
        gradient_bytes = ring_allreduce_bytes(4 * (run["grad_values"] + run["grad_tensors"]), LOCAL)
        buffer_bytes = ring_allreduce_bytes(4 * 512, LOCAL)  # BatchNorm's running mean and variance, every step
        gather_bytes = (LOCAL - 1) * 4 * sum(shard_values)  # this rank's mixed shard to the node's other ranks
        previous: dict[str, int] = {}
        for step, sent in enumerate(run["sent"], start=1):
            is_round = step % LOCAL_STEPS == 0
            paired = is_round and bool(partners(step // LOCAL_STEPS - 1)[node])
            round_sent = sent.get("round", 0) - previous.get("round", 0)
            node_sent = sent.get("node", 0) - previous.get("node", 0)
            assert round_sent == (shard_bytes if paired else 0), (codec, rank, step)
            assert node_sent == gradient_bytes + buffer_bytes + (gather_bytes if is_round else 0), (codec, rank, step)
            previous = sent


@pytest.mark.parametrize("codec", ["fp32", "int8", "int8_overlap", "int8_adam"])
def test_resume_from_a_checkpoint_is_exact(ranks: list[dict[str, Any]], codec: str) -> None:
    for result in ranks:
        assert torch.equal(result[codec]["resumed"], result[codec]["uninterrupted"])
