"""Per-round gossip communication schedules.

A gossip round replaces every rank's model ``x_i`` by a weighted average of models,
``x <- W_r x``, where ``W_r`` is the round's n x n *mixing matrix*.  Every function here is
a pure function of ``(topology, rank, world_size, round_index, seed)``: each process
computes its own row (who to send to, who to receive from, with which weights) without
communicating, and all processes agree because they compute the same thing.

Every ``W_r`` is doubly stochastic (rows and columns sum to 1, entries >= 0), so a round
preserves the global mean ``x_bar`` exactly.  Contraction is stated for the consensus
distance ``||x - x_bar 1||``; ``rho(W) = ||W - J/n||_2`` (``J`` the all-ones matrix), which
for symmetric ``W`` is its second-largest eigenvalue in absolute value.  Cost counts
model-sized messages sent (and as many received) per rank per round.

``random``
    ``W_r = (I + P_r) / 2`` with ``P_r`` the permutation matrix of a uniformly random
    perfect matching (SwarmSGD's pairwise model): matched ranks average 1/2-1/2.  For odd
    n, rank ``round_index % n`` rests (``W_ii = 1``).  Cost: 1 (0 when resting).
    Contraction: ``W_r`` is a symmetric projection and ``E[P_r] = (J - I)/(n - 1)`` for
    even n, so ``E||W_r x - x_bar 1||^2 = (n - 2)/(2(n - 1)) ||x - x_bar 1||^2`` for
    every x: about 1/2 per round, independent of n.
``ring``
    Undirected cycle ``{i - 1, i + 1}`` with Metropolis-Hastings weights (1/3 each for
    n >= 3).  Cost: 2.  ``rho = (1 + 2 cos(2 pi / n)) / 3 = 1 - Theta(1/n^2)`` for n >= 3.
``torus``
    ``s x s`` grid with wrap-around (n = s^2), rank i at ``(i // s, i % s)``, Metropolis
    weights (1/5 each for s >= 3).  Cost: 4.  ``rho = (3 + 2 cos(2 pi / s)) / 5 =
    1 - Theta(1/n)`` for s >= 3.
``exponential``
    Static undirected graph with neighbours ``i +- 2^k (mod n)``, ``k < ceil(log2 n)``,
    Metropolis weights.  Cost: degree, at most ``2 ceil(log2 n)``.  For ``n = 2^t``,
    t >= 2: degree ``2t - 1``, uniform weights ``1/(2t)`` and ``rho = 1 - 2/t``.
``one_peer_exponential``
    Directed one-peer exponential graph (Ying et al., NeurIPS 2021): with
    ``K = ceil(log2 n)`` and ``d = 2^(round_index % K)``, rank i keeps 1/2 of its model and
    takes 1/2 of rank ``(i - d) mod n``'s; ``W_r = (I + S^d)/2`` with S the cyclic shift.
    Doubly stochastic, not symmetric for n > 2.  Cost: 1.  For n a power of two, the
    product of any K consecutive rounds is exactly ``J/n`` (exact average in log2 n rounds).
``complete``
    ``W = J/n``: the exact mean, implemented by the strategies as an all-reduce.  Cost:
    about ``2(n - 1)/n`` with a ring all-reduce.  ``rho = 0``.

With ``world_size == 1`` every topology is the identity and nothing is communicated.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

TOPOLOGIES: tuple[str, ...] = ("random", "ring", "torus", "exponential", "one_peer_exponential", "complete")


@dataclass(frozen=True)
class MixingRow:
    """Row `rank` of the round's mixing matrix W:  x_rank <- self_weight * x_rank + sum_k recv_weights[k] * x_{recv_from[k]}.

    send_to: ranks that need this rank's model this round (this rank's column of W, off-diagonal non-zeros).
    """

    self_weight: float
    send_to: tuple[int, ...]
    recv_from: tuple[int, ...]
    recv_weights: tuple[float, ...]


_IDENTITY_ROW = MixingRow(self_weight=1.0, send_to=(), recv_from=(), recv_weights=())


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) with ``low <= value < high``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value >= high)
    ):
        if high is not None:
            bounds = f" in [{low}, {high})"
        elif low is not None:
            bounds = f" >= {low}"
        else:
            bounds = ""
        raise ValueError(f"{name} must be an int{bounds}; got {value!r}")


def validate_topology(topology: str, world_size: int | None = None) -> None:
    """Raise ValueError if ``topology`` is unknown or cannot run on ``world_size`` ranks.

    ``world_size``, when given, must be an int >= 1; ``torus`` needs it to be a perfect square.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; valid choices: {', '.join(TOPOLOGIES)}")
    if world_size is None:
        return
    _check_int("world_size", world_size, low=1)
    side = math.isqrt(world_size)
    if topology == "torus" and side * side != world_size:
        raise ValueError(
            f"torus needs a square world size (1, 4, 9, 16, ...); got {world_size}: "
            f"use {side * side} or {(side + 1) ** 2} ranks, or another topology"
        )


def _validate_round(topology: str, world_size: int, round_index: int, seed: int) -> None:
    validate_topology(topology, world_size)
    _check_int("world_size", world_size, low=1)  # validate_topology accepts None
    _check_int("round_index", round_index, low=0)
    _check_int("seed", seed)


