"""Test oracle: the dense mixing matrix of one round, assembled from the rows every rank computes on its own."""

from __future__ import annotations

from lightning_dopt.topology import mixing_row


def mixing_matrix(topology: str, world_size: int, round_index: int, seed: int) -> list[list[float]]:
    """Dense W of one round: ``W[i][j]`` is the weight of ``x_j`` in rank i's update (row i = ``mixing_row(i)``)."""
    mixing_row(topology, 0, world_size, round_index, seed)  # validates the arguments (ValueError), like every rank
    matrix = [[0.0] * world_size for _ in range(world_size)]
    for i in range(world_size):
        row = mixing_row(topology, i, world_size, round_index, seed)
        matrix[i][i] = row.self_weight
        for j, weight in zip(row.recv_from, row.recv_weights):
            matrix[i][j] = weight
    return matrix
