"""Property-based robustness tests for lightning_dopt.compress (issue 9, "Reliability").

Valid input: whatever the length (1 to a few blocks, not a multiple of the block size), layout (non-contiguous,
expanded) and magnitude (subnormal to 1e30, constant blocks), decode(encode(x)) has x's length, is fp32 on x's device,
is finite, and stays within one quantization step of x per block (int8/int4) or half an ulp (bf16/fp16).
Invalid input (NaN/Inf, wrong dtype or shape, empty, meta device, bad numel/payload/parameters) raises ValueError or
TypeError naming the problem, never an IndexError from inside or a silent wrong result.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_dopt.compress import CODECS, BlockQuantCodec, CastCodec, Codec, error_feedback_encode, make_codec

FP32_MAX = torch.finfo(torch.float32).max
TINY = 2.0 ** -149  # smallest fp32 subnormal
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

block_codecs = st.builds(BlockQuantCodec, bits=st.sampled_from([4, 8]), block_size=st.sampled_from([2, 4, 16, 64, 256]))
cast_codecs = st.sampled_from([CastCodec(torch.bfloat16), CastCodec(torch.float16)])
any_codec = st.one_of(block_codecs, cast_codecs)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def fp32_vectors(draw, max_abs: float = 2.0 ** 100, max_len: int = 600) -> torch.Tensor:
    """1-D fp32 tensors (|x| <= max_abs, about 1e30 by default) mixing scales, constant runs and subnormals, in one
    of several memory layouts."""
    n = draw(st.integers(1, max_len))
    kind = draw(st.sampled_from(["mixed", "constant", "runs", "tiny", "sparse"]))
    finite = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=32)
    if kind == "constant":
        values = [draw(finite)] * n
    elif kind == "tiny":  # subnormal and near-subnormal values: step may underflow to 0
        values = draw(st.lists(st.floats(-(2.0 ** -123), 2.0 ** -123, width=32), min_size=n, max_size=n))
    else:
        values = draw(st.lists(finite, min_size=1, max_size=min(n, 32)))
        values = (values * (n // len(values) + 1))[:n]
        if kind == "runs":  # long constant stretches: many zero-range blocks
            values = sorted(values)
        elif kind == "sparse":
            values = [v if i % 7 == 0 else 0.0 for i, v in enumerate(values)]
    x = torch.tensor(values, dtype=torch.float32)
    layout = draw(st.sampled_from(["contiguous", "strided", "flipped", "expanded", "offset"]))
    if layout == "strided":
        x = torch.stack([x, torch.full_like(x, 7.0)], dim=1)[:, 0]  # stride 2
    elif layout == "flipped":
        x = x.flip(0).clone().flip(0)
    elif layout == "expanded" and n > 1:
        x = x[:1].expand(n)  # stride 0
    elif layout == "offset":
        x = torch.cat([torch.zeros(3), x])[3:]  # non-zero storage offset
    return x


def block_bound(x: torch.Tensor, codec: BlockQuantCodec) -> torch.Tensor:
    """Per-element bound: the block's step (in fp64) plus fp32 rounding slack."""
    n, b = x.numel(), codec.block_size
    blocks = -(-n // b)
    padded = torch.cat([x.double(), x[-1:].double().expand(blocks * b - n)]).view(blocks, b)
    lo, hi = padded.amin(1), padded.amax(1)
    step = (hi - lo) / codec.levels
    slack = torch.maximum(lo.abs(), hi.abs()) * 2.0 ** -20 + codec.levels * TINY
    return (step * (1 + 2.0 ** -20) + slack).repeat_interleave(b)[:n]


# ------------------------------------------------------------------------------------------------------------------
# valid input


@FAST
@given(codec=block_codecs, x=fp32_vectors(), seed=st.integers(0, 2**32 - 1))
def test_block_round_trip_shape_dtype_and_error_bound(codec: BlockQuantCodec, x: torch.Tensor, seed: int) -> None:
    before = x.clone()
    payload = codec.encode(x, gen(seed))
    assert torch.equal(x, before), "encode must not modify its input"
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.payload_bytes(x.numel())
    decoded = codec.decode(payload, x.numel())
    assert decoded.shape == x.shape and decoded.dtype == torch.float32 and decoded.device == x.device
    assert torch.isfinite(decoded).all()
    error = (decoded.double() - x.double()).abs()
    bound = block_bound(x, codec)
    assert (error <= bound).all(), f"max excess {(error - bound).max().item()}"
    # a block whose values are all equal decodes exactly
    b = codec.block_size
    for start in range(0, x.numel(), b):
        block = x[start:start + b]
        if (block == block[0]).all():
            assert torch.equal(decoded[start:start + b], block)
    # same generator state, same payload
    assert torch.equal(codec.encode(x, gen(seed)), payload)


@FAST
@given(codec=cast_codecs, x=fp32_vectors(max_abs=60000.0), data=st.data())
def test_cast_round_trip_is_round_to_nearest(codec: CastCodec, x: torch.Tensor, data) -> None:
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(x.numel()) == 2 * x.numel()
    decoded = codec.decode(payload, x.numel())
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, x.to(codec.dtype).float(), rtol=0, atol=0)
    rel, absolute = (2.0 ** -8, 2.0 ** -134) if codec.dtype == torch.bfloat16 else (2.0 ** -11, 2.0 ** -25)
    error = (decoded.double() - x.double()).abs()
    assert (error <= rel * x.double().abs() + absolute).all()


