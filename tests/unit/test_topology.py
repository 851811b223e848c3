"""Tests for lightning_dopt.topology: mixing matrices, matchings, contraction and input validation."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_dopt.topology as topology_module
from topology_oracles import mixing_matrix
from lightning_dopt.topology import (
    TOPOLOGIES,
    MixingRow,
    is_pairwise,
    mixing_row,
    random_matching,
    validate_topology,
)

VALID_CHOICES = "valid choices: random, ring, torus, exponential, one_peer_exponential, complete"
STATIC = ("ring", "torus", "exponential", "complete")
# (round_index, seed) pairs; the round- and seed-dependent topologies get more of them.
CASES = {
    "static": [(0, 0), (1001, 987654321)],
    "dynamic": [(0, 0), (1, 0), (2, 7), (5, 3), (12, 2**31 - 1), (999_999, 42)],
}


def world_sizes(topology: str) -> list[int]:
    if topology == "torus":
        return [s * s for s in range(1, 9)]
    return list(range(1, 65))


def dense(topology: str, n: int, round_index: int, seed: int) -> np.ndarray:
    return np.array(mixing_matrix(topology, n, round_index, seed), dtype=np.float64)


def consensus_norm(W: np.ndarray) -> float:
    n = W.shape[0]
    return float(np.linalg.norm(W - np.full((n, n), 1.0 / n), ord=2))


# --------------------------------------------------------------------------- matrix properties


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_mixing_matrix_is_doubly_stochastic_and_consistent_with_rows(topology: str) -> None:
    cases = CASES["static" if topology in STATIC else "dynamic"]
    for n in world_sizes(topology):
        for round_index, seed in cases:
            ctx = f"{topology} n={n} round={round_index} seed={seed}"
            rows = [mixing_row(topology, i, n, round_index, seed) for i in range(n)]
            W = dense(topology, n, round_index, seed)
            assert W.shape == (n, n), ctx
            assert (W >= 0).all(), ctx
            np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12, err_msg=ctx)
            np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12, err_msg=ctx)
            if topology != "one_peer_exponential":
                assert np.array_equal(W, W.T), ctx
            for i, row in enumerate(rows):
                assert isinstance(row, MixingRow)
                assert len(row.recv_from) == len(row.recv_weights), ctx
                for ranks in (row.send_to, row.recv_from):
                    assert i not in ranks, ctx
                    assert len(set(ranks)) == len(ranks), ctx
                    assert all(isinstance(j, int) and 0 <= j < n for j in ranks), ctx
                assert all(w > 0 for w in row.recv_weights), ctx
                # recv_from is exactly the off-diagonal support of row i, send_to that of column i.
                assert set(row.recv_from) == {j for j in range(n) if j != i and W[i, j] > 0}, ctx
                assert set(row.send_to) == {j for j in range(n) if j != i and W[j, i] > 0}, ctx
                for j in row.recv_from:
                    assert i in rows[j].send_to, ctx
                for j in row.send_to:
                    assert i in rows[j].recv_from, ctx


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_single_rank_is_identity(topology: str) -> None:
    for round_index, seed in CASES["dynamic"]:
        assert mixing_row(topology, 0, 1, round_index, seed) == MixingRow(1.0, (), (), ())
        assert mixing_matrix(topology, 1, round_index, seed) == [[1.0]]


@pytest.mark.parametrize("topology", STATIC)
def test_static_topologies_ignore_round_and_seed(topology: str) -> None:
    n = 16
    reference = mixing_matrix(topology, n, 0, 0)
    for round_index, seed in CASES["dynamic"]:
        assert mixing_matrix(topology, n, round_index, seed) == reference


def test_ring_neighbours_and_degenerate_sizes() -> None:
    assert mixing_row("ring", 0, 2, 0, 0) == MixingRow(0.5, (1,), (1,), (0.5,))
    assert mixing_row("ring", 0, 5, 0, 0).recv_from == (1, 4)
    row = mixing_row("ring", 3, 10, 0, 0)
    assert row.send_to == row.recv_from == (2, 4)
    assert row.recv_weights == (1 / 3, 1 / 3)


def test_torus_neighbours() -> None:
    # 4x4 grid: rank 5 is at (1, 1); rank 0 at (0, 0) wraps to row 3 and column 3.
    assert mixing_row("torus", 5, 16, 0, 0).recv_from == (1, 4, 6, 9)
    assert mixing_row("torus", 0, 16, 0, 0).recv_from == (1, 3, 4, 12)
    assert mixing_row("torus", 0, 16, 0, 0).recv_weights == (0.2,) * 4
    # 2x2 grid: up == down and left == right, so degree 2 (a 4-cycle).
    assert mixing_row("torus", 0, 4, 0, 0).recv_from == (1, 2)


def test_exponential_neighbours() -> None:
    # n = 16: offsets +-1, +-2, +-4, +-8 (8 == -8), degree 7, uniform weights 1/8.
    row = mixing_row("exponential", 0, 16, 0, 0)
    assert row.recv_from == (1, 2, 4, 8, 12, 14, 15)
    assert row.recv_weights == (0.125,) * 7
    assert row.self_weight == 0.125
    # n = 6: ceil(log2 6) = 3, offsets +-1, +-2, +-4 -> {1, 2, 4, 5}.
    assert mixing_row("exponential", 0, 6, 0, 0).recv_from == (1, 2, 4, 5)


def test_one_peer_exponential_rows() -> None:
    n = 12  # K = ceil(log2 12) = 4: shifts 1, 2, 4, 8, 1, ...
    for round_index, shift in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 1), (7, 8)]:
        row = mixing_row("one_peer_exponential", 3, n, round_index, 0)
        assert row == MixingRow(0.5, ((3 + shift) % n,), ((3 - shift) % n,), (0.5,))
    for n in range(3, 40):
        W = dense("one_peer_exponential", n, 0, 0)
        assert not np.array_equal(W, W.T), n


def test_complete_is_exact_mean() -> None:
    for n in (2, 3, 7, 64):
        W = dense("complete", n, 3, 0)
        np.testing.assert_allclose(W, np.full((n, n), 1.0 / n), rtol=0, atol=0)
        row = mixing_row("complete", 1, n, 3, 0)
        assert row.send_to == row.recv_from == tuple(j for j in range(n) if j != 1)


def test_is_pairwise() -> None:
    assert [is_pairwise(t) for t in TOPOLOGIES] == [t == "random" for t in TOPOLOGIES]
    with pytest.raises(ValueError, match=VALID_CHOICES):
        is_pairwise("pairs")


# --------------------------------------------------------------------------- random matchings


def test_random_matching_is_a_perfect_matching_with_rotating_rest() -> None:
    for n in range(1, 65):
        for round_index in (0, 1, 2, 3, 17, 999_999):
            for seed in (0, 1, 2**31):
                partner = random_matching(n, round_index, seed)
                assert sorted(partner) == list(range(n))
                assert all(partner[partner[i]] == i for i in range(n))
                resting = [i for i in range(n) if partner[i] == i]
                assert resting == ([round_index % n] if n % 2 else []), (n, round_index, seed)


def test_random_rows_follow_the_matching() -> None:
    for n in range(1, 65):
        for round_index in (0, 3):
            partner = random_matching(n, round_index, 9)
            for i in range(n):
                row = mixing_row("random", i, n, round_index, 9)
                if partner[i] == i:
                    assert row == MixingRow(1.0, (), (), ())
                else:
                    assert row == MixingRow(0.5, (partner[i],), (partner[i],), (0.5,))


def test_random_matching_is_identical_in_another_process() -> None:
    cases = [(0, 0, 16), (1, 5, 16), (123456789, 999_999, 64), (7, 3, 9), (2**31, 0, 2)]
    expected = [random_matching(n, round_index, seed) for seed, round_index, n in cases]
    # Load topology.py by path: importing the package would import Lightning (seconds per process).
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('topology', sys.argv[1])\n"
        "topology = sys.modules['topology'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(topology)\n"
        "cases = json.loads(sys.argv[2])\n"
        "print(json.dumps([topology.random_matching(n, r, s) for s, r, n in cases]))\n"
    )
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", code, topology_module.__file__, json.dumps(cases)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert json.loads(result.stdout) == expected


def test_random_matching_changes_with_round_and_seed() -> None:
    by_round = {tuple(random_matching(16, r, 0)) for r in range(20)}
    assert len(by_round) > 15
    by_seed = {tuple(random_matching(16, 0, s)) for s in range(20)}
    assert len(by_seed) > 15


def test_random_matching_regression_values() -> None:
    # Pinned schedule (CPython's random): a change here silently changes every run's gossip partners.
    assert random_matching(16, 5, 1) == [6, 7, 5, 14, 12, 2, 0, 1, 9, 8, 13, 15, 4, 10, 3, 11]
    assert random_matching(7, 3, 42) == [1, 0, 5, 3, 6, 2, 4]  # rank 3 rests (round 3 % 7)


def test_random_matching_is_uniform_on_four_ranks() -> None:
    rounds = 3000
    counts = collections.Counter(
        frozenset(frozenset((i, p)) for i, p in enumerate(random_matching(4, r, 11))) for r in range(rounds)
    )
    assert len(counts) == 3
    for matching, count in counts.items():
        assert abs(count / rounds - 1 / 3) < 0.04, (matching, count)


def test_random_matching_partners_are_uniform_for_odd_n() -> None:
    # n = 5, rank 0 not resting: each of the other 4 ranks is its partner equally often.
    n, rounds = 5, 4000
    partners = collections.Counter(random_matching(n, r, 3)[0] for r in range(rounds) if r % n != 0)
    total = sum(partners.values())
    assert set(partners) == {1, 2, 3, 4}
    for count in partners.values():
        assert abs(count / total - 1 / 4) < 0.04


# --------------------------------------------------------------------------- contraction


def test_random_matching_halves_consensus_distance_in_expectation() -> None:
    n, rounds = 8, 2000
    rng = np.random.default_rng(0)
    ratios = []
    for r in range(rounds):
        partner = random_matching(n, r, 5)
        W = (np.eye(n) + np.eye(n)[partner]) / 2  # == mixing_matrix("random", n, r, 5), built n times faster
        x = rng.standard_normal((n, 3))
        deviation = x - x.mean(axis=0)
        mixed = W @ x
        assert np.allclose(mixed.mean(axis=0), x.mean(axis=0), atol=1e-12)
        ratios.append(np.sum((mixed - x.mean(axis=0)) ** 2) / np.sum(deviation**2))
    mean_ratio = float(np.mean(ratios))
    assert 0.35 <= mean_ratio <= 0.6
    # Exact expectation for even n: (n - 2) / (2 (n - 1)) = 3/7.
    assert abs(mean_ratio - (n - 2) / (2 * (n - 1))) < 0.02


def second_largest_abs_eigenvalue(W: np.ndarray) -> float:
    eigenvalues = sorted(np.abs(np.linalg.eigvalsh(W)), reverse=True)
    assert math.isclose(eigenvalues[0], 1.0, abs_tol=1e-12)
    return float(eigenvalues[1])


@pytest.mark.parametrize("n", [3, 4, 5, 8, 13, 32, 64])
def test_ring_contraction_matches_closed_form(n: int) -> None:
    W = dense("ring", n, 0, 0)
    rho = consensus_norm(W)
    assert rho == pytest.approx(second_largest_abs_eigenvalue(W), abs=1e-12)
    assert rho == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)


@pytest.mark.parametrize("side", [3, 4, 5, 8])
def test_torus_contraction_matches_closed_form(side: int) -> None:
    W = dense("torus", side * side, 0, 0)
    rho = consensus_norm(W)
    assert rho == pytest.approx(second_largest_abs_eigenvalue(W), abs=1e-12)
    assert rho == pytest.approx((3 + 2 * math.cos(2 * math.pi / side)) / 5, abs=1e-12)


@pytest.mark.parametrize("n", [4, 6, 8, 12, 16, 32, 64])
def test_exponential_contraction(n: int) -> None:
    W = dense("exponential", n, 0, 0)
    rho = consensus_norm(W)
    assert rho == pytest.approx(second_largest_abs_eigenvalue(W), abs=1e-12)
    assert rho < consensus_norm(dense("ring", n, 0, 0))  # the shortcuts mix faster than the ring
    if n & (n - 1) == 0:
        assert rho == pytest.approx(1 - 2 / math.log2(n), abs=1e-12)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_one_peer_exponential_reaches_exact_average_in_log2_n_rounds(n: int) -> None:
    k = int(math.log2(n))
    for start in (0, k, 5 * k, 3):
        product = np.eye(n)
        for r in range(start, start + k):
            product = dense("one_peer_exponential", n, r, 0) @ product
        np.testing.assert_allclose(product, np.full((n, n), 1.0 / n), rtol=0, atol=1e-12)
        # One round short is not yet the average.
        partial = np.eye(n)
        for r in range(start, start + k - 1):
            partial = dense("one_peer_exponential", n, r, 0) @ partial
        assert consensus_norm(partial) > 0.5


# --------------------------------------------------------------------------- validation


def test_unknown_topology_names_value_and_choices() -> None:
    for bad in ("rign", "", "Ring", None, 3):
        with pytest.raises(ValueError) as info:
            validate_topology(bad)  # type: ignore[arg-type]
        assert repr(bad) in str(info.value)
        assert VALID_CHOICES in str(info.value)
    for call in (
        lambda: mixing_row("rign", 0, 4, 0, 0),
        lambda: mixing_matrix("rign", 4, 0, 0),
        lambda: is_pairwise("rign"),
    ):
        with pytest.raises(ValueError, match=f"unknown topology 'rign'; {VALID_CHOICES}"):
            call()


@pytest.mark.parametrize(("n", "low", "high"), [(2, 1, 4), (3, 1, 4), (6, 4, 9), (8, 4, 9), (50, 49, 64)])
def test_torus_rejects_non_square_world_size(n: int, low: int, high: int) -> None:
    expected = f"torus needs a square world size (1, 4, 9, 16, ...); got {n}: use {low} or {high} ranks"
    for call in (
        lambda: validate_topology("torus", n),
        lambda: mixing_row("torus", 0, n, 0, 0),
        lambda: mixing_matrix("torus", n, 0, 0),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert expected in str(info.value)
    validate_topology("torus", low)
    validate_topology("torus", high)
    validate_topology("ring", n)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", None])
def test_bad_world_size(bad: object) -> None:
    calls = [lambda: mixing_row("ring", 0, bad, 0, 0), lambda: mixing_matrix("ring", bad, 0, 0)]
    calls.append(lambda: random_matching(bad, 0, 0))
    if bad is not None:  # validate_topology(world_size=None) skips the world-size check
        calls.append(lambda: validate_topology("ring", bad))
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert f"world_size must be an int >= 1; got {bad!r}" in str(info.value)


@pytest.mark.parametrize("bad", [-1, 8, 100, True, 1.0, "0"])
def test_bad_rank(bad: object) -> None:
    for topology in TOPOLOGIES:
        n = 4 if topology == "torus" else 8
        with pytest.raises(ValueError) as info:
            mixing_row(topology, bad, n, 0, 0)  # type: ignore[arg-type]
        assert f"rank must be an int in [0, {n}); got {bad!r}" in str(info.value)


@pytest.mark.parametrize("bad", [-1, -(10**9), 1.5, False, "3"])
def test_bad_round_index(bad: object) -> None:
    calls = [lambda t=t: mixing_row(t, 0, 4, bad, 0) for t in TOPOLOGIES]
    calls += [lambda: mixing_matrix("ring", 4, bad, 0), lambda: random_matching(4, bad, 0)]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert f"round_index must be an int >= 0; got {bad!r}" in str(info.value)


@pytest.mark.parametrize("bad", [1.0, None, True, "0"])
def test_bad_seed(bad: object) -> None:
    for call in (lambda: mixing_row("random", 0, 4, 0, bad), lambda: random_matching(4, 0, bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert f"seed must be an int; got {bad!r}" in str(info.value)


# --------------------------------------------------------------------------- property test


@st.composite
def round_setups(draw: st.DrawFn) -> tuple[str, int, int, int, int]:
    topology = draw(st.sampled_from(TOPOLOGIES))
    if topology == "torus":
        n = draw(st.integers(1, 8)) ** 2
    else:
        n = draw(st.integers(1, 64))
    rank = draw(st.integers(0, n - 1))
    round_index = draw(st.integers(0, 10**6))
    seed = draw(st.integers(0, 2**31))
    return topology, n, rank, round_index, seed


@settings(max_examples=200, deadline=None)
@given(round_setups())
def test_row_and_column_properties(setup: tuple[str, int, int, int, int]) -> None:
    topology, n, rank, round_index, seed = setup
    row = mixing_row(topology, rank, n, round_index, seed)
    # Row: non-negative, sums to 1, no self, no duplicates.
    assert row.self_weight >= 0 and all(w > 0 for w in row.recv_weights)
    assert math.fsum((row.self_weight, *row.recv_weights)) == pytest.approx(1.0, abs=1e-12)
    for ranks in (row.send_to, row.recv_from):
        assert rank not in ranks and len(set(ranks)) == len(ranks)
        assert all(0 <= j < n for j in ranks)
    # Column: the ranks in send_to receive from this rank, and the column sums to 1.
    column = [row.self_weight]
    for j in row.send_to:
        other = mixing_row(topology, j, n, round_index, seed)
        assert rank in other.recv_from
        column.append(other.recv_weights[other.recv_from.index(rank)])
    assert math.fsum(column) == pytest.approx(1.0, abs=1e-12)
    for j in row.recv_from:
        assert rank in mixing_row(topology, j, n, round_index, seed).send_to
    # Symmetry: row equals column.
    if topology != "one_peer_exponential":
        assert row.send_to == row.recv_from
        assert tuple(column[1:]) == row.recv_weights
