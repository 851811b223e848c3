"""Fused CUDA kernels (Triton) for :class:`~lightning_dopt.compress.BlockQuantCodec`: one pass over memory each way.

The torch-ops path of the codec makes about ten passes over the values (min, max, shift, scale, noise, add, clamp,
conversions); on a GPU each is a kernel over the whole tensor, so int8 encode ran at 98 GB/s on an H100 where a clone
runs at 1,400 (``docs/compression.md``). Here one program handles one block of ``block_size`` values:

    encode:  lo = min(block), step = (max(block) − lo) / levels, t = clamp((x − lo) · (1/step), 0, levels)
             q = floor(t) + [u < t − floor(t)],   u = Philox(seed, index) uniform on [0, 1) with 24-bit resolution
    decode:  lo + q · step

reading ``x`` once and writing the codes and the block's ``lo``/``step`` once (encode), reading the codes once and
writing fp32 once (decode). The payload format is the codec's (codes, then every ``lo``, then every ``step``), so a
payload encoded by either path decodes with either. ``lo`` and ``step`` are the torch path's bit for bit; the codes are
not (other random numbers, and ``1/step`` instead of a division), but obey the same bounds: ``|decode − x| < step``,
and ``q`` rounds up with probability ``frac(t)`` rounded down to a multiple of ``2^-24``, so ``|E[decode] − x| ≤
step · 2^-24`` given ``t``.

Random numbers: one 64-bit seed per encode, drawn on the device from the caller's generator (so a seeded generator
gives the same payload, and no host sync), keys Philox; the counter is the value's index modulo ``2^32``.

A block is valid iff every value is finite and ``lo + levels · step`` stays below the codec's decode limit (or
``step == 0``); encode writes one flag per block and the caller reads their conjunction once (its one host sync).
This module imports Triton at import time; :mod:`lightning_dopt.compress` imports it only for ``fused=True``.

Status: checked against the torch-ops path in Triton's interpreter (``TRITON_INTERPRET=1`` on CPU tensors); not yet
compiled or timed on a GPU, hence opt-in. ``scripts/gpu_check.sh`` runs its CUDA tests and times it next to torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _quantize(x, lo, inv_step, seed, index, LEVELS: tl.constexpr):
    """Stochastically rounded code of each value of ``x`` (fp32 in ``[0, LEVELS]``)."""
    t = tl.minimum(tl.maximum((x - lo) * inv_step, 0.0), LEVELS)
    base = tl.floor(t)
    up = tl.rand(seed, index.to(tl.uint32)) < (t - base)
    return base + up.to(tl.float32)


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, stats_ptr, valid_ptr, seed_ptr, numel, num_blocks, block_size, limit,
                   LEVELS: tl.constexpr, PACKED: tl.constexpr, WIDTH: tl.constexpr):
    """One program per block. Unpacked (int8): lane ``j`` holds value ``j``; packed (int4): values ``2j`` and
    ``2j + 1``, stored as one byte (the first in the low nibble)."""
    block = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, WIDTH)
    seed = tl.load(seed_ptr)
    if PACKED:
        in_block = lane < block_size // 2
        first = block * block_size + 2 * lane
        second = first + 1
        ok_a = in_block & (first < numel)
        ok_b = in_block & (second < numel)
        a = tl.load(x_ptr + first, mask=ok_a, other=0.0)
        b = tl.load(x_ptr + second, mask=ok_b, other=0.0)
        lo = tl.minimum(tl.min(tl.where(ok_a, a, float("inf")), axis=0),
                        tl.min(tl.where(ok_b, b, float("inf")), axis=0))
        hi = tl.maximum(tl.max(tl.where(ok_a, a, -float("inf")), axis=0),
                        tl.max(tl.where(ok_b, b, -float("inf")), axis=0))
        # x · 0 is NaN iff x is NaN or ±Inf
        poison = tl.sum(tl.where(ok_a, a * 0.0, 0.0), axis=0) + tl.sum(tl.where(ok_b, b * 0.0, 0.0), axis=0)
    else:
        in_block = lane < block_size
        first = block * block_size + lane
        ok_a = in_block & (first < numel)
        a = tl.load(x_ptr + first, mask=ok_a, other=0.0)
        lo = tl.min(tl.where(ok_a, a, float("inf")), axis=0)
        hi = tl.max(tl.where(ok_a, a, -float("inf")), axis=0)
        poison = tl.sum(tl.where(ok_a, a * 0.0, 0.0), axis=0)
    step = (hi - lo) / LEVELS
    inv_step = tl.where(step > 0.0, 1.0 / step, 0.0)
    valid = (poison == 0.0) & ((step == 0.0) | (lo + step * LEVELS < limit))
    tl.store(stats_ptr + block, lo)
    tl.store(stats_ptr + num_blocks + block, step)
    tl.store(valid_ptr + block, valid.to(tl.int8))
    if PACKED:
        q_a = _quantize(a, lo, inv_step, seed, first, LEVELS).to(tl.int32)
        q_b = _quantize(b, lo, inv_step, seed, second, LEVELS).to(tl.int32)
        tl.store(codes_ptr + block * (block_size // 2) + lane, (q_a + 16 * q_b).to(tl.uint8), mask=in_block)
    else:
        q_a = _quantize(a, lo, inv_step, seed, first, LEVELS)
        tl.store(codes_ptr + first, q_a.to(tl.uint8), mask=in_block)


@triton.jit
def _decode_kernel(codes_ptr, stats_ptr, out_ptr, numel, num_blocks, block_size,
                   PACKED: tl.constexpr, WIDTH: tl.constexpr):
    """One program per block: ``lo + q · step`` for each of its values below ``numel``."""
    block = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, WIDTH)
    lo = tl.load(stats_ptr + block)
    step = tl.load(stats_ptr + num_blocks + block)
    if PACKED:
        in_block = lane < block_size // 2
        byte = tl.load(codes_ptr + block * (block_size // 2) + lane, mask=in_block, other=0).to(tl.int32)
        first = block * block_size + 2 * lane
        tl.store(out_ptr + first, lo + (byte & 15).to(tl.float32) * step, mask=in_block & (first < numel))
        tl.store(out_ptr + first + 1, lo + (byte >> 4).to(tl.float32) * step, mask=in_block & (first + 1 < numel))
    else:
        in_block = lane < block_size
        first = block * block_size + lane
        code = tl.load(codes_ptr + first, mask=in_block & (first < numel), other=0).to(tl.float32)
        tl.store(out_ptr + first, lo + code * step, mask=in_block & (first < numel))


def _width(bits: int, block_size: int) -> int:
    return triton.next_power_of_2(block_size // 2 if bits == 4 else block_size)


def encode(x: Tensor, codes: Tensor, stats: Tensor, bits: int, block_size: int, limit: float,
           generator: torch.Generator | None) -> Tensor:
    """Fill ``codes`` (uint8, the payload's code bytes) and ``stats`` (fp32 ``[lo…, step…]``, ``2 · num_blocks``) from
    the contiguous fp32 CUDA tensor ``x``; return a 0-d bool tensor, True iff every block is valid (no host sync)."""
    num_blocks = stats.numel() // 2
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device, generator=generator)
    valid = torch.empty(num_blocks, dtype=torch.int8, device=x.device)
    _encode_kernel[(num_blocks,)](x, codes, stats, valid, seed, x.numel(), num_blocks, block_size, limit,
                                  LEVELS=2**bits - 1, PACKED=bits == 4, WIDTH=_width(bits, block_size))
    return valid.bool().all()


def decode(codes: Tensor, stats: Tensor, out: Tensor, bits: int, block_size: int) -> None:
    """Write ``lo + q · step`` for the ``out.numel()`` values into the contiguous fp32 CUDA tensor ``out``."""
    num_blocks = stats.numel() // 2
    _decode_kernel[(num_blocks,)](codes, stats, out, out.numel(), num_blocks, block_size,
                                  PACKED=bits == 4, WIDTH=_width(bits, block_size))
