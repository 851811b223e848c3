"""AdaConsGradients on real gloo process groups: the combined gradient equals the single-process reference
computed from all ranks' gradients, on every rank, for 2 and 3 ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from helpers import run_ranks
from adacons_oracles import adacons_reference
from lightning_dopt.aggregate import SubspaceMomentum, consensus_weights, subspace_coefficients, worker_multipliers
from lightning_dopt.comm import Communicator, ring_allreduce_bytes
from lightning_dopt.gradients import AdaConsGradients

SCENARIOS: dict[str, dict[str, Any]] = {
    "global": {},
    "layerwise": {"layerwise": True},
    "momentum": {"momentum": 0.9},
    "layerwise_momentum_scaled": {"layerwise": True, "momentum": 0.5, "preserve_scale": True},
    "guard_mean": {"guard": "mean"},
    "stale": {"stale_weights": True, "momentum": 0.5},
}
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))


def _gradients(step: int, rank: int, anti_aligned: bool) -> list[torch.Tensor]:
    """A shared direction plus rank noise; with ``anti_aligned`` rank 1 points the other way (negative coefficient)."""
    common = torch.Generator().manual_seed(100 + step)
    own = torch.Generator().manual_seed(1000 * step + rank)
    shapes = [(5, 7), (5,), (3, 5), (3,)]
    sign = -1.0 if anti_aligned and rank == 1 else 1.0
    return [sign * torch.randn(shape, generator=common) + 0.5 * torch.randn(shape, generator=own) for shape in shapes]


def _combine_on_ranks(rank: int, world_size: int) -> dict[str, Any]:
    records: dict[str, Any] = {}
    for name, options in SCENARIOS.items():
        for anti_aligned in (False, True):
            model = _model()
            comm = Communicator()
            combiner = AdaConsGradients(model.parameters(), comm, **options)
            outputs, inputs = [], []
            for step in range(STEPS):
                grads = _gradients(step, rank, anti_aligned)
                for param, grad in zip(model.parameters(), grads):
                    param.grad = grad.clone()
                inputs.append(torch.cat([g.flatten() for g in grads]))
                before = comm.stats.bytes_sent_by_purpose.get("aggregate", 0)
                combiner.combine_()
                sent = comm.stats.bytes_sent_by_purpose["aggregate"] - before
                outputs.append((torch.cat([p.grad.flatten() for p in model.parameters()]), sent))
            records[f"{name}/{anti_aligned}"] = {"inputs": inputs, "outputs": outputs}
    return records


def _stale_reference(all_inputs: list[torch.Tensor], sizes: list[int] | None, beta: float) -> list[torch.Tensor]:
    """Stale weights: step 0 is full AdaCons; later steps use the previous weights, then recompute them against
    the combined result."""
    momentum = SubspaceMomentum(beta)
    results, weights = [], None
    for grads in all_inputs:  # grads: [N, D]
        segments = sizes or [grads.shape[1]]
        parts = grads.split(segments, dim=1)
        norms = torch.stack([torch.linalg.vector_norm(p, dim=1) for p in parts], dim=1)
        if weights is None:
            mean = grads.mean(0)
            dots = torch.stack([p @ m for p, m in zip(parts, mean.split(segments))], dim=1)
            weights = consensus_weights(momentum(subspace_coefficients(dots, norms)))
            multipliers = worker_multipliers(weights, norms)
            result = (grads * multipliers.repeat_interleave(torch.tensor(segments), dim=1)).sum(0)
        else:
            multipliers = worker_multipliers(weights, norms)
            result = (grads * multipliers.repeat_interleave(torch.tensor(segments), dim=1)).sum(0)
            dots = torch.stack([p @ r for p, r in zip(parts, result.split(segments))], dim=1)
            weights = consensus_weights(momentum(subspace_coefficients(dots, norms)))
        results.append(result)
    return results


@pytest.fixture(scope="module", params=[2, 3])
def world(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_ranks(_combine_on_ranks, request.param, timeout=150)


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("anti_aligned", [False, True])
def test_combined_gradient_equals_the_reference_on_every_rank(world: tuple[int, list[dict[str, Any]]], name: str,
                                                               anti_aligned: bool) -> None:
    world_size, records = world
    options = SCENARIOS[name]
    key = f"{name}/{anti_aligned}"
    sizes = [35, 5, 15, 3] if options.get("layerwise") else None
    per_step_inputs = [torch.stack([records[r][key]["inputs"][step] for r in range(world_size)])
                       for step in range(STEPS)]
    if options.get("stale_weights"):
        expected = _stale_reference(per_step_inputs, sizes, options.get("momentum", 0.0))
    else:
        momentum = SubspaceMomentum(options.get("momentum", 0.0))
        expected = [adacons_reference(grads, momentum=momentum, guard=options.get("guard", "shift"),
                                      layer_sizes=sizes, preserve_scale=options.get("preserve_scale", False))
                    for grads in per_step_inputs]
    for step in range(STEPS):
        for rank in range(world_size):
            got = records[rank][key]["outputs"][step][0]
            assert torch.allclose(got, expected[step], rtol=1e-5, atol=1e-6), (step, rank, got, expected[step])
        assert torch.equal(records[0][key]["outputs"][step][0], records[world_size - 1][key]["outputs"][step][0])


def test_bytes_per_step_are_two_gradient_allreduces_or_one_with_stale_weights(
        world: tuple[int, list[dict[str, Any]]]) -> None:
    world_size, records = world
    gradient_bytes = 4 * (35 + 5 + 15 + 3)
    table = 4 * world_size  # one coefficient per rank (global weights)
    flags = ring_allreduce_bytes(4 * 4, world_size)  # which of the 4 parameter tensors have a gradient anywhere
    full = records[0]["global/False"]["outputs"][1][1]
    stale = records[0]["stale/False"]["outputs"][1][1]
    assert full == 2 * ring_allreduce_bytes(gradient_bytes, world_size) + ring_allreduce_bytes(table, world_size) + flags
    assert stale == ring_allreduce_bytes(gradient_bytes, world_size) + ring_allreduce_bytes(table, world_size) + flags


def _pseudo_gradient_round(rank: int, world_size: int, layerwise: bool) -> dict[str, Any]:
    from lightning_dopt.gradients import AdaConsCombiner
    from lightning_dopt.replica import ReplicaSync

    model = _model()
    comm = Communicator()
    sizes = [p.numel() for p in model.parameters()] if layerwise else None
    combiner = AdaConsCombiner(comm, sizes, momentum=0.0, guard="shift", preserve_scale=True, stale_weights=False,
                               purpose="round")
    sync = ReplicaSync(model, comm, "complete", seed=0, round_combiner=combiner)
    sync.broadcast_()
    anchor = torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        for param, step in zip(model.parameters(), _gradients(0, rank, anti_aligned=False)):
            param.sub_(0.1 * step)  # local progress since the anchor
    local = torch.cat([p.detach().flatten() for p in model.parameters()])
    sync.gossip_round(0)
    return {"anchor": anchor, "local": local, "after": torch.cat([p.detach().flatten() for p in model.parameters()])}


@pytest.mark.parametrize("layerwise", [False, True])
def test_adacons_round_combines_pseudo_gradients_like_the_reference(layerwise: bool) -> None:
    records = run_ranks(_pseudo_gradient_round, 3, layerwise, timeout=150)
    anchor = records[0]["anchor"]
    pseudo_gradients = torch.stack([anchor - record["local"] for record in records])
    expected = anchor - adacons_reference(pseudo_gradients, layer_sizes=[35, 5, 15, 3] if layerwise else None,
                                          preserve_scale=True)
    for record in records:
        assert torch.allclose(record["after"], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(record["after"], records[0]["after"])
    mean_step = pseudo_gradients.mean(0).norm()
    assert torch.isclose((anchor - records[0]["after"]).norm(), mean_step, rtol=1e-5)



def _partially_unused_parameter(rank: int, world_size: int) -> list[Any]:
    model = _model()
    comm = Communicator()
    combiner = AdaConsGradients(model.parameters(), comm)
    grads = _gradients(0, rank, anti_aligned=False)
    for index, (param, grad) in enumerate(zip(model.parameters(), grads)):
        param.grad = None if (rank == 1 and index == 3) else grad.clone()  # rank 1 never touches the last bias
    combiner.combine_()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_a_gradient_missing_on_one_rank_is_combined_and_written_back_everywhere() -> None:
    results = run_ranks(_partially_unused_parameter, 2, timeout=150)
    for first, second in zip(*results):
        assert first is not None and second is not None
        assert torch.equal(first, second)