@pytest.mark.parametrize("name", CODECS)
def test_one_strided_element_round_trips(name: str) -> None:
    """Regression: a 1-element view with stride 2 counts as contiguous, ``x.to(bf16)`` kept its stride and the byte
    view failed with a RuntimeError from inside torch."""
    x = torch.tensor([[1.5, 7.0]])[:, 0]
    assert x.stride() == (2,) and x.is_contiguous()
    codec = make_codec(name)
    torch.testing.assert_close(codec.decode(codec.encode(x, gen(0)), 1), torch.tensor([1.5]), rtol=0, atol=0)


@settings(max_examples=100, deadline=None)
@given(codec=block_codecs,
       values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=40),
       seed=st.integers(0, 1000))
def test_block_decode_is_finite_for_every_finite_input_it_accepts(codec: BlockQuantCodec, values: list[float],
                                                                  seed: int) -> None:
    """Any finite fp32 values, up to ±FLT_MAX: encode either refuses with a message about the range, or the decoded
    values are finite (before the fix, a block reaching FLT_MAX could decode its maximum to +Inf)."""
    x = torch.tensor(values, dtype=torch.float32)
    try:
        payload = codec.encode(x, gen(seed))
    except ValueError as error:
        assert "overflows fp32" in str(error) and "fp32 limit" in str(error)
        return
    decoded = codec.decode(payload, x.numel())
    assert torch.isfinite(decoded).all()
    assert ((decoded.double() - x.double()).abs() <= block_bound(x, codec)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_block_at_the_fp32_limit_is_refused_not_decoded_to_inf(bits: int) -> None:
    """Regression: [1.5e38, FLT_MAX] used to encode fine and decode its maximum to +Inf for some draws."""
    codec = BlockQuantCodec(bits, 2)
    x = torch.tensor([1.5391467e38, FP32_MAX])
    with pytest.raises(ValueError, match="fp32 limit"):
        codec.encode(x, gen(0))
    # just below the limit is accepted and decodes finitely, for every draw
    below = torch.tensor([1.5391467e38, FP32_MAX * (1 - 2.0 ** -19)])
    for seed in range(200):
        assert torch.isfinite(codec.decode(codec.encode(below, gen(seed)), 2)).all()
    # a constant block at ±FLT_MAX has step 0 and decodes exactly
    for value in (FP32_MAX, -FP32_MAX):
        constant = torch.full((4,), value)
        assert torch.equal(codec.decode(codec.encode(constant, gen(0)), 4), constant)


def test_huge_tensor_round_trip() -> None:
    """2**24 + 3 values (64 MiB of fp32), once: size formula, finiteness and the global error bound (every block's step
    is at most the global range / 255)."""
    n = 2**24 + 3  # not a multiple of the block size
    x = torch.randn(n, generator=gen(1)) * 1e3
    codec = make_codec("int8")
    payload = codec.encode(x, gen(2))
    assert payload.numel() == codec.payload_bytes(n)
    decoded = codec.decode(payload, n)
    assert decoded.shape == (n,) and torch.isfinite(decoded).all()
    assert (decoded - x).abs().max().item() <= (x.max() - x.min()).item() / 255 * (1 + 1e-5)


@FAST
@given(codec=any_codec, seed=st.integers(0, 1000), data=st.data())
def test_decode_of_arbitrary_bytes_of_the_right_size_never_crashes(codec: Codec, seed: int, data) -> None:
    n = data.draw(st.integers(1, 300))
    payload = torch.randint(0, 256, (codec.payload_bytes(n),), generator=gen(seed), dtype=torch.uint8)
    decoded = codec.decode(payload, n)
    assert decoded.shape == (n,) and decoded.dtype == torch.float32


@FAST
@given(codec=any_codec, x=fp32_vectors(max_abs=10000.0, max_len=300), seed=st.integers(0, 1000))
def test_error_feedback_invariant_and_purity(codec: Codec, x: torch.Tensor, seed: int) -> None:
    residual = torch.randn(x.numel(), generator=gen(seed)) * 1e-2
    x_before, residual_before = x.clone(), residual.clone()
    payload, new_residual = error_feedback_encode(codec, x, residual, gen(seed))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    target = x + residual
    torch.testing.assert_close(new_residual, target - codec.decode(payload, x.numel()), rtol=0, atol=0)
    assert new_residual.shape == x.shape and torch.isfinite(new_residual).all()


# ------------------------------------------------------------------------------------------------------------------
# invalid input


@FAST
@given(codec=any_codec, n=st.integers(1, 600), data=st.data(),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_input_is_refused_naming_the_first_index(codec: Codec, n: int, data, bad: float) -> None:
    x = torch.randn(n, generator=gen(n))
    index = data.draw(st.integers(0, n - 1))
    x[index] = bad
    later = data.draw(st.integers(index, n - 1))
    x[later] = bad
    with pytest.raises(ValueError, match=rf"NaN or Inf: .* first at flat index {index};"):
        codec.encode(x, None)
    with pytest.raises(ValueError, match="NaN or Inf"):  # NaN/Inf in the residual is caught too
        residual = torch.zeros(n)
        residual[index] = bad
        error_feedback_encode(codec, torch.randn(n, generator=gen(0)), residual)


BAD_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8,
              torch.bool, torch.complex64]


@FAST
@given(codec=any_codec, dtype=st.sampled_from(BAD_DTYPES), n=st.integers(1, 40))
def test_non_fp32_dtypes_are_refused_naming_the_dtype(codec: Codec, dtype: torch.dtype, n: int) -> None:
    x = torch.ones(n).to(dtype)
    with pytest.raises(TypeError, match=rf"expects a float32 tensor, got {dtype}"):
        codec.encode(x)


@FAST
@given(codec=any_codec, shape=st.sampled_from([(), (0,), (2, 3), (1, 1), (3, 1, 2), (0, 4)]))
def test_bad_shapes_are_refused_naming_the_shape(codec: Codec, shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    expected = "empty tensor" if shape == (0,) else re.escape(f"flat 1-D tensor, got shape {shape}")
    with pytest.raises(ValueError, match=expected):
        codec.encode(x)


@pytest.mark.parametrize("codec", [make_codec(name) for name in CODECS], ids=CODECS)
def test_non_tensor_meta_and_bad_generator_inputs(codec: Codec) -> None:
    for bad in ([1.0, 2.0], 3.0, None):
        with pytest.raises(TypeError, match="expects a torch.Tensor"):
            codec.encode(bad)
    with pytest.raises(ValueError, match="meta device"):
        codec.encode(torch.ones(5, device="meta"))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        codec.encode(torch.ones(5), generator=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a second real device (CUDA)")
def test_generator_on_another_device_is_refused() -> None:
    codec = make_codec("int8")
    with pytest.raises(ValueError, match="generator is on"):
        codec.encode(torch.ones(5, device="cuda"), torch.Generator())


@FAST
@given(codec=any_codec, n=st.integers(1, 500), data=st.data())
def test_bad_payloads_and_numel(codec: Codec, n: int, data) -> None:
    size = codec.payload_bytes(n)
    good = torch.zeros(size, dtype=torch.uint8)
    assert codec.decode(good, n).shape == (n,)
    wrong = data.draw(st.integers(0, size + 300).filter(lambda k: k != size))
    with pytest.raises(ValueError, match=rf"payload has {wrong} bytes; expected {size} for numel={n}"):
        codec.decode(torch.zeros(wrong, dtype=torch.uint8), n)
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        codec.decode(torch.zeros(size, dtype=torch.int8), n)
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        codec.decode(good.view(1, size), n)
    with pytest.raises(TypeError, match="payload"):
        codec.decode(bytes(size), n)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        codec.decode(good, -data.draw(st.integers(1, 10**9)))
    with pytest.raises(ValueError, match="numel=0"):
        codec.decode(good, 0)
    for bad in (float(n), True, "3", None):
        with pytest.raises(TypeError, match="numel must be an int"):
            codec.payload_bytes(bad)
        with pytest.raises(TypeError, match="numel must be an int"):
            codec.decode(good, bad)


@settings(max_examples=60, deadline=None)
@given(bits=st.one_of(st.integers(-3, 20).filter(lambda b: b not in (4, 8)), st.sampled_from([8.0, 4.0, True, "8"])))
def test_bad_bits_are_refused(bits) -> None:
    with pytest.raises(ValueError, match=r"supports bits=4 or bits=8, got"):
        BlockQuantCodec(bits, 16)


@settings(max_examples=60, deadline=None)
@given(block_size=st.one_of(st.integers(-1000, 0), st.integers(0, 10**6).map(lambda k: 2 * k + 1),
                            st.sampled_from([2.0, 256.0, True, False, "256", None])))
def test_bad_block_sizes_are_refused(block_size) -> None:
    message = "block_size must be a positive multiple of 2"
    with pytest.raises(ValueError, match=message):
        BlockQuantCodec(8, block_size)
    with pytest.raises(ValueError, match=message):
        make_codec("int8", block_size)


@settings(max_examples=60, deadline=None)
@given(spec=st.one_of(st.text(max_size=8), st.integers(),
                     st.sampled_from(["INT8", " bf16", "int2", "fp32", 8, b"int8"])))
def test_unknown_codec_names_list_the_valid_choices(spec) -> None:
    assume(spec not in CODECS)
    with pytest.raises(ValueError, match=r"unknown compression .*valid choices: None, bf16, fp16, int8, int4"):
        make_codec(spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, [1], "bf16", None])
def test_cast_codec_refuses_other_dtypes(dtype) -> None:
    with pytest.raises(ValueError, match="CastCodec supports torch.bfloat16 and torch.float16"):
        CastCodec(dtype)


def test_out_of_range_messages_point_to_another_codec() -> None:
    with pytest.raises(ValueError, match=r"beyond the bf16 range .* use int8 instead"):
        make_codec("bf16").encode(torch.tensor([FP32_MAX]))
    with pytest.raises(ValueError, match=r"beyond the fp16 range .* use bf16 or int8 instead"):
        make_codec("fp16").encode(torch.tensor([1e5]))
    with pytest.raises(ValueError, match="overflows fp32"):
        make_codec("int8").encode(torch.tensor([-3e38, 3e38]))


def test_error_feedback_refuses_bad_arguments() -> None:
    x = torch.ones(4)
    with pytest.raises(TypeError, match="expects a Codec, got NoneType"):
        error_feedback_encode(None, x, torch.zeros(4))
    with pytest.raises(TypeError, match="expects torch.Tensor x and residual"):
        error_feedback_encode(make_codec("bf16"), x, [0.0] * 4)
    codec = make_codec("int8")
    for residual, what in ((torch.zeros(5), r"\(5,\)"), (torch.zeros(4, dtype=torch.float64), "float64"),
                           (torch.zeros(4, device="meta"), "meta")):
        with pytest.raises(ValueError, match=rf"residual must match x .*{what}"):
            error_feedback_encode(codec, x, residual)
