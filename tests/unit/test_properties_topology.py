"""Property-based robustness tests for lightning_dopt.topology (issue 9, "Reliability").

Complements tests/unit/test_topology.py (which checks doubly-stochastic rows on fixed grids of cases): here
hypothesis draws world sizes 1-64, rounds up to 2**62 and seeds of any sign and size, and checks that every rank's
view agrees with every other rank's (computed in another order, with a cold cache), that a round preserves the mean,
and that every invalid argument, of any type, raises ValueError naming the argument and, for names, the choices.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lightning_dopt.topology as topology_module
from topology_oracles import mixing_matrix
from lightning_dopt.topology import (
    TOPOLOGIES,
    is_pairwise,
    mixing_row,
    random_matching,
    validate_topology,
)

VALID_CHOICES = "valid choices: " + ", ".join(TOPOLOGIES)


@st.composite
def rounds(draw: st.DrawFn, max_n: int = 64) -> tuple[str, int, int, int]:
    topology = draw(st.sampled_from(TOPOLOGIES))
    n = draw(st.integers(1, 8)) ** 2 if topology == "torus" else draw(st.integers(1, max_n))
    round_index = draw(st.one_of(st.integers(0, 100), st.integers(0, 2**62)))
    seed = draw(st.one_of(st.integers(-(2**31), 2**31), st.integers(-(2**100), 2**100)))
    return topology, n, round_index, seed


def all_rows(topology: str, n: int, round_index: int, seed: int, reverse: bool = False):
    order = range(n - 1, -1, -1) if reverse else range(n)
    rows = {i: mixing_row(topology, i, n, round_index, seed) for i in order}
    return [rows[i] for i in range(n)]


@settings(max_examples=120, deadline=None)
@given(setup=rounds())
def test_every_rank_agrees_and_rounds_are_doubly_stochastic(setup: tuple[str, int, int, int]) -> None:
    topology, n, round_index, seed = setup
    rows = all_rows(topology, n, round_index, seed)
    # Another "process": cold cache, ranks computed in the opposite order; every row must be identical.
    topology_module._metropolis_row.cache_clear()
    assert all_rows(topology, n, round_index, seed, reverse=True) == rows
    # Exact column sums (weights of x_i across all rows), rows sum to 1, send_to/recv_from are mirror images.
    columns = [Fraction(0)] * n
    for i, row in enumerate(rows):
        assert 0.0 <= row.self_weight <= 1.0
        assert len(row.recv_from) == len(row.recv_weights) == len(set(row.recv_from))
        assert math.fsum((row.self_weight, *row.recv_weights)) == pytest.approx(1.0, abs=1e-12)
        columns[i] += Fraction(row.self_weight)
        for j, weight in zip(row.recv_from, row.recv_weights):
            assert 0 <= j < n and j != i and weight > 0
            assert i in rows[j].send_to, f"rank {i} receives from {j}, but {j} does not send to {i}"
            columns[j] += Fraction(weight)
        for j in row.send_to:
            assert 0 <= j < n and j != i and i in rows[j].recv_from
    assert all(abs(float(c) - 1.0) <= 1e-12 for c in columns)
    if n == 1:
        assert rows[0].self_weight == 1.0 and rows[0].send_to == rows[0].recv_from == ()


@settings(max_examples=60, deadline=None)
@given(setup=rounds(max_n=24), values=st.lists(st.integers(-(10**6), 10**6), min_size=64, max_size=64))
def test_a_round_preserves_the_mean(setup: tuple[str, int, int, int], values: list[int]) -> None:
    topology, n, round_index, seed = setup
    x = [float(v) for v in values[:n]]
    W = mixing_matrix(topology, n, round_index, seed)
    mixed = [math.fsum(W[i][j] * x[j] for j in range(n)) for i in range(n)]
    assert math.fsum(mixed) == pytest.approx(math.fsum(x), rel=1e-12, abs=1e-6)
    assert min(x) - 1e-6 <= min(mixed) and max(mixed) <= max(x) + 1e-6  # a convex combination per rank


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 64), round_index=st.integers(0, 2**62), seed=st.integers(-(2**64), 2**64))
def test_random_matching_is_a_deterministic_involution(n: int, round_index: int, seed: int) -> None:
    partner = random_matching(n, round_index, seed)
    assert partner == random_matching(n, round_index, seed)
    assert sorted(partner) == list(range(n))
    assert all(partner[partner[i]] == i for i in range(n))
    resting = [i for i in range(n) if partner[i] == i]
    assert resting == ([round_index % n] if n % 2 else [])


# ------------------------------------------------------------------------------------------------------------------
# invalid input: any type, any value

not_an_int = st.one_of(
    st.floats(allow_nan=True), st.booleans(), st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2),
    st.sampled_from([1.0, 4.0, complex(1, 0), b"4", (4,), {"n": 4}]),
)


def _check(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value), str(info.value)


@settings(max_examples=100, deadline=None)
@given(topology=st.sampled_from(TOPOLOGIES),
       bad=st.one_of(not_an_int, st.integers(max_value=0)))
def test_bad_world_sizes_raise_naming_world_size(topology: str, bad: object) -> None:
    message = f"world_size must be an int >= 1; got {bad!r}"
    _check(lambda: mixing_row(topology, 0, bad, 0, 0), message)
    _check(lambda: mixing_matrix(topology, bad, 0, 0), message)
    _check(lambda: random_matching(bad, 0, 0), message)
    if bad is not None:  # validate_topology(world_size=None) means "no world size to check"
        _check(lambda: validate_topology(topology, bad), message)


@settings(max_examples=100, deadline=None)
@given(topology=st.sampled_from(TOPOLOGIES), n=st.integers(1, 64), data=st.data())
def test_bad_ranks_raise_naming_the_valid_range(topology: str, n: int, data) -> None:
    if topology == "torus":
        n = math.isqrt(n) ** 2
    bad = data.draw(st.one_of(not_an_int, st.integers(max_value=-1), st.integers(min_value=n)))
    _check(lambda: mixing_row(topology, bad, n, 0, 0), f"rank must be an int in [0, {n}); got {bad!r}")


@settings(max_examples=100, deadline=None)
@given(topology=st.sampled_from(TOPOLOGIES), bad=st.one_of(not_an_int, st.integers(max_value=-1)))
def test_bad_round_indices_raise_naming_round_index(topology: str, bad: object) -> None:
    n = 4
    message = f"round_index must be an int >= 0; got {bad!r}"
    _check(lambda: mixing_row(topology, 0, n, bad, 0), message)
    _check(lambda: mixing_matrix(topology, n, bad, 0), message)
    _check(lambda: random_matching(n, bad, 0), message)


@settings(max_examples=60, deadline=None)
@given(topology=st.sampled_from(TOPOLOGIES), bad=not_an_int)
def test_bad_seeds_raise_naming_seed(topology: str, bad: object) -> None:
    message = f"seed must be an int; got {bad!r}"
    _check(lambda: mixing_row(topology, 0, 4, 0, bad), message)
    _check(lambda: mixing_matrix(topology, 4, 0, bad), message)
    _check(lambda: random_matching(4, 0, bad), message)


@settings(max_examples=100, deadline=None)
@given(bad=st.one_of(st.text(max_size=12), not_an_int, st.sampled_from([t.upper() for t in TOPOLOGIES]),
                     st.sampled_from([t + " " for t in TOPOLOGIES])))
def test_unknown_topologies_list_the_valid_choices(bad: object) -> None:
    assume(bad not in TOPOLOGIES)
    message = f"unknown topology {bad!r}; {VALID_CHOICES}"
    _check(lambda: validate_topology(bad), message)
    _check(lambda: validate_topology(bad, 4), message)
    _check(lambda: is_pairwise(bad), message)
    _check(lambda: mixing_row(bad, 0, 4, 0, 0), message)
    _check(lambda: mixing_matrix(bad, 4, 0, 0), message)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 10**6))
def test_torus_on_a_non_square_world_size_names_the_nearest_squares(n: int) -> None:
    side = math.isqrt(n)
    assume(side * side != n)
    _check(lambda: mixing_row("torus", 0, n, 0, 0),
           f"torus needs a square world size (1, 4, 9, 16, ...); got {n}: use {side * side} or {(side + 1) ** 2} ranks")
