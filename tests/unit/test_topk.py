"""The sparse top-k codec: exact payload sizes, what is kept and how close, grid values decoded exactly, error
feedback keeping the cumulative sum, refusals, and a compressed gossip round on virtual ranks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_dopt.compress import error_feedback_encode, error_feedback_encode_
from lightning_dopt import topk
from lightning_dopt.topk import TopKCodec, _pack_bits, _pack_bits_stream, _unpack_bits


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("block_size", "k", "bits"), [(4096, 64, 2), (16, 3, 1), (100, 100, 8), (2, 1, 4)])
def test_payload_size_matches_the_formula(block_size: int, k: int, bits: int) -> None:
    codec = TopKCodec(block_size, k, bits)
    for n in (1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3):
        chunks = math.ceil(n / block_size)
        index_bits = max(1, math.ceil(math.log2(block_size)))
        expected = math.ceil(chunks * k * index_bits / 8) + math.ceil(chunks * k * bits / 8) + 4 * chunks
        payload = codec.encode(torch.randn(n, generator=gen(n)))
        assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(n) == expected, n
    assert TopKCodec(4096, 64, 2).payload_bytes(4096) == 116  # 0.0071 of fp32, as the docstring says


def test_keeps_the_k_largest_of_each_chunk_within_one_level() -> None:
    codec = TopKCodec(64, 5, 2)
    x = torch.randn(64 * 7 + 10, generator=gen(1)) * torch.linspace(0.1, 10, 64 * 7 + 10)
    decoded = codec.decode(codec.encode(x), x.numel())
    padded = torch.cat([x, torch.zeros(64 * 8 - x.numel())]).view(8, 64)
    kept = torch.zeros_like(padded, dtype=torch.bool).scatter_(1, padded.abs().topk(5, dim=1).indices, True)
    kept = kept.view(-1)[:x.numel()]
    assert torch.equal(decoded != 0, kept)  # exactly the k largest magnitudes (no zero level)
    largest = padded.abs().amax(dim=1).repeat_interleave(64)[:x.numel()]
    assert bool(((decoded - x).abs()[kept] <= largest[kept] / 3 * (1 + 1e-6)).all())


def test_kept_magnitudes_are_the_largest_with_ties_signed_zeros_and_subnormals() -> None:
    """The selection compares magnitudes as the int32 of their bits: the kept magnitudes of every chunk must be the
    chunk's k largest as floats, whichever of equal values is taken."""
    codec = TopKCodec(32, 6, 8)
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([0.5, -0.5, 0.5, -0.0, 0.0, tiny / 4, -tiny / 2, 3.0e38, -3.0e38, 1e-30] * 64)
    x = x[torch.randperm(x.numel(), generator=gen(3))]
    positions = topk._unpack_bits(codec.encode(x)[:codec._layout(x.numel())[1]], codec.index_bits, 20 * 6).view(20, 6)
    kept = x.view(20, 32).abs().gather(1, positions).sort(dim=1).values
    assert torch.equal(kept, x.view(20, 32).abs().topk(6, dim=1).values.sort(dim=1).values)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_values_on_the_level_grid_decode_exactly(bits: int) -> None:
    levels = 2**bits
    codes = torch.randint(0, levels, (6, 4), generator=gen(bits))
    codes[:, 0] = levels - 1  # every chunk holds its own maximum m
    m = torch.tensor([1.0, 0.5, 2.0, 8.0, 0.25, 4.0])[:, None]
    values = (2 * codes - (levels - 1)).float() / (levels - 1) * m
    x = torch.zeros(6, 32)
    x[:, [3, 9, 17, 30]] = values
    codec = TopKCodec(32, 4, bits)
    assert torch.equal(codec.decode(codec.encode(x.view(-1)), x.numel()), x.view(-1))


