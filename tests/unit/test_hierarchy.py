"""The pure parts of ``hierarchy="node"``: node layouts, shard bounds and shard views (no communication)."""

from __future__ import annotations

import pytest
import torch

from lightning_dopt.comm import FlatState
from lightning_dopt.hierarchy import NodeLayout, check_hierarchy, shard_bounds, shard_views


def test_layout_numbers_ranks_node_by_node() -> None:
    layout = NodeLayout(world_size=6, local_world_size=2)
    assert layout.nodes == 3
    assert layout.node_groups() == [[0, 1], [2, 3], [4, 5]]
    assert layout.cross_groups() == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(ValueError, match="same number of ranks on every node: 6 ranks do not split into nodes of 4"):
        NodeLayout(world_size=6, local_world_size=4)
    with pytest.raises(ValueError, match="unknown hierarchy 'nodes'; valid choices: flat, node"):
        check_hierarchy("nodes")


@pytest.mark.parametrize(("numel", "parts"), [(20_376, 2), (10, 3), (4096 * 5 + 1, 4), (0, 2)])
def test_shard_bounds_cover_the_buffer_in_order_at_aligned_cuts(numel: int, parts: int) -> None:
    bounds = shard_bounds(numel, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == numel
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        assert stop == start and (start % 4096 == 0 or start == numel)


def test_shard_views_are_the_shards_of_each_group_and_write_through() -> None:
    tensors = [torch.arange(5000.0).view(50, 100), torch.arange(3000.0), torch.arange(7, dtype=torch.float64)]
    state = FlatState(tensors)
    full = state.pack(state.new_buffers())
    for part in range(2):
        shard = FlatState(shard_views(state, part, 2))
        assert shard.group_count == state.group_count  # an empty shard of the float64 group keeps the group
        for buffer, shard_buffer in zip(full, shard.pack(shard.new_buffers())):
            start, stop = shard_bounds(buffer.numel(), 2)[part]
            assert torch.equal(shard_buffer, buffer[start:stop])
    second = FlatState(shard_views(state, 1, 2))
    second.unpack([torch.full_like(b, -1.0) for b in second.new_buffers()])
    # shard 1 of the fp32 group is its values 4096..7999: the end of the first tensor and all of the second
    first = tensors[0].view(-1)
    assert bool((first[:4096] >= 0).all()) and bool((first[4096:] == -1).all()) and bool((tensors[1] == -1).all())
    assert bool((tensors[2] >= 0).all())  # the 7 float64 values are all in shard 0


def test_shard_views_refuse_non_contiguous_tensors() -> None:
    with pytest.raises(ValueError, match="needs them contiguous"):
        shard_views(FlatState([torch.zeros(4, 6).t()]), 0, 2)
