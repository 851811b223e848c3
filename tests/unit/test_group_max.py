"""The group-max codec: exact payload sizes, the largest magnitude of every group kept within one level, error
feedback keeping the cumulative sum, the mean codec, refusals, and an exact-mean round on virtual ranks that keeps the
unsent part in the replicas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dopt import GroupMaxCodec, TopKCodec
from lightning_dopt.compress import error_feedback_encode
from lightning_dopt.compressed_rounds import AnchoredCompression, aligned_chunks
from lightning_dopt.comm import FlatState
from lightning_dopt.inprocess import InProcessGroup
from lightning_dopt.traffic import compressed_mean_bytes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("group", "bits", "block_size"), [(32, 4, 4096), (2, 1, 2), (8, 2, 64), (4, 8, 16)])
def test_payload_size_matches_the_formula(group: int, bits: int, block_size: int) -> None:
    codec = GroupMaxCodec(group, bits, block_size)
    for n in (1, group - 1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3):
        if n < 1:
            continue
        blocks = math.ceil(n / block_size)
        kept = blocks * block_size // group
        expected = math.ceil(kept * math.log2(group) / 8) + math.ceil(kept * bits / 8) + 4 * blocks
        payload = codec.encode(torch.randn(n, generator=gen(n)))
        assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(n) == expected, n


def test_the_module_docstrings_byte_equivalences_with_topk() -> None:
    """g = 16 sends the bytes of k = 128 and g = 4 those of k = 384 per 4,096 values, with twice and 2.7 times the
    values."""
    for n in (4096, 4096 * 355 + 11):
        assert GroupMaxCodec(16, 4).payload_bytes(n) == TopKCodec(k=128, bits=4).payload_bytes(n)
        assert GroupMaxCodec(4, 4).payload_bytes(n) == TopKCodec(k=384, bits=4).payload_bytes(n)


@pytest.mark.parametrize("numel", [64 * 7, 64 * 7 + 10, 5])
def test_keeps_the_largest_of_each_group_within_one_level(numel: int) -> None:
    codec = GroupMaxCodec(8, 2, 64)
    x = torch.randn(numel, generator=gen(numel)) * torch.linspace(0.1, 10, numel)
    decoded = codec.decode(codec.encode(x), numel)
    padded = torch.cat([x, torch.zeros(-numel % 64)])
    groups = padded.view(-1, 8)
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().argmax(dim=1, keepdim=True), True)
    kept = kept.view(-1)[:numel] & (x != 0)
    assert torch.equal(decoded != 0, kept)  # one value per group (no zero level), the largest magnitude
    largest = padded.view(-1, 64).abs().amax(dim=1).repeat_interleave(64)[:numel]
    assert bool(((decoded - x).abs()[kept] <= largest[kept] / 3 * (1 + 1e-6)).all())


def test_ties_signed_zeros_subnormals_and_huge_values_keep_a_largest_magnitude() -> None:
    codec = GroupMaxCodec(16, 8, 32)
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([0.5, -0.5, 0.5, -0.0, 0.0, tiny / 4, -tiny / 2, 3.0e38, -3.0e38, 1e-30] * 64)
    x = x[torch.randperm(x.numel(), generator=gen(3))]
    decoded = codec.decode(codec.encode(x), x.numel()).view(-1, 16)
    groups = x.view(-1, 16)
    position = decoded.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(groups.abs().gather(1, position).view(-1), groups.abs().amax(dim=1))
    assert int((decoded != 0).sum(dim=1).max()) <= 1


def test_error_feedback_keeps_the_cumulative_sum() -> None:
    """Over rounds, what was decoded plus the last residual is what was meant to be sent."""
    codec = GroupMaxCodec(16, 2, 256)
    residual = torch.zeros(1000)
    meant = torch.zeros(1000, dtype=torch.float64)
    decoded_total = torch.zeros(1000, dtype=torch.float64)
    for round_index in range(30):
        x = torch.randn(1000, generator=gen(round_index))
        payload, residual = error_feedback_encode(codec, x, residual)
        meant += x.double()
        decoded_total += codec.decode(payload, 1000).double()
    torch.testing.assert_close(decoded_total + residual.double(), meant, rtol=0, atol=1e-4)
    assert float(residual.abs().max()) > 0


def test_encode_refuses_non_finite_input_and_decode_checks_the_payload() -> None:
    codec = GroupMaxCodec(8, 4, 64)
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(100)
        x[37] = bad
        with pytest.raises(ValueError, match="groupmax encode input"):
            codec.encode(x)
    payload = codec.encode(torch.randn(100, generator=gen(0)))
    with pytest.raises(ValueError, match=r"groupmax payload has 21 bytes; expected 22 for numel=100"):
        codec.decode(payload[:-1], 100)


def test_refusals_name_the_valid_choices() -> None:
    cases = [({"group": 12}, "power of two >= 2 that divides block_size=4096, got 12"),
             ({"group": 1}, "power of two >= 2"), ({"group": 8192}, "divides block_size=4096, got 8192"),
             ({"group": 8, "block_size": 12}, "divides block_size=12, got 8"),
             ({"mean_group": 3}, "mean_group must be a power of two"),
             ({"bits": 3}, r"bits must be one of \(1, 2, 4, 8\), got 3"),
             ({"group": 16.0}, "group must be an int, got 16.0"), ({"bits": True}, "bits must be an int, got True")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            GroupMaxCodec(**kwargs)


def test_mean_codec_uses_mean_group_and_is_built_once() -> None:
    codec = GroupMaxCodec(16, 4, mean_group=8)
    assert codec.mean_codec is codec.mean_codec and codec.mean_codec.group == 8
    assert codec.mean_codec.bits == 4 and codec.mean_codec.block_size == 4096
    assert GroupMaxCodec(16).mean_codec is not None and GroupMaxCodec(16).mean_codec.group == 16
    assert repr(codec) == "GroupMaxCodec(group=16, bits=4, block_size=4096, mean_group=8)"
    assert repr(GroupMaxCodec()) == "GroupMaxCodec(group=32, bits=4, block_size=4096)"
    assert codec.sparse and not codec.unbiased


def test_exact_mean_rounds_keep_the_unsent_part_and_conserve_the_sum() -> None:
    """Four virtual ranks, ``complete`` rounds of ``GroupMaxCodec(mean_group < group)``: every rank steps the same
    anchor, each replica is that anchor plus its own residual (zero on the chunk it owns), ``Σ_i x_i + n·R`` is
    conserved (``R``: the owners' residuals of the mean), and the bytes are the formula's."""
    world_size, numel = 4, 64 * 9 + 13
    codec = GroupMaxCodec(8, 4, 64, mean_group=2)
    chunks = aligned_chunks(numel, codec.block_size, world_size)
    group = InProcessGroup(world_size, timeout=30.0)
    models = [torch.nn.Linear(numel - 1, 1) for _ in range(world_size)]  # numel parameters each
    compressions = []
    for rank, (model, comm) in enumerate(zip(models, group.communicators())):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.full_like(p, 0.5))
        compressions.append(AnchoredCompression(FlatState(list(model.parameters())), comm, codec, seed=rank))
    previous_mean_residual = torch.zeros(numel, dtype=torch.float64)
    try:
        for round_index in range(3):
            works = []
            for rank, (model, compression) in enumerate(zip(models, compressions)):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=gen(10 * round_index + rank)))
                works.append(compression.state.new_buffers())
                compression.state.pack(works[-1])
            before = sum(w[0].double() for w in works) + world_size * previous_mean_residual
            sent_before = [c.comm.stats.bytes_sent for c in compressions]
            group.run(lambda rank: compressions[rank].average_round(works[rank]))
            anchor = compressions[0].anchor[0]
            mean_residual = torch.zeros(numel, dtype=torch.float64)
            for rank, compression in enumerate(compressions):
                assert torch.equal(compression.anchor[0], anchor)
                residual = compression.residual[0]
                assert not residual[slice(*chunks[rank])].any()
                torch.testing.assert_close(works[rank][0] - anchor, residual, rtol=0, atol=1e-6)
                mean_residual[slice(*chunks[rank])] = compression.mean_residual[0].double()
                sent = compression.comm.stats.bytes_sent - sent_before[rank]
                assert sent == compressed_mean_bytes(numel, codec, rank, world_size)
            after = sum(w[0].double() for w in works) + world_size * mean_residual
            torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
            assert max(float(c.residual[0].abs().max()) for c in compressions) > 0
            previous_mean_residual = mean_residual
    finally:
        group.close()