def test_error_feedback_keeps_the_cumulative_sum() -> None:
    """Σ decoded over rounds = Σ inputs − the last residual: nothing is lost, only delayed."""
    codec = TopKCodec(128, 4, 2)
    residual = torch.zeros(1000)
    sent, meant = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    for round_index in range(50):
        x = torch.randn(1000, generator=gen(round_index))
        payload, residual = error_feedback_encode(codec, x, residual)
        sent += codec.decode(payload, 1000).double()
        meant += x.double()
    assert torch.allclose(sent + residual.double(), meant, atol=1e-4)
    assert float(residual.abs().max()) < float(meant.abs().max())  # the residual stays bounded


def test_error_feedback_in_place_with_scratch_equals_the_pure_form_and_keeps_the_residual_on_refusal() -> None:
    codec = TopKCodec(64, 4, 2)
    x, residual = torch.randn(1000, generator=gen(5)), torch.randn(1000, generator=gen(6))
    payload, expected = error_feedback_encode(codec, x, residual)
    in_place, scratch, out = residual.clone(), torch.empty(1000), torch.empty(1000)
    sent, decoded = error_feedback_encode_(codec, x, in_place, scratch=scratch, out=out)
    assert torch.equal(sent, payload) and torch.equal(in_place, expected) and decoded is out
    assert torch.equal(out, codec.decode(payload, 1000))
    bad = x.clone()
    bad[7] = float("nan")
    before = in_place.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        error_feedback_encode_(codec, bad, in_place, scratch=scratch)
    assert torch.equal(in_place, before)  # a refused input leaves the residual as it was


