"""The engine on N virtual ranks in this process (no Lightning, no process group): the step/round schedule, the
control flags (non-finite replicas, stop requests, paces), AdaCons against its single-process oracle, overlapped
rounds, and the engine's state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adacons_oracles import adacons_reference
from lightning_dopt.engine import Engine, NonFiniteReplicaError, build_engine
from lightning_dopt.inprocess import InProcessGroup
from lightning_dopt.options import Options


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))


def engines(world_size: int, options: Options, seeds: int = 0) -> tuple[InProcessGroup, list[nn.Module],
                                                                        list[Engine]]:
    group = InProcessGroup(world_size, timeout=20.0)
    modules = [model(seeds + rank) for rank in range(world_size)]
    built = [build_engine(options, module, [list(module.parameters())], comm, rank, torch.device("cpu"),
                          background=comm.background, timeout=20.0)
             for rank, (module, comm) in enumerate(zip(modules, group.communicators()))]
    return group, modules, built


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_schedule_warmup_then_a_round_every_local_steps() -> None:
    group, modules, built = engines(4, Options(local_steps=3, warmup_steps=2, topology="random"))
    rounds_after = []
    for step in range(1, 12):
        group.run(lambda rank: built[rank].after_step())
        rounds_after.append(built[0].comm_stats.rounds)
    assert rounds_after == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # rounds after steps 5, 8, 11
    assert all(engine.steps == 11 and engine.round == 3 for engine in built)
    control = built[0].comm_stats.bytes_sent_by_purpose["control"]
    assert control > 0  # flags before every round and every warm-up step
    group.close()


def test_a_non_finite_replica_stops_every_rank_before_it_is_sent() -> None:
    group, modules, built = engines(3, Options(local_steps=1, topology="ring"))
    with torch.no_grad():
        modules[1][0].weight[0, 0] = float("nan")
    before = [flat(m).clone() for m in modules]
    with pytest.raises(NonFiniteReplicaError, match=r"replica of rank 1 at optimizer step 1"):
        group.run(lambda rank: built[rank].after_step())
    assert all(torch.equal(flat(m), b, ) for m, b in zip(modules[::2], before[::2])), "nothing was mixed"
    group.close()


def test_a_stop_request_reaches_every_rank_at_the_next_round() -> None:
    group, _, built = engines(4, Options(local_steps=2))
    built[2].sigterm = True
    group.run(lambda rank: built[rank].after_step())
    assert not any(engine.stop_requested for engine in built)  # no round yet: the flags travel with the round
    group.run(lambda rank: built[rank].after_step())
    assert all(engine.stop_requested and engine.stop_ranks == [2] and not engine.requeue_requested
               for engine in built)
    group.close()


def test_paces_travel_in_the_flags_and_slow_ranks_skip_steps() -> None:
    clocks = [0.0, 0.0]  # each rank's own wall clock, advanced by its simulated step costs
    group = InProcessGroup(2, timeout=20.0)
    options = Options(local_steps=1, min_work=0.25)
    modules = [model(rank) for rank in range(2)]
    built = [build_engine(options, module, [list(module.parameters())], comm, rank, torch.device("cpu"),
                          clock=lambda rank=rank: clocks[rank]) for rank, (module, comm) in
             enumerate(zip(modules, group.communicators()))]
    cost = [1.0, 3.0]  # rank 1 takes three times as long per trained step
    for _ in range(40):
        for rank, engine in enumerate(built):
            clocks[rank] += 0.01 if engine.skipping else cost[rank]
        group.run(lambda rank: built[rank].skip_step() if built[rank].skipping else None)
        group.run(lambda rank: built[rank].after_step())
    assert built[0].skipped_steps == 0
    assert 10 <= built[1].skipped_steps <= 30, built[1].skipped_steps
    group.close()


def test_adacons_on_virtual_ranks_equals_the_single_process_reference() -> None:
    world_size = 4
    group, modules, built = engines(world_size, Options(aggregation="adacons", topology="complete",
                                                        adacons_momentum=0.0), seeds=0)
    for module in modules:  # a common start, different gradients
        module.load_state_dict(modules[0].state_dict())
    gradients = torch.randn(world_size, sum(p.numel() for p in modules[0].parameters()),
                            generator=torch.Generator().manual_seed(3))
    for module, gradient in zip(modules, gradients):
        for p, g in zip(module.parameters(), gradient.split([p.numel() for p in module.parameters()])):
            p.grad = g.view_as(p).clone()

    def combine(rank: int) -> None:
        params = list(modules[rank].parameters())
        built[rank].wrap_closure(0, params, lambda: None)()

    group.run(combine)
    expected = adacons_reference(gradients)
    for module in modules:
        combined = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)
    group.close()


def test_overlapped_rounds_are_applied_one_round_late_and_keep_the_mean() -> None:
    group, modules, built = engines(4, Options(local_steps=1, topology="random", overlap=True))
    start_mean = torch.stack([flat(m) for m in modules]).mean(0)
    group.run(lambda rank: built[rank].after_step())  # round 0 starts in the background
    assert all(engine.overlapped.in_flight for engine in built)
    group.run(lambda rank: built[rank].after_step())  # round 0 applied, round 1 starts
    group.run(lambda rank: built[rank].drain())
    assert all(not engine.overlapped.in_flight for engine in built) and built[0].comm_stats.rounds == 2
    torch.testing.assert_close(torch.stack([flat(m) for m in modules]).mean(0), start_mean, rtol=1e-6, atol=1e-6)
    spread = torch.stack([flat(m) for m in modules]).std(0).max()
    assert spread > 0
    group.close()


def test_engine_state_round_trips_through_state_dict() -> None:
    options = Options(local_steps=1, topology="ring", compression="int8", scaling="adam")
    group, modules, built = engines(3, options)
    for module in modules:
        for p in module.parameters():
            p.grad = torch.ones_like(p)
    group.run(lambda rank: built[rank].wrap_closure(0, list(modules[rank].parameters()), lambda: None)())
    group.run(lambda rank: built[rank].after_step())
    saved = built[1].state_dict()
    group2, _, fresh = engines(3, options, seeds=10)
    fresh[1].load_state_dict(saved)
    again = fresh[1].state_dict()
    assert again["comm_stats"] == saved["comm_stats"]
    assert all(torch.equal(a, b) for a, b in zip(again["round"]["anchor"], saved["round"]["anchor"]))
    assert torch.equal(again["scaling"][0]["state"]["statistics"][0], saved["scaling"][0]["state"]["statistics"][0])
    group.close()
    group2.close()
