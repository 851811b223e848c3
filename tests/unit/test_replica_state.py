"""Which buffers belong to the replica state (no communication)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_dopt.replica import persistent_buffers


class WithTable(nn.Module):
    """BatchNorm (persistent float and integer buffers) plus a non-persistent position table, as in the translation
    recipe's model."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("table", torch.arange(12.0).view(3, 4), persistent=False)
        self.register_buffer("scale", torch.ones(4))


def test_persistent_buffers_are_those_of_the_state_dict_in_buffer_order() -> None:
    module = nn.Sequential(WithTable(), nn.Linear(4, 4))
    kept = persistent_buffers(module)
    state = module.state_dict()
    expected = [b for name, b in module.named_buffers() if name in state]
    assert [id(b) for b in kept] == [id(b) for b in expected]
    assert all(b is not module[0].table for b in kept)
    assert len(kept) == 4  # running_mean, running_var, num_batches_tracked, scale


def test_a_buffer_shared_by_two_modules_is_listed_once() -> None:
    first, second = WithTable(), WithTable()
    second.scale = first.scale  # the same tensor registered in both
    kept = persistent_buffers(nn.ModuleList([first, second]))
    assert sum(b is first.scale for b in kept) == 1