@pytest.mark.parametrize("numel", [64 * 40, 64 * 40 + 37, 5])
def test_row_groups_do_not_change_the_payload(numel: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encode selects from pieces of GROUP_VALUES values (and a padded last chunk): pieces of one chunk, of three
    chunks, or the whole input give the same payload, and decode (into ``out``) drops the padding's positions."""
    codec = TopKCodec(block_size=64, k=5, bits=2)
    x = torch.randn(numel, generator=gen(numel))
    x[::3] = 0.0  # ties among the magnitudes
    payloads = []
    for group_values in (64, 3 * 64, 1 << 19):
        monkeypatch.setattr(topk, "GROUP_VALUES", group_values)
        payloads.append(codec.encode(x))
    assert all(torch.equal(payloads[0], payload) for payload in payloads)
    out = torch.full((numel,), float("nan"))
    decoded = codec.decode(payloads[0], numel, out=out)
    assert decoded is out and bool(torch.isfinite(out).all())
    kept_per_chunk = [int((chunk != 0).sum()) for chunk in out.split(64)]
    assert all(count <= 5 for count in kept_per_chunk) and sum(kept_per_chunk) > 0


@pytest.mark.parametrize("count", [1, 7, 1001])
def test_bit_packing_round_trips_and_matches_the_bit_stream(count: int) -> None:
    """The word-wise packing writes the same bytes as concatenating every value's bits (LSB first), for the widths
    it handles and for those it hands to the bit stream (odd widths above 8)."""
    for bits in range(1, 17):
        values = torch.randint(0, 2**bits, (count,), generator=gen(bits))
        packed = _pack_bits(values, bits)
        assert packed.numel() == math.ceil(count * bits / 8)
        assert torch.equal(packed, _pack_bits_stream(values, bits)), bits
        assert torch.equal(_unpack_bits(packed, bits, count), values), bits


def test_refusals() -> None:
    for kwargs, match in [({"block_size": 1}, "block_size"), ({"k": 0}, "k must be between 1 and block_size"),
                          ({"block_size": 8, "k": 9}, "k must be between"), ({"bits": 3}, r"bits must be one of \(1, 2, 4, 8\)"),
                          ({"k": 2.0}, "k must be an int"), ({"bits": True}, "bits must be an int"),
                          ({"block_size": 8, "k": 2, "mean_k": 9}, "mean_k must be between 1 and block_size=8"),
                          ({"mean_k": 0}, "mean_k must be between"), ({"mean_k": 3.0}, "mean_k must be an int")]:
        with pytest.raises(ValueError, match=match):
            TopKCodec(**kwargs)
    codec = TopKCodec(16, 2, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(torch.tensor([float("inf")] + [0.0] * 20))
    payload = codec.encode(torch.randn(40, generator=gen(0)))
    with pytest.raises(ValueError, match="bytes; expected"):
        codec.decode(payload[:-1], 40)
    with pytest.raises(TypeError, match="float32"):
        codec.encode(torch.zeros(4, dtype=torch.float64))


def test_mean_codec_keeps_mean_k_values_per_chunk() -> None:
    codec = TopKCodec(block_size=64, k=4, bits=2, mean_k=12)
    mean = codec.mean_codec
    assert (mean.block_size, mean.k, mean.bits, mean.mean_k) == (64, 12, 2, 12) and mean.mean_codec is mean
    assert repr(codec) == "TopKCodec(block_size=64, k=4, bits=2, mean_k=12)"
    same = TopKCodec(block_size=64, k=4, bits=2)
    assert same.mean_codec is same and same.mean_k == 4 and repr(same) == "TopKCodec(block_size=64, k=4, bits=2)"
    x = torch.randn(640, generator=gen(3))
    assert int((mean.decode(mean.encode(x), 640) != 0).sum()) == 10 * 12
    assert mean.payload_bytes(640) == math.ceil(120 * 6 / 8) + math.ceil(120 * 2 / 8) + 4 * 10


def test_gossip_with_error_feedback_conserves_the_sum_of_replicas() -> None:
    """4 virtual ranks, random pairwise rounds of top-k differences from the anchor, an exact-mean refresh every 5th
    round, no training in between. Both ends of a pair use the same decoded values and each replica keeps what it did
    not send (its error-feedback residual ``e_i``), so a graph round keeps ``Σ_i x_i``; a refresh keeps
    ``Σ_i x_i + n·R`` with ``R`` the owners' residuals of the mean. The replicas approach each other."""
    from torch import nn

    from lightning_dopt.engine import build_engine
    from lightning_dopt.inprocess import InProcessGroup
    from lightning_dopt.options import Options

    options = Options(local_steps=1, topology="random", compression=TopKCodec(16, 4, 2), anchor_interval=5,
                      anchor_tolerance=None)
    group = InProcessGroup(4, timeout=20.0)
    modules = [nn.Linear(8, 8) for _ in range(4)]
    engines = [build_engine(options, module, [list(module.parameters())], comm, rank, torch.device("cpu"),
                            background=comm.background, timeout=20.0)
               for rank, (module, comm) in enumerate(zip(modules, group.communicators()))]
    group.run(lambda rank: engines[rank].sync.broadcast_())
    with torch.no_grad():  # the replicas drift apart, as local steps would make them
        for rank, module in enumerate(modules):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen(rank)))

    def flat(rank: int) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in modules[rank].parameters()]).double()

    def compression(rank: int) -> Any:
        return engines[rank].sync.round.compression

    def mean_residual() -> torch.Tensor:  # R: each owner's residual of the mean, at its chunk
        (numel,) = compression(0).state.group_sizes
        placed = torch.zeros(numel, dtype=torch.float64)
        for rank, (start, stop) in enumerate(compression(0)._chunks(numel)):
            placed[start:stop] = compression(rank).mean_residual[0].double()
        return placed

    def conserved() -> torch.Tensor:
        return sum(flat(rank) for rank in range(4)) + 4 * mean_residual()

    def spread() -> float:
        mean = sum(flat(rank) for rank in range(4)) / 4
        return sum(float((flat(rank) - mean).norm()) for rank in range(4))

    before, spread_before = conserved(), spread()
    for round_index in range(30):
        group.run(lambda rank: engines[rank].after_step())
        assert torch.allclose(conserved(), before, atol=1e-4), round_index
        assert max(float(compression(rank).residual[0].abs().max()) for rank in range(4)) > 0  # feedback in use
        if round_index % 5 == 4:  # after a refresh the replicas differ by their residuals alone
            for rank in range(4):
                kept = flat(rank) - compression(rank).anchor[0].double()
                assert torch.allclose(kept, compression(rank).residual[0].double(), atol=1e-6)
    assert spread() < 0.25 * spread_before
    group.close()
