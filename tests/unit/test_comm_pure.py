"""Pure tests of lightning_dopt.comm and rounds._mix_ (no process group): flat buffers, byte formulas, counters,
and the mixing arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_dopt.comm import CommStats, FlatState, ring_allreduce_bytes
from lightning_dopt.rounds import _mix_


def mixed_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=generator),
        torch.randn(5, generator=generator, dtype=torch.float64),
        torch.randn(2, 3, 2, generator=generator).bfloat16(),
        torch.randint(-50, 50, (7,), generator=generator),
        torch.randn((), generator=generator),  # 0-d
        torch.randn(1, 1, generator=generator, dtype=torch.float64),
        torch.randn(0, generator=generator),  # empty
        torch.randn(4, 1, 2, generator=generator).bfloat16(),
        torch.randint(0, 9, (2, 2), generator=generator),
    ]


DTYPE_ORDER = [torch.float32, torch.float64, torch.bfloat16, torch.int64]  # order of first appearance


def test_flat_state_groups_one_buffer_per_dtype() -> None:
    tensors = mixed_tensors()
    state = FlatState(tensors)
    buffers = state.new_buffers()
    assert [b.dtype for b in buffers] == DTYPE_ORDER
    for buffer in buffers:
        assert buffer.dim() == 1 and buffer.is_contiguous()
        assert buffer.numel() == sum(t.numel() for t in tensors if t.dtype == buffer.dtype)
    assert state.numel == sum(t.numel() for t in tensors) == 12 + 5 + 12 + 7 + 1 + 1 + 0 + 8 + 4
    assert state.nbytes == sum(t.numel() * t.element_size() for t in tensors) == 4 * 13 + 8 * 6 + 2 * 20 + 8 * 11
    assert state.nbytes == sum(b.numel() * b.element_size() for b in buffers)


def test_flat_state_pack_lays_tensors_out_in_order() -> None:
    tensors = mixed_tensors()
    state = FlatState(tensors)
    buffers = state.new_buffers()
    assert state.pack(buffers) is buffers
    for buffer in buffers:
        expected = torch.cat([t.reshape(-1) for t in tensors if t.dtype == buffer.dtype])
        assert torch.equal(buffer, expected)


def test_flat_state_round_trip_in_place() -> None:
    tensors = mixed_tensors()
    originals = [t.clone() for t in tensors]
    pointers = [t.data_ptr() for t in tensors]
    state = FlatState(tensors)
    buffers = state.pack(state.new_buffers())
    for tensor in tensors:  # scramble the tensors, then restore them from the buffers
        tensor.zero_()
    state.unpack(buffers)
    assert [t.data_ptr() for t in tensors] == pointers
    for tensor, original in zip(tensors, originals):
        assert tensor.dtype == original.dtype and tensor.shape == original.shape
        assert torch.equal(tensor, original)
    for buffer in buffers:  # writes go to the tensors, and a later pack sees them
        buffer.add_(1)
    state.unpack(buffers)
    for tensor, original, pointer in zip(tensors, originals, pointers):
        assert torch.equal(tensor, original + 1)
        assert tensor.data_ptr() == pointer
    assert all(torch.equal(a, b) for a, b in zip(state.pack(state.new_buffers()), buffers))


def test_flat_state_layout_is_shared_by_models_with_the_same_shapes() -> None:
    """What one rank packs, another rank with the same tensor list (other values) unpacks correctly."""
    sender = mixed_tensors()
    receiver = [torch.zeros_like(t) for t in sender]
    FlatState(receiver).unpack(FlatState(sender).pack(FlatState(sender).new_buffers()))
    assert all(torch.equal(a, b) for a, b in zip(receiver, sender))


def test_flat_state_handles_non_contiguous_tensors() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    transposed = base.t()
    state = FlatState([transposed])
    (buffer,) = state.pack(state.new_buffers())
    assert torch.equal(buffer, transposed.reshape(-1))
    buffer.mul_(-1)
    state.unpack([buffer])
    assert torch.equal(base, -torch.arange(12.0).reshape(3, 4))


def test_flat_state_of_nothing() -> None:
    state = FlatState([])
    assert state.new_buffers() == [] and state.numel == 0 and state.nbytes == 0
    state.unpack(state.pack([]))


@pytest.mark.parametrize(("payload", "world_size", "expected"),
                         [(1000, 1, 0), (1000, 2, 1000), (1000, 4, 1500), (1000, 3, 1333), (7, 8, 12), (0, 5, 0),
                          (4 * 10**9, 64, 2 * 63 * 4 * 10**9 // 64)])
def test_ring_allreduce_bytes(payload: int, world_size: int, expected: int) -> None:
    assert ring_allreduce_bytes(payload, world_size) == expected
    assert isinstance(ring_allreduce_bytes(payload, world_size), int)


def test_comm_stats_record_and_state_dict_round_trip() -> None:
    stats = CommStats()
    stats.record("round", sent=100, received=80, messages=2, seconds=0.5)
    stats.record("eval", sent=10, received=10, messages=1, seconds=0.25)
    stats.record("round", sent=100, received=120, messages=2, seconds=0.25)
    stats.rounds += 2
    assert (stats.bytes_sent, stats.bytes_received, stats.messages, stats.rounds) == (210, 210, 5, 2)
    assert stats.seconds == pytest.approx(1.0)
    assert stats.bytes_sent_by_purpose == {"round": 200, "eval": 10}

    saved = stats.state_dict()
    assert saved == {"bytes_sent": 210, "bytes_received": 210, "messages": 5, "rounds": 2, "seconds": 1.0,
                     "bytes_sent_by_purpose": {"round": 200, "eval": 10}}
    saved_copy = copy.deepcopy(saved)
    restored = CommStats()
    restored.load_state_dict(saved)
    assert restored == stats
    restored.record("round", sent=1, received=1, messages=1, seconds=0.0)
    assert saved == saved_copy  # the loaded counters do not alias the saved dict
    assert stats.bytes_sent_by_purpose == {"round": 200, "eval": 10}
    saved["bytes_sent_by_purpose"]["eval"] = 999
    assert stats.bytes_sent_by_purpose["eval"] == 10  # nor does the state dict alias the live counters


def test_mix_float32_weights() -> None:
    generator = torch.Generator().manual_seed(1)
    target, a, b = (torch.randn(1000, generator=generator) for _ in range(3))
    expected = 0.2 * target.double() + 0.3 * a.double() + 0.5 * b.double()
    pointer = target.data_ptr()
    _mix_(target, 0.2, [a, b], [0.3, 0.5])
    assert target.data_ptr() == pointer and target.dtype == torch.float32
    torch.testing.assert_close(target.double(), expected, rtol=1e-6, atol=1e-6)


def test_mix_pair_is_symmetric_bitwise() -> None:
    generator = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        a, b = (torch.randn(4096, generator=generator).to(dtype) for _ in range(2))
        left, right = a.clone(), b.clone()
        _mix_(left, 0.5, [b], [0.5])
        _mix_(right, 0.5, [a], [0.5])
        assert torch.equal(left, right), dtype
        assert torch.equal(left, ((a.double() + b.double()) / 2).to(dtype)), dtype  # the correctly rounded mean


def test_mix_accumulates_low_precision_in_float32() -> None:
    """1 + 4 * 2^-9 = 1 + 2^-7 is a bfloat16 number, but adding 2^-9 four times in bfloat16 stays at 1."""
    tiny = torch.full((3,), 2.0**-9, dtype=torch.bfloat16)
    target = torch.ones(3, dtype=torch.bfloat16)
    pointer = target.data_ptr()
    _mix_(target, 1.0, [tiny] * 4, [1.0] * 4)
    assert target.dtype == torch.bfloat16 and target.data_ptr() == pointer
    assert torch.equal(target, torch.full((3,), 1 + 2.0**-7, dtype=torch.bfloat16))
    bf16_sum = torch.ones(3, dtype=torch.bfloat16)
    for _ in range(4):
        bf16_sum.add_(tiny)
    assert torch.equal(bf16_sum, torch.ones(3, dtype=torch.bfloat16))  # what bf16 accumulation would give


def test_mix_float64_stays_in_place() -> None:
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)
    other = torch.tensor([3.0, 6.0], dtype=torch.float64)
    pointer = target.data_ptr()
    _mix_(target, 0.25, [other], [0.75])
    assert target.data_ptr() == pointer
    assert torch.equal(target, torch.tensor([2.5, 5.0], dtype=torch.float64))


def test_mix_without_others_scales() -> None:
    target = torch.tensor([2.0, -4.0])
    _mix_(target, 1.0, [], [])
    assert torch.equal(target, torch.tensor([2.0, -4.0]))
    _mix_(target, 0.5, [], [])
    assert torch.equal(target, torch.tensor([1.0, -2.0]))