def random_matching(world_size: int, round_index: int, seed: int) -> list[int]:
    """The ``random`` topology's matching for one round: ``partner[i] == j`` iff ``partner[j] == i``.

    For even n a uniformly random perfect matching of all ranks.  For odd n rank
    ``round_index % n`` rests (``partner[r] == r``) and the others are matched uniformly at
    random.  Deterministic in ``(world_size, round_index, seed)``: the generator is seeded
    with a string (hashed with SHA-512, independent of PYTHONHASHSEED), so every process
    running the same Python version gets the same matching.  O(n).
    """
    _validate_round("random", world_size, round_index, seed)
    rng = random.Random(f"lightning_dopt/random/{seed}/{round_index}/{world_size}")
    resting = round_index % world_size if world_size % 2 else None
    others = [rank for rank in range(world_size) if rank != resting]
    rng.shuffle(others)  # consecutive pairs of a uniform permutation form a uniform matching
    partner = list(range(world_size))
    for a, b in zip(others[0::2], others[1::2]):
        partner[a], partner[b] = b, a
    return partner


def _ring_neighbours(rank: int, n: int) -> set[int]:
    return {(rank - 1) % n, (rank + 1) % n}


def _torus_neighbours(rank: int, n: int) -> set[int]:
    side = math.isqrt(n)
    row, col = divmod(rank, side)
    return {((row - 1) % side) * side + col, ((row + 1) % side) * side + col,
            row * side + (col - 1) % side, row * side + (col + 1) % side}


def _exponential_neighbours(rank: int, n: int) -> set[int]:
    """Offsets ``±2^k`` for ``k < ceil(log2 n) == (n - 1).bit_length()``."""
    return {(rank + sign * (1 << k)) % n for k in range((n - 1).bit_length()) for sign in (1, -1)}


_STATIC_GRAPHS: dict[str, Callable[[int, int], set[int]]] = {
    "ring": _ring_neighbours, "torus": _torus_neighbours, "exponential": _exponential_neighbours}


def _neighbours(topology: str, rank: int, world_size: int) -> tuple[int, ...]:
    """Sorted neighbours of ``rank`` (self excluded) in the static undirected graph ``topology``."""
    found = _STATIC_GRAPHS[topology](rank, world_size)
    found.discard(rank)
    return tuple(sorted(found))


@functools.lru_cache(maxsize=4096)
def _metropolis_row(topology: str, rank: int, world_size: int) -> MixingRow:
    """Metropolis-Hastings row: ``w_ij = 1/(1 + max(deg_i, deg_j))`` for neighbours j, ``w_ii = 1 - sum_j w_ij``.

    Exact rational arithmetic, so the self weight is the float nearest the exact remainder.
    Cached: the static graphs' rows do not change between rounds.
    """
    neighbours = _neighbours(topology, rank, world_size)
    degree = len(neighbours)
    weights = [Fraction(1, 1 + max(degree, len(_neighbours(topology, j, world_size)))) for j in neighbours]
    return MixingRow(
        self_weight=float(1 - sum(weights)),
        send_to=neighbours,
        recv_from=neighbours,
        recv_weights=tuple(float(w) for w in weights),
    )


def mixing_row(topology: str, rank: int, world_size: int, round_index: int, seed: int) -> MixingRow:
    """Row ``rank`` of round ``round_index``'s mixing matrix, and the ranks that need this rank's model.

    O(n) for ``random`` and ``complete``, O(1) for ``one_peer_exponential``, and for the
    static graphs O(degree^2) = O(log^2 n) at most on the first call, cached afterwards.
    """
    _validate_round(topology, world_size, round_index, seed)
    _check_int("rank", rank, low=0, high=world_size)
    if world_size == 1:
        return _IDENTITY_ROW
    return ROWS[topology](rank, world_size, round_index, seed)


def _random_row(rank: int, world_size: int, round_index: int, seed: int) -> MixingRow:
    partner = random_matching(world_size, round_index, seed)[rank]
    if partner == rank:
        return _IDENTITY_ROW
    return MixingRow(self_weight=0.5, send_to=(partner,), recv_from=(partner,), recv_weights=(0.5,))


def _one_peer_exponential_row(rank: int, world_size: int, round_index: int, seed: int) -> MixingRow:
    shift = 1 << (round_index % (world_size - 1).bit_length())
    return MixingRow(self_weight=0.5, send_to=((rank + shift) % world_size,),
                     recv_from=((rank - shift) % world_size,), recv_weights=(0.5,))


def _complete_row(rank: int, world_size: int, round_index: int, seed: int) -> MixingRow:
    others = tuple(r for r in range(world_size) if r != rank)
    weight = 1 / world_size
    return MixingRow(self_weight=weight, send_to=others, recv_from=others, recv_weights=(weight,) * len(others))


def _static_row(topology: str) -> RowFunction:
    return lambda rank, world_size, round_index, seed: _metropolis_row(topology, rank, world_size)


RowFunction = Callable[[int, int, int, int], MixingRow]
"""``(rank, world_size, round_index, seed) -> MixingRow`` for ``world_size ≥ 2`` (validated arguments)."""

ROWS: dict[str, RowFunction] = {
    "random": _random_row,
    "ring": _static_row("ring"),
    "torus": _static_row("torus"),
    "exponential": _static_row("exponential"),
    "one_peer_exponential": _one_peer_exponential_row,
    "complete": _complete_row,
}
"""The topology registry: one row function per name. A new topology is one function and one entry here (plus, for a
static graph, its neighbours in ``_STATIC_GRAPHS``); every rank computes its own row, so it must be a pure function."""
assert tuple(ROWS) == TOPOLOGIES


def is_pairwise(topology: str) -> bool:
    """True if every rank averages 1/2-1/2 with exactly one partner or rests (``random``)."""
    validate_topology(topology)
    return topology == "random"
