"""ReplicaSync and GradientAverager on real gloo process groups (2 to 6 CPU ranks, no Lightning).

Starting a rank costs a fresh interpreter and ``import torch`` (seconds on a small CPU box), so each world size
is started once per module: a module-scoped fixture runs every scenario of that size in one
:func:`helpers.run_ranks` call (each scenario with its own model and :class:`Communicator`) and returns what
every rank saw; the tests below only compare those records with numpy references. The 5-rank ring runs on the
subgroup of ranks 1..5 of the 6-rank world (a ``Communicator(group)`` whose group ranks differ from the global
ones) instead of starting 5 more processes. Ranks regenerate their start from a seed (:func:`make_model`), so
the parent knows every rank's initial state without communicating.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import run_ranks
from lightning_dopt.comm import GLOO_CHUNK_BYTES, Communicator, ring_allreduce_bytes
from lightning_dopt.compress import make_codec
from lightning_dopt.gradients import GradientAverager
from lightning_dopt.replica import ReplicaSync
from lightning_dopt.topology import mixing_row, random_matching
from topology_oracles import mixing_matrix

SEED = 0  # the topology seed of every ReplicaSync here
WIDTH = 64
GOSSIP_ROUNDS = 30
STATIC_ROUNDS = 4
STATIC_CASES = [(4, "ring"), (5, "ring"), (4, "exponential"), (6, "exponential"), (4, "torus"),
                (4, "one_peer_exponential"), (3, "one_peer_exponential"), (3, "complete")]
ODD_ROUNDS = 6


# ----------------------------------------------------------------------------------------- models and states
def make_model(seed: int, linear_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Linear(64, 64) + BatchNorm1d(64) with seeded parameters, running statistics and counter ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH))
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        norm = model[1]
        norm.running_mean.copy_(torch.randn(WIDTH, generator=generator))
        norm.running_var.copy_(0.5 + torch.rand(WIDTH, generator=generator))
        norm.num_batches_tracked.fill_(seed)
    model[0].to(linear_dtype)
    return model


def replica_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The replica state in ReplicaSync's order: float parameters, then float buffers."""
    return [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


def flat(tensors: list[torch.Tensor]) -> np.ndarray:
    """Concatenation as float32 numpy (exact for float32 and bfloat16 tensors)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors]).numpy().copy()


def initial_state(seed: int) -> np.ndarray:
    return flat(replica_tensors(make_model(seed))).astype(np.float64)


def counters(model: nn.Module) -> list[int]:
    return [int(b.item()) for b in model.buffers() if not b.is_floating_point()]


def rank_seed(scenario: str, rank: int) -> int:
    return {"random": 100, "noisy": 200, "static": 300, "odd": 400, "average": 500, "swap": 600,
            "broadcast": 700, "bf16": 800, "non_persistent": 900, "narrow": 1000}[scenario] + rank


def consensus_sq(states: np.ndarray) -> float:
    """``sum_i ||x_i - x_bar||^2`` of an (n, d) array."""
    return float(((states - states.mean(axis=0)) ** 2).sum())


# ---------------------------------------------------------------------------------------- rank-side scenarios
def scenario_random(rank: int, world_size: int) -> dict[str, Any]:
    """30 lr-0 gossip rounds of the random topology; the state after each round."""
    model = make_model(rank_seed("random", rank))
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    states, ints, rounds = [flat(sync.state.tensors)], [counters(model)], [sync.comm.stats.rounds]
    for round_index in range(GOSSIP_ROUNDS):
        sync.gossip_round(round_index)
        states.append(flat(sync.state.tensors))
        ints.append(counters(model))
        rounds.append(sync.comm.stats.rounds)
    return {"states": np.stack(states), "counters": ints, "rounds": rounds}


def scenario_noisy(rank: int, world_size: int) -> dict[str, Any]:
    """Random gossip where every rank moves its replica (a seeded 'local step') before each round."""
    model = make_model(rank_seed("noisy", rank))
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    generator = torch.Generator().manual_seed(rank_seed("noisy", rank) + 10_000)
    before, after = [], []
    for round_index in range(GOSSIP_ROUNDS):
        with torch.no_grad():
            for tensor in sync.state.tensors:
                tensor.add_(torch.randn(tensor.shape, generator=generator))
        before.append(flat(sync.state.tensors))
        sync.gossip_round(round_index)
        after.append(flat(sync.state.tensors))
    return {"before": np.stack(before), "after": np.stack(after)}


def scenario_static(rank: int, world_size: int, topology: str, comm: Communicator | None = None) -> dict[str, Any]:
    comm = comm or Communicator()
    model = make_model(rank_seed("static", comm.rank))
    sync = ReplicaSync(model, comm, topology, seed=SEED)
    states = [flat(sync.state.tensors)]
    for round_index in range(STATIC_ROUNDS):
        sync.gossip_round(round_index)
        states.append(flat(sync.state.tensors))
    return {"states": np.stack(states), "stats": sync.comm.stats.state_dict(), "nbytes": sync.state.nbytes}


def scenario_static_last5(rank: int, world_size: int, topology: str) -> dict[str, Any] | None:
    """``scenario_static`` on the subgroup of global ranks 1..5 (group rank = global rank - 1)."""
    group = dist.new_group(ranks=list(range(1, 6)))  # every rank of the world takes part in creating it
    if rank == 0:
        return None
    comm = Communicator(group)
    assert (comm.rank, comm.world_size) == (rank - 1, 5)
    return scenario_static(rank, world_size, topology, comm)


def scenario_odd(rank: int, world_size: int) -> dict[str, Any]:
    model = make_model(rank_seed("odd", rank))
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    states, sent = [flat(sync.state.tensors)], [0]
    for round_index in range(ODD_ROUNDS):
        sync.gossip_round(round_index)
        states.append(flat(sync.state.tensors))
        sent.append(sync.comm.stats.bytes_sent)
    return {"states": np.stack(states), "bytes_sent": sent, "rounds": sync.comm.stats.rounds,
            "nbytes": sync.state.nbytes}


def scenario_bytes(rank: int, world_size: int) -> dict[str, Any]:
    """One round of ``random`` and one of ``complete``, each on a fresh communicator."""
    out: dict[str, Any] = {}
    for topology in ("random", "complete"):
        model = make_model(rank_seed("static", rank))
        sync = ReplicaSync(model, Communicator(), topology, seed=SEED)
        sync.gossip_round(0)
        out[topology] = {"stats": sync.comm.stats.state_dict(), "nbytes": sync.state.nbytes,
                         "groups": len(sync.state.new_buffers())}
    return out


def scenario_average(rank: int, world_size: int) -> dict[str, Any]:
    model = make_model(rank_seed("average", rank))
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    sync.average_("final")
    return {"state": flat(sync.state.tensors), "counters": counters(model),
            "stats": sync.comm.stats.state_dict()}


def scenario_swap(rank: int, world_size: int) -> dict[str, Any]:
    model = make_model(rank_seed("swap", rank))
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    out: dict[str, Any] = {"local": flat(sync.state.tensors)}
    try:
        sync.restore_local()
        out["restore_without_swap"] = None
    except RuntimeError as error:
        out["restore_without_swap"] = str(error)
    out["monitor_distance"] = sync.consensus_distance()
    out["after_monitor"] = flat(sync.state.tensors)
    out["distance"] = sync.swap_in_average()
    out["swapped"] = flat(sync.state.tensors)
    for name, call in (("swap_twice", sync.swap_in_average), ("distance_while_swapped", sync.consensus_distance)):
        try:
            call()
            out[name] = None
        except RuntimeError as error:
            out[name] = str(error)
    sync.toggle()
    out["toggled_once"] = flat(sync.state.tensors)
    sync.toggle()
    out["toggled_twice"] = flat(sync.state.tensors)
    sync.restore_local()
    out["restored"] = flat(sync.state.tensors)
    out["swapped_flag"] = sync.swapped
    out["counters"] = counters(model)
    return out


def scenario_broadcast(rank: int, world_size: int) -> dict[str, Any]:
    model = make_model(rank_seed("broadcast", rank))
    ReplicaSync(model, Communicator(), "random", seed=SEED).broadcast_(0)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def scenario_gradients(rank: int, world_size: int) -> dict[str, Any]:
    """Two GradientAverager steps; ``grads(step, rank)`` says which gradients each rank has."""
    params = [nn.Parameter(torch.zeros(shape)) for shape in PARAM_SHAPES]
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    comm = Communicator()
    averager = GradientAverager(params + [frozen], comm)
    out: dict[str, Any] = {"tracked": len(averager.gradients.params)}
    for step in range(2):
        for param, grad in zip(params, grads(step, rank)):
            param.grad = grad
        averager.average_()
        out[step] = [None if p.grad is None else p.grad.clone() for p in params]
    out["stats"] = comm.stats.state_dict()
    return out


PARAM_SHAPES = [(3, 4), (5,), (2, 2)]


def grads(step: int, rank: int) -> list[torch.Tensor | None]:
    """Step 0: p0 everywhere, p1 missing on rank 1, p2 nowhere. Step 1: p0 only on rank 2, p1 everywhere,
    p2 nowhere (so a gradient allocated by the first step is overwritten, never reused stale)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    full = [torch.randn(shape, generator=generator) for shape in PARAM_SHAPES]
    present = [[True, rank != 1, False], [rank == 2, True, False]][step]
    return [g if keep else None for g, keep in zip(full, present)]


def scenario_bf16(rank: int, world_size: int) -> dict[str, Any]:
    """bf16 Linear + fp32 BatchNorm: two dtype groups in one exchange."""
    model = make_model(rank_seed("bf16", rank), linear_dtype=torch.bfloat16)
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    before = [t.detach().clone() for t in sync.state.tensors]
    sync.gossip_round(0)
    return {"before": before, "after": [t.detach().clone() for t in sync.state.tensors],
            "groups": [b.dtype for b in sync.state.new_buffers()]}


def scenario_non_persistent(rank: int, world_size: int) -> dict[str, Any]:
    """A model with a rank-specific non-persistent float buffer: one gossip round and one exact average."""
    model = make_model(rank_seed("non_persistent", rank))
    model.register_buffer("table", torch.full((WIDTH,), float(rank)), persistent=False)
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    sync.gossip_round(0)
    sync.average_("final")
    compressed = ReplicaSync(model, Communicator(), "random", seed=SEED, codec=make_codec("int8"))
    assert compressed.compression is not None
    older = compressed.compression.state_dict()  # as an older version wrote it: the table inside the anchor
    older["anchor"] = [torch.cat([anchor, model.table]) for anchor in older["anchor"]]
    try:
        compressed.compression.load_state_dict(older)
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    return {"nbytes": sync.state.nbytes, "table": model.table.tolist(),
            "bytes_sent": sync.comm.stats.bytes_sent_by_purpose["round"], "refused": refused}


def scenario_narrow_average(rank: int, world_size: int) -> dict[str, Any]:
    """Exact averages of a half-precision model: fp16 BatchNorm statistics whose sum over ranks exceeds fp16's
    largest value (65504), and bf16 weights whose sum needs more than bf16's 8 significant bits."""
    model = make_model(rank_seed("narrow", rank)).to(torch.float16)
    model[0].to(torch.bfloat16)
    with torch.no_grad():
        model[1].running_var.fill_(40_000.0 + 1_000.0 * rank)
    sync = ReplicaSync(model, Communicator(), "random", seed=SEED)
    before = [t.detach().clone() for t in sync.state.tensors]
    distance = sync.consensus_distance()
    sync.average_("final")
    return {"before": before, "after": [t.detach().clone() for t in sync.state.tensors], "distance": distance,
            "sent": sync.comm.stats.bytes_sent_by_purpose, "nbytes": sync.state.nbytes}


def exchange_payload(rank: int) -> list[torch.Tensor]:
    """What ``rank`` sends in the large-exchange scenario: tensors above, at and below gloo's piece size (not
    multiples of it, several dtypes) and an empty one."""
    generator = torch.Generator().manual_seed(rank)
    over = GLOO_CHUNK_BYTES // 4 * 3 + 12_345
    return [torch.randn(over, generator=generator), torch.randint(0, 256, (GLOO_CHUNK_BYTES * 2 + 7,),
                                                                   generator=generator, dtype=torch.uint8),
            torch.randn(GLOO_CHUNK_BYTES // 8, generator=generator, dtype=torch.float64), torch.empty(0),
            torch.randn(10, generator=generator, dtype=torch.float64)]


def scenario_large_exchange(rank: int, world_size: int) -> dict[str, Any]:
    """One ``exchange_each`` with the partner of tensors larger than a gloo piece."""
    comm = Communicator()
    payload = exchange_payload(rank)
    received = [torch.empty_like(t) for t in payload]
    peer = 1 - rank
    comm.exchange_each([(peer, payload)], [(peer, received)], purpose="round")
    return {"received": received, "stats": comm.stats.state_dict()}


SCENARIOS = {
    2: ["bf16", "large_exchange", "non_persistent", "narrow_average"],
    3: ["odd", "static:one_peer_exponential", "static:complete", "gradients"],
    4: ["random", "noisy", "static:ring", "static:exponential", "static:torus", "static:one_peer_exponential",
        "bytes", "average", "swap", "broadcast"],
    6: ["static:exponential", "static_last5:ring"],
}


def run_scenarios(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    """Rank entry point: every named scenario in order (all ranks run the same list)."""
    results: dict[str, Any] = {}
    for name in names:
        kind, _, topology = name.partition(":")
        function = globals()[f"scenario_{kind}"]
        results[name] = function(rank, world_size, topology) if topology else function(rank, world_size)
    return results


# ------------------------------------------------------------------------------------------- parent fixtures
def _world(world_size: int) -> list[dict[str, Any]]:
    start = time.perf_counter()
    results = run_ranks(run_scenarios, world_size, SCENARIOS[world_size], timeout=150.0)
    print(f"world {world_size}: {time.perf_counter() - start:.1f} s")
    return results


@pytest.fixture(scope="module")
def world2() -> list[dict[str, Any]]:
    return _world(2)


@pytest.fixture(scope="module")
def world3() -> list[dict[str, Any]]:
    return _world(3)


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    return _world(4)


@pytest.fixture(scope="module")
def world6() -> list[dict[str, Any]]:
    return _world(6)


def gathered(request: pytest.FixtureRequest, world_size: int, topology: str) -> list[Any]:
    """The records of a static-topology run, in (group) rank order."""
    if world_size == 5:
        return [rank[f"static_last5:{topology}"] for rank in request.getfixturevalue("world6")[1:]]
    return [rank[f"static:{topology}"] for rank in request.getfixturevalue(f"world{world_size}")]


# ------------------------------------------------------------------------------------------ random topology
def test_random_gossip_preserves_mean_and_pairs_end_equal(world4: list[dict[str, Any]]) -> None:
    records = [rank["random"] for rank in world4]
    states = np.stack([r["states"] for r in records], axis=1)  # (round + 1, n, d), float32
    n = len(records)
    initial = np.stack([initial_state(rank_seed("random", i)) for i in range(n)])
    np.testing.assert_array_equal(states[0], initial)
    mean0 = initial.mean(axis=0)
    distances = [consensus_sq(s.astype(np.float64)) for s in states]
    for round_index in range(GOSSIP_ROUNDS):
        now, before = states[round_index + 1], states[round_index]
        drift = np.linalg.norm(now.astype(np.float64).mean(axis=0) - mean0)
        assert drift <= 1e-6 * np.linalg.norm(mean0), f"round {round_index}: mean drifted by {drift}"
        partner = random_matching(n, round_index, SEED)
        for i in range(n):
            j = partner[i]
            assert j != i
            assert now[i].tobytes() == now[j].tobytes(), f"round {round_index}: ranks {i}, {j} differ"
            expected = (before[i].astype(np.float64) + before[j]) / 2
            np.testing.assert_allclose(now[i], expected, rtol=1e-6, atol=1e-7)
        # W_r is a projection: a round never increases the consensus distance
        assert distances[round_index + 1] <= distances[round_index] * (1 + 1e-6) + 1e-12
    for record in records:
        # counters are not mixed; stats.rounds counts every call
        assert all(c == record["counters"][0] for c in record["counters"])
        assert record["rounds"] == list(range(GOSSIP_ROUNDS + 1))
    assert [r["counters"][0] for r in records] == [[rank_seed("random", i)] for i in range(n)]
    # at n = 4 two different perfect matchings already give the exact average
    assert distances[-1] <= 1e-10 * distances[0]


def test_random_gossip_contraction_matches_theory(world4: list[dict[str, Any]]) -> None:
    """E ||W x - x_bar||^2 = (n - 2) / (2 (n - 1)) ||x - x_bar||^2 for every x (1/3 at n = 4).

    Pure lr-0 gossip on 4 ranks reaches the exact average after two different matchings (ratios are then 1 or
    0/0), so every rank moves its replica by fresh noise before each round, as local steps would.
    """
    records = [rank["noisy"] for rank in world4]
    before = np.stack([r["before"] for r in records], axis=1).astype(np.float64)
    after = np.stack([r["after"] for r in records], axis=1).astype(np.float64)
    n = len(records)
    ratios = []
    for round_index in range(GOSSIP_ROUNDS):
        mean = before[round_index].mean(axis=0)
        drift = np.linalg.norm(after[round_index].mean(axis=0) - mean)
        assert drift <= 1e-6 * np.linalg.norm(mean)
        partner = random_matching(n, round_index, SEED)
        assert all(after[round_index, i].tobytes() == after[round_index, partner[i]].tobytes() for i in range(n))
        ratios.append(consensus_sq(after[round_index]) / consensus_sq(before[round_index]))
    ratios = np.array(ratios)
    geometric, arithmetic = float(np.exp(np.log(ratios).mean())), float(ratios.mean())
    theory = (n - 2) / (2 * (n - 1))
    print(f"random, n={n}: contraction per round geometric mean {geometric:.4f}, arithmetic mean {arithmetic:.4f}, "
          f"theory {theory:.4f}")
    assert 0.2 <= geometric <= 0.5, (geometric, arithmetic, theory)
    assert 0.2 <= arithmetic <= 0.5, (geometric, arithmetic, theory)
    assert ratios.max() <= 1 + 1e-6


def test_random_odd_world_rests_one_rank(world3: list[dict[str, Any]]) -> None:
    records = [rank["odd"] for rank in world3]
    states = np.stack([r["states"] for r in records], axis=1)
    n, nbytes = 3, records[0]["nbytes"]
    for round_index in range(ODD_ROUNDS):
        now, before = states[round_index + 1], states[round_index]
        resting = round_index % n
        assert now[resting].tobytes() == before[resting].tobytes()
        a, b = (i for i in range(n) if i != resting)
        assert random_matching(n, round_index, SEED)[a] == b
        assert now[a].tobytes() == now[b].tobytes()
        np.testing.assert_allclose(now[a], (before[a].astype(np.float64) + before[b]) / 2, rtol=1e-6, atol=1e-7)
        for i in range(n):  # the resting rank sends nothing that round
            sent = records[i]["bytes_sent"][round_index + 1] - records[i]["bytes_sent"][round_index]
            assert sent == (0 if i == resting else nbytes)
    assert all(r["rounds"] == ODD_ROUNDS for r in records)


# ------------------------------------------------------------------------------------------ static topologies
@pytest.mark.parametrize(("world_size", "topology"), STATIC_CASES)
def test_static_topology_applies_mixing_matrices(request: pytest.FixtureRequest, world_size: int,
                                                 topology: str) -> None:
    records = gathered(request, world_size, topology)
    states = np.stack([r["states"] for r in records], axis=1).astype(np.float64)  # (k + 1, n, d)
    expected = np.stack([initial_state(rank_seed("static", i)) for i in range(world_size)])
    np.testing.assert_array_equal(states[0], expected)
    deviation0 = math.sqrt(consensus_sq(expected))
    bound = 1.0
    for round_index in range(STATIC_ROUNDS):
        matrix = np.array(mixing_matrix(topology, world_size, round_index, SEED))
        expected = matrix @ expected
        np.testing.assert_allclose(states[round_index + 1], expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{topology} n={world_size} after round {round_index}")
        # X_k - J X_k / n = (W - J/n)(X_{k-1} - J X_{k-1} / n) for doubly stochastic W
        bound *= np.linalg.norm(matrix - np.full((world_size, world_size), 1 / world_size), 2)
        deviation = math.sqrt(consensus_sq(states[round_index + 1]))
        assert deviation <= bound * deviation0 * (1 + 1e-5) + 1e-5 * deviation0, (round_index, deviation, bound)
    # cost: P bytes to each out-neighbour per round, or one ring all-reduce for complete
    for rank, record in enumerate(records):
        stats, nbytes = record["stats"], record["nbytes"]
        if topology == "complete":
            per_round = ring_allreduce_bytes(nbytes, world_size), ring_allreduce_bytes(nbytes, world_size)
        else:
            rows = [mixing_row(topology, rank, world_size, r, SEED) for r in range(STATIC_ROUNDS)]
            assert len({(len(row.send_to), len(row.recv_from)) for row in rows}) == 1
            per_round = len(rows[0].send_to) * nbytes, len(rows[0].recv_from) * nbytes
        assert (stats["bytes_sent"], stats["bytes_received"]) == (STATIC_ROUNDS * per_round[0],
                                                                  STATIC_ROUNDS * per_round[1])
        assert stats["rounds"] == STATIC_ROUNDS


def test_one_peer_exponential_is_exact_after_log2_n_rounds(world4: list[dict[str, Any]]) -> None:
    states = np.stack([r["static:one_peer_exponential"]["states"] for r in world4], axis=1).astype(np.float64)
    mean = states[0].mean(axis=0)
    assert consensus_sq(states[1]) > 1e-3 * consensus_sq(states[0])  # one round is not enough
    for round_index in (2, 3, 4):
        np.testing.assert_allclose(states[round_index], np.broadcast_to(mean, states[0].shape), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ byte accounting
def test_byte_accounting_of_one_round(world4: list[dict[str, Any]]) -> None:
    n = 4
    for rank in world4:
        random_round, complete_round = rank["bytes"]["random"], rank["bytes"]["complete"]
        nbytes = random_round["nbytes"]
        assert nbytes == 4 * (WIDTH * WIDTH + 5 * WIDTH)  # FlatState.nbytes: float32 weight, bias and 4 BN vectors
        stats = random_round["stats"]
        assert (stats["bytes_sent"], stats["bytes_received"]) == (nbytes, nbytes)
        assert stats["bytes_sent_by_purpose"] == {"round": nbytes}
        assert stats["messages"] == 2 * random_round["groups"]  # one send and one receive per dtype group
        assert stats["rounds"] == 1
        stats = complete_round["stats"]
        expected = ring_allreduce_bytes(nbytes, n)
        assert expected == 2 * (n - 1) * nbytes // n
        assert (stats["bytes_sent"], stats["bytes_received"]) == (expected, expected)
        assert stats["bytes_sent_by_purpose"] == {"round": expected}
        assert stats["rounds"] == 1


def test_non_persistent_buffers_are_neither_sent_nor_averaged(world2: list[dict[str, Any]]) -> None:
    for rank, record in enumerate(world2):
        assert record["non_persistent"]["nbytes"] == 4 * (WIDTH * WIDTH + 5 * WIDTH)  # without the 64-value table
        assert record["non_persistent"]["bytes_sent"] == record["non_persistent"]["nbytes"]  # the random round
        assert record["non_persistent"]["table"] == [float(rank)] * WIDTH  # untouched by the round and the average
        # compression state of another round-state layout is refused with the reason, not copied half-way
        assert "the checkpoint holds a different round state" in record["non_persistent"]["refused"]


# ---------------------------------------------------------------------------------- exact averages and swaps
def test_average_gives_exact_mean_and_max_counters(world4: list[dict[str, Any]]) -> None:
    n = len(world4)
    mean = np.stack([initial_state(rank_seed("average", i)) for i in range(n)]).mean(axis=0)
    for rank in world4:
        record = rank["average"]
        np.testing.assert_allclose(record["state"], mean, rtol=1e-6, atol=1e-6)
        assert record["state"].tobytes() == world4[0]["average"]["state"].tobytes()
        assert record["counters"] == [rank_seed("average", n - 1)]
        nbytes = mean.size * 4
        assert record["stats"]["bytes_sent_by_purpose"] == {"final": ring_allreduce_bytes(nbytes, n)
                                                            + ring_allreduce_bytes(8, n)}


def test_swap_in_average_toggle_and_restore(world4: list[dict[str, Any]]) -> None:
    n = len(world4)
    initial = np.stack([initial_state(rank_seed("swap", i)) for i in range(n)])
    mean = initial.mean(axis=0)
    distance = consensus_sq(initial) / n / float((mean**2).sum())
    for rank, full in enumerate(world4):
        record = full["swap"]
        local = record["local"]
        np.testing.assert_array_equal(local, initial[rank])
        assert record["restore_without_swap"] is not None  # RuntimeError
        assert record["swap_twice"] is not None and record["distance_while_swapped"] is not None
        assert record["monitor_distance"] == pytest.approx(distance, rel=1e-5)
        assert record["distance"] == pytest.approx(distance, rel=1e-5)
        assert record["after_monitor"].tobytes() == local.tobytes()  # monitoring leaves the module alone
        np.testing.assert_allclose(record["swapped"], mean, rtol=1e-6, atol=1e-6)
        assert record["swapped"].tobytes() == world4[0]["swap"]["swapped"].tobytes()
        assert record["toggled_once"].tobytes() == local.tobytes()
        assert record["toggled_twice"].tobytes() == record["swapped"].tobytes()
        assert record["restored"].tobytes() == local.tobytes()
        assert record["swapped_flag"] is False
        assert record["counters"] == [rank_seed("swap", rank)]


def test_broadcast_copies_parameters_and_counters(world4: list[dict[str, Any]]) -> None:
    source = make_model(rank_seed("broadcast", 0)).state_dict()
    assert int(source["1.num_batches_tracked"]) == rank_seed("broadcast", 0)
    for rank in world4:
        record = rank["broadcast"]
        assert record.keys() == source.keys()
        for name, tensor in source.items():
            assert record[name].dtype == tensor.dtype
            assert torch.equal(record[name], tensor), name


# ------------------------------------------------------------------------------------------ gradients, bf16
def test_gradient_averager_means_and_missing_gradients(world3: list[dict[str, Any]]) -> None:
    n = len(world3)
    for step in range(2):
        per_rank = [grads(step, rank) for rank in range(n)]
        for index in range(len(PARAM_SHAPES)):
            present = [g[index] for g in per_rank if g[index] is not None]
            for rank in world3:
                got = rank["gradients"][step][index]
                if not present:
                    assert got is None, f"step {step}, parameter {index}: no rank had a gradient"
                else:
                    expected = torch.stack(present).double().sum(0) / n  # missing gradients count as zero
                    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    for rank in world3:
        assert rank["gradients"]["tracked"] == len(PARAM_SHAPES)  # the frozen parameter is left out
        floats = sum(math.prod(s) for s in PARAM_SHAPES) + len(PARAM_SHAPES)
        assert rank["gradients"]["stats"]["bytes_sent_by_purpose"] == {"warmup": 2 * ring_allreduce_bytes(4 * floats, n)}


def test_bf16_pair_gets_rounded_average(world2: list[dict[str, Any]]) -> None:
    first, second = (rank["bf16"] for rank in world2)
    assert first["groups"] == [torch.bfloat16, torch.float32]
    for a, b, end_a, end_b in zip(first["before"], second["before"], first["after"], second["after"]):
        assert end_a.dtype == a.dtype
        assert torch.equal(end_a, end_b)  # both ends bitwise equal
        exact = (a.double() + b.double()) / 2
        assert torch.equal(end_a, exact.to(a.dtype)), "not the correctly rounded average"
        assert not torch.equal(end_a, a)


def test_exact_averages_of_half_precision_tensors_accumulate_in_fp32(world2: list[dict[str, Any]]) -> None:
    first, second = (rank["narrow_average"] for rank in world2)
    for a, b, end_a, end_b in zip(first["before"], second["before"], first["after"], second["after"]):
        assert end_a.dtype == a.dtype and torch.equal(end_a, end_b)
        exact = ((a.double() + b.double()) / 2).to(a.dtype)  # the fp32 sum of two half values is exact
        assert torch.equal(end_a, exact), f"{a.dtype}: not the correctly rounded mean"
    running_var = first["after"][-1]
    assert running_var.dtype == torch.float16 and bool((running_var == 40_500.0).all())  # 81,000 > 65,504
    assert math.isfinite(first["distance"]) and first["distance"] > 0
    # the sums travel as fp32 copies (twice the half-precision bytes of the state), the int64 counter as it is
    assert first["sent"]["final"] == ring_allreduce_bytes(2 * first["nbytes"], 2) + ring_allreduce_bytes(8, 2)


def test_exchange_of_tensors_larger_than_a_gloo_piece_is_exact(world2: list[dict[str, Any]]) -> None:
    for rank, records in enumerate(world2):
        record = records["large_exchange"]
        expected = exchange_payload(1 - rank)
        assert all(torch.equal(got, want) for got, want in zip(record["received"], expected))
        nbytes = sum(t.numel() * t.element_size() for t in expected)
        stats = record["stats"]
        assert (stats["bytes_sent"], stats["bytes_received"]) == (nbytes, nbytes)
        assert stats["messages"] == 2 * 4  # counted per tensor (the empty one is not sent), not per piece


# ------------------------------------------------------------------------------------------ the helper itself
def fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    torch.distributed.barrier()  # rank 0 waits for a peer that never comes


def never_finish(rank: int, world_size: int) -> None:
    time.sleep(3600)


def test_run_ranks_reports_a_failing_rank_without_waiting() -> None:
    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 raised.*ValueError: rank one fails on purpose"):
        run_ranks(fail_on_rank_one, 2, timeout=100.0)
    assert time.monotonic() - start < 60  # not the 100 s deadline, nor gloo's 30 s timeout after start-up
    assert set(multiprocessing.active_children()) <= before  # every rank was reaped


def test_run_ranks_kills_ranks_past_the_deadline() -> None:
    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 3 s"):
        run_ranks(never_finish, 2, timeout=3.0)
    assert time.monotonic() - start < 15
    assert set(multiprocessing.active_children()) <= before  # every rank was reaped
