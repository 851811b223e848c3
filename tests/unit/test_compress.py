"""Tests for lightning_dopt.compress: payload sizes and layout, per-block error bounds, unbiasedness, error feedback,
input validation and make_codec."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dopt import compress
from lightning_dopt.compress import (
    CODECS,
    BlockQuantCodec,
    CastCodec,
    Codec,
    check_finite,
    error_feedback_encode,
    make_codec,
)

VALID_CHOICES = "valid choices: None, bf16, fp16, int8, int4, or a Codec instance"
ALL_CODECS = [CastCodec(torch.bfloat16), CastCodec(torch.float16), BlockQuantCodec(8, 256), BlockQuantCodec(4, 256),
              BlockQuantCodec(8, 2), BlockQuantCodec(4, 64)]
CODEC_IDS = [repr(codec) for codec in ALL_CODECS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def roundtrip(codec: Codec, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return codec.decode(codec.encode(x, gen(seed)), x.numel())


def expected_payload_bytes(codec: Codec, n: int) -> int:
    """The payload size, computed here independently of the codec's own formula."""
    if isinstance(codec, CastCodec):
        return 2 * n
    blocks = math.ceil(n / codec.block_size)
    return blocks * codec.block_size * codec.bits // 8 + 2 * 4 * blocks


def block_bounds(x: torch.Tensor, block_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element of ``x``: the ``step`` of its own block (over real elements only, float64) and the allowed error,
    ``step`` plus a few fp32 ulps of the block's magnitude for the rounding of fp32 arithmetic."""
    x64 = x.double()
    n = x64.numel()
    blocks = -(-n // block_size)
    padded = torch.cat([x64, x64[-1:].expand(blocks * block_size - n)]).view(blocks, block_size)
    lo, hi = padded.amin(1), padded.amax(1)
    step = (hi - lo) / (2**bits - 1)
    tol = step * (1 + 2**-20) + 2**-21 * (hi - lo + torch.maximum(lo.abs(), hi.abs()))
    return step.repeat_interleave(block_size)[:n], tol.repeat_interleave(block_size)[:n]


def assert_within_block_bound(codec: BlockQuantCodec, x: torch.Tensor, decoded: torch.Tensor) -> None:
    _, tol = block_bounds(x, codec.block_size, codec.bits)
    err = (decoded.double() - x.double()).abs()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), f"element {worst}: error {err[worst]:.3e} > allowed {tol[worst]:.3e}"


# ------------------------------------------------------------------------------------------- sizes and layout
@pytest.mark.parametrize("codec", ALL_CODECS, ids=CODEC_IDS)
def test_payload_size_matches_formula(codec: Codec) -> None:
    for n in (1, 2, 3, 63, 64, 65, 255, 256, 257, 511, 1000, 4097):
        payload = codec.encode(torch.randn(n, generator=gen(n)), gen(n))
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == codec.payload_bytes(n) == expected_payload_bytes(codec, n), n
    assert codec.payload_bytes(0) == 0


def test_compression_ratios_at_block_256() -> None:
    int8, int4 = make_codec("int8"), make_codec("int4")
    assert int8.payload_bytes(256) == 264 and int4.payload_bytes(256) == 136
    n = 256 * 1000
    assert int8.payload_bytes(n) / (4 * n) == pytest.approx(264 / 1024) == pytest.approx(0.2578, abs=1e-4)
    assert int4.payload_bytes(n) / (4 * n) == pytest.approx(136 / 1024) == pytest.approx(0.1328, abs=1e-4)
    assert make_codec("bf16").payload_bytes(n) == make_codec("fp16").payload_bytes(n) == 2 * n


@pytest.mark.parametrize("bits", [4, 8])
def test_grid_inputs_decode_exactly_and_layout_is_codes_then_lo_then_step(bits: int) -> None:
    """Inputs already on each block's grid (lo + k·step, step a power of two) have integer codes: the round trip is
    exact for any random draw, which checks the packing (int4: first code in the low nibble) and the layout."""
    block_size, blocks, levels = 8, 5, 2**bits - 1
    codes = torch.randint(0, levels + 1, (blocks, block_size), generator=gen(1))
    codes[:, 0], codes[:, 1] = 0, levels  # every block spans its full grid, so its step is the one chosen here
    lo = torch.tensor([-1.0, 0.0, 3.5, -1024.0, 7.0])
    step = torch.tensor([2.0**-3, 2.0**-10, 1.0, 2.0**4, 2.0**-6])
    x = (lo[:, None] + codes * step[:, None]).flatten()
    n = x.numel() - 3  # a partial last block: its real elements still include codes 0 and levels
    x = x[:n]
    codec = BlockQuantCodec(bits, block_size)
    for seed in range(3):
        payload = codec.encode(x, gen(seed))
        assert torch.equal(codec.decode(payload, n), x)
    flat_codes = codes.flatten().to(torch.uint8)
    flat_codes[n:] = flat_codes[n - 1]  # padding repeats the last real value
    if bits == 4:
        flat_codes = flat_codes[0::2] | (flat_codes[1::2] << 4)
    code_bytes = blocks * block_size * bits // 8
    assert torch.equal(payload[:code_bytes], flat_codes)
    stats = payload[code_bytes:].clone().view(torch.float32)
    assert torch.equal(stats, torch.cat([lo, step]))


def test_decode_accepts_a_misaligned_payload_view() -> None:
    """A payload sliced out of a larger receive buffer at an odd byte offset decodes the same."""
    for codec in (make_codec("int4", block_size=2), make_codec("bf16")):
        x = torch.randn(7, generator=gen(0))
        payload = codec.encode(x, gen(0))
        buffer = torch.zeros(payload.numel() + 1, dtype=torch.uint8)
        buffer[1:] = payload
        assert torch.equal(codec.decode(buffer[1:], 7), codec.decode(payload, 7))


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_encode_equals_one_pass(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encode and decode walk the blocks in cache-sized chunks; the chunk boundaries (here every 3 blocks, with a
    partial last block) change neither the payload nor the decoded values: the random words are drawn in order."""
    codec = BlockQuantCodec(bits, 64)
    x = torch.randn(64 * 10 + 17, generator=gen(9)) * torch.arange(64 * 10 + 17) / 100
    whole = codec.encode(x, gen(1))
    decoded = codec.decode(whole, x.numel())
    monkeypatch.setattr(compress, "_CPU_CHUNK_VALUES", 3 * 64)
    assert torch.equal(codec.encode(x, gen(1)), whole)
    assert torch.equal(codec.decode(whole, x.numel()), decoded)
    assert_within_block_bound(codec, x, decoded)


def test_concurrent_encodes_share_the_workspace_pool_safely() -> None:
    """Threads encoding at once (simulated workers do) each borrow their own scratch buffers: every payload equals
    the one a lone encode gives, and the pool keeps at most its bound of idle workspaces."""
    import threading

    codec = BlockQuantCodec(8, 256)
    inputs = [torch.randn(300_000 + 1000 * k, generator=gen(k)) for k in range(8)]
    alone = [codec.encode(x, gen(k)) for k, x in enumerate(inputs)]
    together: list[torch.Tensor | None] = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def encode(k: int) -> None:
        start.wait()
        for _ in range(3):
            together[k] = codec.encode(inputs[k], gen(k))

    threads = [threading.Thread(target=encode, args=(k,)) for k in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert len(compress._WORKSPACES._idle) <= compress._WORKSPACES.keep


@pytest.mark.parametrize("codec", ALL_CODECS, ids=CODEC_IDS)
def test_decode_into_a_reused_buffer(codec: Codec) -> None:
    x = torch.randn(300, generator=gen(10))
    payload = codec.encode(x, gen(0))
    out = torch.full((300,), float("nan"))
    assert codec.decode(payload, 300, out=out) is out
    assert torch.equal(out, codec.decode(payload, 300))
    for bad in (torch.empty(299), torch.empty(300, dtype=torch.float64), torch.empty(600)[::2], [0.0] * 300):
        with pytest.raises(ValueError, match=r"out must be a contiguous float32 tensor of shape \(300,\)"):
            codec.decode(payload, 300, out=bad)


# ------------------------------------------------------------------------------------------------ error bounds
@pytest.mark.parametrize("bits", [4, 8])
def test_error_bound_per_block_with_mixed_scales(bits: int) -> None:
    block_size = 64
    g = gen(3)
    x = torch.cat([
        1e-6 * torch.randn(block_size, generator=g),         # tiny block next to ...
        1e3 * torch.randn(block_size, generator=g),          # ... a huge one
        torch.full((block_size,), 2.5),                      # constant block
        100.0 + 1e-2 * torch.randn(block_size, generator=g),  # small range, large offset
        torch.randn(37, generator=g),                        # partial last block
    ])
    codec = BlockQuantCodec(bits, block_size)
    decoded = roundtrip(codec, x)
    assert_within_block_bound(codec, x, decoded)
    # The tiny block's error scales with its own range, not with its neighbour's.
    tiny = slice(0, block_size)
    tiny_range = float(x[tiny].max() - x[tiny].min())
    assert float((decoded[tiny] - x[tiny]).abs().max()) <= tiny_range / (2**bits - 1) * 1.001
    assert torch.equal(decoded[2 * block_size:3 * block_size], x[2 * block_size:3 * block_size])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("value", [0.0, 2.5, -7.25, 1e30, -1.2345678e-20])
def test_constant_blocks_and_length_one_decode_exactly(bits: int, value: float) -> None:
    codec = BlockQuantCodec(bits, 64)
    for n in (1, 64, 100, 128):
        x = torch.full((n,), value)
        assert torch.equal(roundtrip(codec, x), x), n


@pytest.mark.parametrize("bits", [4, 8])
def test_padding_does_not_widen_the_last_block(bits: int) -> None:
    """The last block holds 3 real values near 1000 with a range of 2e-3; zero padding would make its step ≈ 1000/levels."""
    block_size = 64
    x = torch.cat([torch.randn(block_size, generator=gen(4)), torch.tensor([1000.0, 1000.001, 1000.002])])
    codec = BlockQuantCodec(bits, block_size)
    decoded = roundtrip(codec, x)
    assert_within_block_bound(codec, x, decoded)
    assert float((decoded[-3:] - x[-3:]).abs().max()) < 1e-3


def test_block_maximum_never_wraps_around() -> None:
    """For some ranges d, fp32 gives (d − 0) / (d / 255) = 255 + 1.5e-5, so stochastic rounding would pick code 256
    (wrapping to 0 in a byte) once in ~65000 draws; the codes must be clamped to 255. One million blocks [0, d]."""
    d = torch.rand(10_000, generator=gen(13)) * 10 + 0.1
    t = d / (d / 255)
    d = d[int((t - 255).argmax())]
    assert float(d / (d / 255)) > 255  # the fp32 artefact this test is about
    x = torch.stack([torch.zeros(()), d]).repeat(1_000_000)
    codec = BlockQuantCodec(8, 2)
    assert_within_block_bound(codec, x, roundtrip(codec, x))


def test_cast_codecs_round_to_nearest() -> None:
    x = torch.randn(1001, generator=gen(5)) * 10
    for dtype in (torch.bfloat16, torch.float16):
        codec = CastCodec(dtype)
        decoded = roundtrip(codec, x)
        assert torch.equal(decoded, x.to(dtype).to(torch.float32))
        half_ulp = torch.finfo(dtype).eps / 2  # relative to the value's magnitude: 2^-9 (bf16), 2^-11 (fp16)
        assert bool(((decoded - x).abs() <= x.abs() * half_ulp + 2.0**-25).all())
        assert codec.decode(codec.encode(x[:1]), 1).shape == (1,)


# ------------------------------------------------------------------------------------------------ unbiasedness
@pytest.mark.parametrize("bits", [8, 4])
def test_block_quant_is_unbiased(bits: int) -> None:
    """The mean of 2000 independent decodes converges to the input. The 2000 trials are one encode of the input tiled
    2000 times: each copy fills whole blocks, so it is quantized with its own scale and its own random draws."""
    trials, n, block_size = 2000, 512, 256
    codec = BlockQuantCodec(bits, block_size)
    assert codec.unbiased
    x = torch.randn(n, generator=gen(6))
    tiled = x.repeat(trials)
    decoded = codec.decode(codec.encode(tiled, gen(7)), tiled.numel()).view(trials, n).double()
    step, fp_tol = block_bounds(x, block_size, bits)
    sigma = step / 2 / math.sqrt(trials)  # per-element variance <= step²/4
    tolerance = 6 * sigma + (fp_tol - step)
    bias = (decoded.mean(0) - x.double()).abs()
    assert bool((bias <= tolerance).all()), float((bias / tolerance).max())
    # The tolerance is tight: a single decode (or round-to-nearest, error up to step/2) misses it for most elements.
    assert float(((decoded[0] - x.double()).abs() > tolerance).double().mean()) > 0.5


def test_cast_codec_is_biased() -> None:
    x = torch.randn(1000, generator=gen(8))
    for codec in (make_codec("bf16"), make_codec("fp16")):
        assert not codec.unbiased
        decodes = torch.stack([roundtrip(codec, x, seed) for seed in range(5)])
        assert bool((decodes == decodes[0]).all())  # deterministic: averaging cannot remove the rounding error
        assert float((decodes[0] != x).double().mean()) > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_error_feedback_keeps_cumulative_sum_on_track(dtype: torch.dtype) -> None:
    """Over 100 rounds, Σ decoded − Σ sent = r_0 − r_100 + (fp32 rounding of x + r): one half-ulp, not 100."""
    codec, steps, n = CastCodec(dtype), 100, 2000
    g = gen(9)
    base = torch.randn(n, generator=g)
    xs = [base + 1e-4 * torch.randn(n, generator=g) for _ in range(steps)]
    residual = torch.zeros(n)
    with_ef = torch.zeros(n, dtype=torch.float64)
    without_ef = torch.zeros(n, dtype=torch.float64)
    for x in xs:
        x_before, r_before = x.clone(), residual.clone()
        payload, new_residual = error_feedback_encode(codec, x, residual)
        assert torch.equal(x, x_before) and torch.equal(residual, r_before)  # pure
        decoded = codec.decode(payload, n)
        assert torch.equal(new_residual, x + residual - decoded)
        residual = new_residual
        with_ef += decoded.double() - x.double()
        without_ef += roundtrip(codec, x).double() - x.double()
    magnitude = torch.stack(xs).abs().amax(0).double() * 1.01
    bound = magnitude * (torch.finfo(dtype).eps / 2 + steps * 2.0**-24) + 2.0**-24
    assert bool((with_ef.abs() <= bound).all()), float((with_ef.abs() / bound).max())
    assert float((without_ef.abs() > 5 * bound).double().mean()) > 0.5  # without EF the error accumulates


def test_error_feedback_validates_residual() -> None:
    with pytest.raises(ValueError, match="residual must match x"):
        error_feedback_encode(make_codec("bf16"), torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="residual must match x"):
        error_feedback_encode(make_codec("bf16"), torch.zeros(4), torch.zeros(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("codec", ALL_CODECS, ids=CODEC_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("index", [0, 150, 299])
def test_non_finite_input_is_refused(codec: Codec, bad: float, index: int) -> None:
    x = torch.randn(300, generator=gen(10))
    x[index] = bad
    with pytest.raises(ValueError, match=f"NaN or Inf: 1 of 300 elements, first at flat index {index}"):
        codec.encode(x, gen(0))


@pytest.mark.parametrize(("values", "finite"), [
    (torch.tensor([1.0, float("nan")]), False), (torch.tensor([1.0, -2.0]), True),
    (torch.tensor([float("-inf"), 0.0]).bfloat16(), False), (torch.zeros(0), True),
    (torch.tensor([1 + 1j, complex(0.0, float("inf"))]), False), (torch.ones(3, 4)[:, ::2], True),
    (torch.tensor([3e38, -3e38]), True)])
def test_finite_flag(values: torch.Tensor, finite: bool) -> None:
    flag = compress.finite_flag(values)
    assert flag.dim() == 0 and bool(flag) is finite


def test_check_finite() -> None:
    check_finite(torch.ones(3), "x")
    check_finite(torch.zeros(0), "x")
    check_finite(torch.full((5,), torch.finfo(torch.float32).max), "x")
    with pytest.raises(ValueError, match="delta contains NaN or Inf: 1 of 2 elements, first at flat index 1"):
        check_finite(torch.tensor([1.0, float("nan")]), "delta")
    # Every position of lengths around the vector widths, so a vectorized reduction's tail handling is covered.
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 7, 8, 9, 31, 33, 65, 1027):
            for index in sorted({*range(min(n, 65)), *range(max(n - 65, 0), n)}):
                for bad in (float("nan"), float("inf"), float("-inf")):
                    x = torch.randn(n, generator=gen(n)).to(dtype)
                    x[index] = bad
                    with pytest.raises(ValueError, match=f"first at flat index {index};"):
                        check_finite(x, "x")


def test_out_of_range_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        make_codec("fp16").encode(torch.tensor([1.0, 1e5]))
    make_codec("bf16").encode(torch.tensor([1.0, 1e5]))  # bf16 has fp32's range
    with pytest.raises(ValueError, match="overflows fp32"):
        make_codec("int8").encode(torch.tensor([-3e38, 3e38]))


@pytest.mark.parametrize("codec", ALL_CODECS, ids=CODEC_IDS)
def test_bad_encode_inputs(codec: Codec) -> None:
    with pytest.raises(ValueError, match="empty"):
        codec.encode(torch.zeros(0))
    with pytest.raises(TypeError, match="float32"):
        codec.encode(torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        codec.encode(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D"):
        codec.encode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="1-D"):
        codec.encode(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        codec.encode([1.0, 2.0])


@pytest.mark.parametrize("codec", ALL_CODECS, ids=CODEC_IDS)
def test_bad_payloads(codec: Codec) -> None:
    payload = codec.encode(torch.randn(300, generator=gen(11)))
    with pytest.raises(ValueError, match=f"payload has {payload.numel() - 1} bytes; expected {payload.numel()}"):
        codec.decode(payload[:-1], 300)
    with pytest.raises(ValueError, match="bytes; expected"):
        codec.decode(torch.cat([payload, payload[:1]]), 300)
    with pytest.raises(ValueError, match="uint8"):
        codec.decode(payload.to(torch.int16), 300)
    with pytest.raises(ValueError, match="numel=0"):
        codec.decode(payload, 0)
    with pytest.raises(ValueError, match=">= 0"):
        codec.payload_bytes(-1)
    if isinstance(codec, CastCodec):  # a cast payload is 2n bytes: another n gives another length
        with pytest.raises(ValueError, match="bytes; expected"):
            codec.decode(payload, 299)


# -------------------------------------------------------------------------------------------------- make_codec
def test_make_codec() -> None:
    assert make_codec(None) is None
    codec = BlockQuantCodec(4, 32)
    assert make_codec(codec) is codec
    assert [make_codec(name).name for name in CODECS] == list(CODECS)
    assert make_codec("bf16").dtype == torch.bfloat16 and make_codec("fp16").dtype == torch.float16
    int8, int4 = make_codec("int8", block_size=128), make_codec("int4")
    assert (int8.bits, int8.block_size, int4.bits, int4.block_size) == (8, 128, 4, 256)


@pytest.mark.parametrize("spec", ["int3", "INT8", "fp32", "", 8, torch.float16])
def test_make_codec_rejects_unknown_names(spec) -> None:
    with pytest.raises(ValueError, match=f"unknown compression .*; {VALID_CHOICES}"):
        make_codec(spec)


@pytest.mark.parametrize("block_size", [0, -2, 3, 255, 2.0, True])
def test_bad_block_sizes(block_size) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 2"):
        make_codec("int8", block_size=block_size)
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 2"):
        BlockQuantCodec(4, block_size)


def test_bad_codec_parameters() -> None:
    with pytest.raises(ValueError, match="bits=4 or bits=8"):
        BlockQuantCodec(2)
    with pytest.raises(ValueError, match="bfloat16 and torch.float16"):
        CastCodec(torch.float32)


# ------------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_same_seed_same_payload(name: str) -> None:
    codec = make_codec(name, block_size=64)
    x = torch.randn(1000, generator=gen(12))
    assert torch.equal(codec.encode(x, gen(1)), codec.encode(x, gen(1)))
    assert not torch.equal(codec.encode(x, gen(1)), codec.encode(x, gen(2)))


# ----------------------------------------------------------------------------------------------------- property
@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 5000), block_size=st.sampled_from([2, 64, 256]), bits=st.sampled_from([4, 8]),
       scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 1e30]), offset=st.sampled_from([0.0, 1.0, -1000.0]),
       kind=st.sampled_from(["normal", "mixed_scales", "runs"]), seed=st.integers(0, 2**31 - 1))
def test_property_error_bound_and_size(n: int, block_size: int, bits: int, scale: float, offset: float, kind: str,
                                       seed: int) -> None:
    g = gen(seed)
    x = torch.randn(n, generator=g)
    if kind == "mixed_scales":  # each run of 50 elements has its own scale, 1e-6 .. 1e6
        x *= (10.0 ** torch.randint(-6, 7, ((n + 49) // 50,), generator=g)).repeat_interleave(50)[:n]
    elif kind == "runs":  # long constant stretches (whole constant blocks)
        x = x[(torch.arange(n) // 300)]
    x = ((x + offset) * scale).float()
    codec = BlockQuantCodec(bits, block_size)
    payload = codec.encode(x, g)
    assert payload.numel() == codec.payload_bytes(n) == expected_payload_bytes(codec, n)
    decoded = codec.decode(payload, n)
    assert decoded.dtype == torch.float32 and decoded.shape == (n,)
    assert bool(torch.isfinite(decoded).all())
    assert_within_block_bound(codec, x, decoded)


# ---------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CODECS)
def test_cuda_stays_on_device_with_one_sync_per_encode(name: str) -> None:
    codec = make_codec(name, block_size=64)
    x = torch.randn(10_000, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    codec.decode(codec.encode(x, g), x.numel())  # warm-up outside the sync accounting
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            payload = codec.encode(x, g)
            encode_syncs = len(caught)
            decoded = codec.decode(payload, x.numel())
            decode_syncs = len(caught) - encode_syncs
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert payload.device == decoded.device == x.device
    assert (encode_syncs, decode_syncs) == (1, 0)
    if isinstance(codec, BlockQuantCodec):
        assert_within_block_bound(codec, x.cpu(), decoded.cpu())
    if name in ("int8", "int4"):
        with pytest.raises(ValueError, match="generator is on cpu"):
            codec.encode(x, gen(0))


# ------------------------------------------------------------------------- fused kernels (Triton, CUDA only)
def test_fused_argument_is_validated() -> None:
    with pytest.raises(ValueError, match="fused must be True or False"):
        BlockQuantCodec(8, 64, fused="yes")
    if not compress.fused_kernels_available():
        with pytest.raises(ValueError, match="needs Triton"):
            BlockQuantCodec(8, 64, fused=True)
    else:
        with pytest.raises(ValueError, match="runs on CUDA tensors only"):
            BlockQuantCodec(8, 64, fused=True).encode(torch.randn(10), gen(0))
    assert repr(BlockQuantCodec(4, 64)) == "BlockQuantCodec(bits=4, block_size=64)"


needs_fused_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not compress.fused_kernels_available(),
                                      reason="needs CUDA and Triton")


@needs_fused_cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("block_size", "n"), [(256, 100_000), (64, 1000), (6, 37), (10, 1), (300, 1201)])
def test_cuda_fused_kernels_agree_with_torch_ops(bits: int, block_size: int, n: int) -> None:
    """Same payload size and per-block (lo, step) bytes as the torch-ops path, errors within the block bound, and each
    path decodes the other's payloads (equal up to one rounding: the kernel may fuse the multiply-add)."""
    fused, ops = BlockQuantCodec(bits, block_size, fused=True), BlockQuantCodec(bits, block_size, fused=False)
    x = (torch.randn(n, generator=gen(n)) * 3 + 1).cuda()
    g = torch.Generator(device="cuda")
    fused_payload, ops_payload = fused.encode(x, g.manual_seed(1)), ops.encode(x, g.manual_seed(1))
    assert fused_payload.shape == ops_payload.shape and fused_payload.device == x.device
    code_bytes = ops._code_bytes(ops._num_blocks(n))
    assert torch.equal(fused_payload[code_bytes:], ops_payload[code_bytes:])
    assert_within_block_bound(fused, x.cpu(), fused.decode(fused_payload, n).cpu())
    for payload in (fused_payload, ops_payload):
        torch.testing.assert_close(fused.decode(payload, n), ops.decode(payload, n), rtol=2**-22,
                                   atol=2**-22 * float(x.abs().max()))
    assert torch.equal(fused.encode(x, g.manual_seed(1)), fused_payload)  # a seeded generator reproduces the payload
    assert not torch.equal(fused.encode(x, g.manual_seed(2)), fused_payload)
    out = torch.full((n,), float("nan"), device="cuda")
    assert fused.decode(fused_payload, n, out=out) is out and bool(torch.isfinite(out).all())


@needs_fused_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_fused_kernels_are_unbiased(bits: int) -> None:
    """The mean of 2,000 decodes of one vector is within 5 standard errors (σ ≤ step/2 per encode) of it."""
    codec = BlockQuantCodec(bits, 64, fused=True)
    x = torch.randn(4096, generator=gen(3)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    draws = 2000
    total = torch.zeros_like(x)
    for _ in range(draws):
        total += codec.decode(codec.encode(x, g), x.numel())
    step, _ = block_bounds(x.cpu(), 64, bits)
    bias = (total / draws - x).abs().cpu()
    assert bool((bias <= 5 * 0.5 * step / math.sqrt(draws) + 1e-6).all()), float((bias / step).max())


@needs_fused_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_fused_kernels_refuse_what_torch_ops_refuse(bits: int) -> None:
    codec = BlockQuantCodec(bits, 64, fused=True)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1000, device="cuda")
        x[777] = bad
        with pytest.raises(ValueError, match="NaN|Inf|non-finite"):
            codec.encode(x)
    with pytest.raises(ValueError, match="overflows fp32"):
        codec.encode(torch.tensor([-3e38, 3e38] * 40, device="cuda"))
    constant = torch.full((130,), 2.5, device="cuda")
    assert torch.equal(codec.decode(codec.encode(constant), 130), constant)
