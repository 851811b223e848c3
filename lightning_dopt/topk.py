"""A sparse codec: chunked top-k with low-bit values and bit-packed positions, for rounds with error feedback.

The input (``n`` fp32 values) is cut into ``B = ceil(n / C)`` chunks of ``C = block_size`` values (the last one padded
with zeros). Per chunk, the ``k`` values of largest magnitude are kept; everything else is dropped. A kept value ``v``
is sent as a ``bits``-bit code on ``L = 2^bits`` levels spread evenly over ``[−m, m]``, ``m`` = the largest kept
magnitude of its chunk (no zero level: 2 bits give ``±m/3, ±m``; 1 bit gives the sign)::

    level(c) = (2c − (L − 1)) / (L − 1) · m,     c = round(((L − 1) · v / m + L − 1) / 2)     # round to nearest

so a kept value decodes within ``m / (L − 1)`` of itself. Payload, in this order: the ``B·k`` positions within their
chunks (``index_bits = ceil(log2 C)`` bits each), the ``B·k`` codes (``bits`` bits each), both packed least significant
bit first, then the ``B`` values of ``m`` as fp32::

    payload_bytes(n) = ceil(B·k·index_bits / 8) + ceil(B·k·bits / 8) + 4·B

At ``C = 4096, k = 64, bits = 2`` that is 116 bytes per 4,096 values, 0.0071 of fp32 (1.6 % of the values kept).

``mean_k``: the values kept per chunk of an owner's mean in a compressed exact-mean round
(:attr:`~lightning_dopt.compress.Codec.mean_codec`; default ``k``). The mean adds ``n`` ranks' differences, so it
has more large values than one; the mean's selection, not the ranks', is what delays the update there (on the
emulated cluster, sending the ranks' chunks exactly gained nothing, sending the means exactly gained 0.16 points,
docs/benchmarks.md). ``k = 128, mean_k = 384`` sends the bytes of ``k = mean_k = 256`` at ``n = 4`` (each rank
sends ``n − 1`` chunks of each kind).

Deterministic and biased (most of the vector is dropped): ``unbiased = False``, so a compressed round keeps an
error-feedback residual on every rank (checkpointed with the round state) and what is not sent in one round is added
to the next round's input (``research/algorithms.md`` §4.8; SparseLoCo, arXiv 2508.15706, sends chunked top-k
pseudo-gradients with 2-bit values this way). Encode refuses NaN/Inf (a non-finite value would be among the largest).
Cost: one top-k per chunk (on the magnitudes' bits as int32), a gather and the packing of ``B·k·(index_bits + bits)``
bits; decode scatters ``B·k`` values into zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from lightning_dopt.compress import Codec, _check_encode_input, _check_generator, _check_out, _check_numel, check_finite

LEVEL_BITS = (1, 2, 4, 8)
"""Bits per kept value that the sparse codecs (:class:`TopKCodec`, ``GroupMaxCodec``) accept."""
GROUP_VALUES = 1 << 19
"""Values per piece that encode selects from at a time (about 2 MB of fp32)."""


class BlockSparseCodec(Codec):
    """What the sparse codecs share: ``kept_per_block`` values of every block of ``block_size`` values are sent, each
    as a position of ``index_bits`` bits and a ``bits``-bit code on ``L = 2^bits`` levels over ``[−m, m]`` (``m``: the
    block's largest kept magnitude); the payload holds the packed positions, the packed codes, then every block's
    ``m`` as fp32 (module docstring). Subclasses choose the kept values (``encode``) and place them (``decode``)."""

    unbiased = False
    sparse = True
    block_size: int
    bits: int
    index_bits: int
    kept_per_block: int

    _mean_codec: BlockSparseCodec

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def mean_codec(self) -> BlockSparseCodec:
        """The codec of the owners' means: this one with more values kept (``mean_k``, ``mean_group``), or itself;
        built once by the subclass."""
        return self._mean_codec

    def _layout(self, numel: int) -> tuple[int, int, int]:
        """Blocks, bytes of the packed positions, bytes of the packed codes."""
        blocks = -(-numel // self.block_size)
        kept = blocks * self.kept_per_block
        return blocks, -(-kept * self.index_bits // 8), -(-kept * self.bits // 8)

    def payload_bytes(self, numel: int) -> int:
        blocks, index_bytes, code_bytes = self._layout(_check_numel(numel))
        return index_bytes + code_bytes + 4 * blocks if blocks else 0

    def _pack(self, x: Tensor, positions: Tensor, kept: Tensor) -> Tensor:
        """The payload of the values ``kept`` (``blocks × kept_per_block``) at ``positions`` (as many) of input ``x``
        (read only to name a NaN/Inf, which is among the kept values when present)."""
        largest = kept.abs().amax(dim=1, keepdim=True)
        if not bool(torch.isfinite(largest).all()):  # the one host sync of encode
            check_finite(x, f"{self.name} encode input")
        span = self.levels - 1
        scaled = torch.where(largest > 0, kept / largest.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        codes = ((scaled * span + span) / 2).round_().clamp_(0, span).to(torch.uint8)
        return torch.cat([_pack_bits(positions.reshape(-1), self.index_bits), _pack_bits(codes.reshape(-1), self.bits),
                          largest.reshape(-1).view(torch.uint8)])

    def _unpack(self, payload: Tensor, numel: int) -> tuple[Tensor, Tensor]:
        """Positions (int64) and decoded values (fp32) of a checked payload, both ``blocks × kept_per_block``."""
        blocks, index_bytes, code_bytes = self._layout(numel)
        kept = blocks * self.kept_per_block
        positions = _unpack_bits(payload[:index_bytes], self.index_bits, kept).view(blocks, -1)
        codes = _unpack_bits(payload[index_bytes:index_bytes + code_bytes], self.bits, kept).view(blocks, -1)
        largest = payload[index_bytes + code_bytes:].clone().view(torch.float32).view(blocks, 1)
        span = self.levels - 1
        return positions, (2 * codes - span).to(torch.float32).div_(span).mul_(largest)


class TopKCodec(BlockSparseCodec):
    """The ``k`` largest magnitudes of every chunk of ``block_size`` values, with ``bits``-bit values (module docstring)."""

    def __init__(self, block_size: int = 4096, k: int = 64, bits: int = 2, mean_k: int | None = None) -> None:
        for name, value in (("block_size", block_size), ("k", k), ("bits", bits),
                            ("mean_k", k if mean_k is None else mean_k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TopKCodec {name} must be an int, got {value!r}")
        if block_size < 2:
            raise ValueError(f"TopKCodec block_size (values per chunk) must be >= 2, got {block_size}")
        for name, value in (("k", k), ("mean_k", mean_k)):
            if value is not None and not 1 <= value <= block_size:
                raise ValueError(f"TopKCodec {name} must be between 1 and block_size={block_size}, got {value}")
        if bits not in LEVEL_BITS:
            raise ValueError(f"TopKCodec bits must be one of {LEVEL_BITS}, got {bits}")
        self.block_size, self.k, self.bits = block_size, k, bits
        self.mean_k = k if mean_k is None else mean_k
        self.index_bits = max(1, math.ceil(math.log2(block_size)))
        self.kept_per_block = k
        self.name = "topk"
        self._mean_codec = self if self.mean_k == k else TopKCodec(block_size, self.mean_k, bits)

    def __repr__(self) -> str:
        mean = f", mean_k={self.mean_k}" if self.mean_k != self.k else ""
        return f"TopKCodec(block_size={self.block_size}, k={self.k}, bits={self.bits}{mean})"

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``generator`` is accepted for a uniform interface and ignored (the codec is deterministic)."""
        _check_encode_input(x, self.name)
        _check_generator(generator, self.name)
        chunks = self._layout(x.numel())[0]
        positions = torch.empty(chunks, self.k, dtype=torch.int64, device=x.device)
        kept = torch.empty(chunks, self.k, dtype=torch.float32, device=x.device)
        for start, rows in self._row_groups(x):
            stop = start + rows.shape[0]
            # magnitudes compared as the int32 of their bits (same order for non-negative floats, NaN above +inf):
            # the same selection as on floats, a third faster on CPU (no NaN test per comparison)
            magnitudes = rows.abs().view(torch.int32)
            torch.topk(magnitudes, self.k, dim=1, sorted=False,
                       out=(kept[start:stop].view(torch.int32), positions[start:stop]))
            torch.gather(rows, 1, positions[start:stop], out=kept[start:stop])
        return self._pack(x, positions, kept)

    def _row_groups(self, x: Tensor) -> Iterator[tuple[int, Tensor]]:
        """``x`` as ``(first chunk, chunks × block_size rows)`` pieces of about :data:`GROUP_VALUES` values: views of
        ``x`` for whole chunks, a zero-padded copy of the last chunk when ``x`` ends inside one. Cache-sized pieces
        keep the temporaries of ``topk`` out of fresh (page-faulting) memory."""
        block, whole = self.block_size, x.numel() // self.block_size
        step = max(1, GROUP_VALUES // block)
        for start in range(0, whole, step):
            yield start, x[start * block:min(start + step, whole) * block].view(-1, block)
        if tail := x.numel() - whole * block:
            padded = torch.zeros(1, block, dtype=x.dtype, device=x.device)
            padded[0, :tail] = x[whole * block:]
            yield whole, padded

    @torch.no_grad()
    def decode(self, payload: Tensor, numel: int, out: Tensor | None = None) -> Tensor:
        numel = self._check_payload(payload, numel)
        out = _check_out(out, numel, payload.device, self.name)
        positions, values = self._unpack(payload, numel)
        block, whole = self.block_size, numel // self.block_size
        out.zero_()
        if whole:
            out[:whole * block].view(whole, block).scatter_(1, positions[:whole], values[:whole])
        if whole < positions.shape[0]:  # the last chunk was padded: positions past the end held zeros and are dropped
            inside = positions[whole] < numel - whole * block
            out[whole * block:].scatter_(0, positions[whole][inside], values[whole][inside])
        return out


WORD_BITS = 56
"""Bit groups up to this many bits are packed as one int64 word each (below the sign bit, with room to spare)."""


def _byte_group(bits: int) -> tuple[int, int]:
    """Values per group and bytes per group when ``group · bits`` is a whole number of bytes: ``lcm(bits, 8)``."""
    group = 8 // math.gcd(bits, 8)
    return group, group * bits // 8


def _pack_bits(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers below ``2^bits`` -> ``ceil(len·bits / 8)`` bytes, least significant bit first.

    Widths dividing 8 are or-ed into their bytes in uint8 (:func:`_pack_bits_bytewise`). Other widths: consecutive
    values are packed ``lcm(bits, 8) / bits`` at a time into one int64 word (one int64 per value instead of one per
    bit), which is cut into its little-endian bytes. Either way the same byte stream as concatenating every value's
    bits (:func:`_pack_bits_stream`, used when a group exceeds :data:`WORD_BITS`: odd ``bits`` above 8)."""
    if 8 % bits == 0:
        return _pack_bits_bytewise(values, bits)
    group, group_bytes = _byte_group(bits)
    if group * bits > WORD_BITS:
        return _pack_bits_stream(values, bits)
    count = values.numel()
    words = values.to(torch.int64).reshape(-1)
    words = torch.cat([words, words.new_zeros(-count % group)]).view(-1, group)
    words = (words << (torch.arange(group, device=values.device) * bits)).sum(dim=1)  # disjoint bits: sum = or
    packed = (words.unsqueeze(1) >> (torch.arange(group_bytes, device=values.device) * 8)) & 0xFF
    return packed.to(torch.uint8).reshape(-1)[:-(-count * bits // 8)]


def _unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` integers of ``bits`` bits that :func:`_pack_bits` packed, as int64."""
    if 8 % bits == 0:
        return _unpack_bits_bytewise(packed, bits, count)
    group, group_bytes = _byte_group(bits)
    if group * bits > WORD_BITS:
        return _unpack_bits_stream(packed, bits, count)
    data = packed.to(torch.int64)
    data = torch.cat([data, data.new_zeros(-data.numel() % group_bytes)]).view(-1, group_bytes)
    words = (data << (torch.arange(group_bytes, device=packed.device) * 8)).sum(dim=1)
    values = (words.unsqueeze(1) >> (torch.arange(group, device=packed.device) * bits)) & ((1 << bits) - 1)
    return values.reshape(-1)[:count]


def _pack_bits_bytewise(values: Tensor, bits: int) -> Tensor:
    """:func:`_pack_bits` for ``bits`` dividing 8: the ``8 / bits`` values of each byte are or-ed into it, in uint8
    (the same bytes as the int64 words in a quarter (2 bits) to a seventh (4 bits) of their time on one CPU core;
    unpacking takes a third of theirs)."""
    per_byte = 8 // bits
    values = values.to(torch.uint8)
    if tail := -values.numel() % per_byte:
        values = torch.cat([values, values.new_zeros(tail)])
    values = values.view(-1, per_byte)
    packed = values[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= values[:, slot] << (slot * bits)
    return packed


def _unpack_bits_bytewise(packed: Tensor, bits: int, count: int) -> Tensor:
    """:func:`_unpack_bits` for ``bits`` dividing 8 (:func:`_pack_bits_bytewise`'s inverse)."""
    per_byte = 8 // bits
    values = torch.empty(packed.numel(), per_byte, dtype=torch.uint8, device=packed.device)
    for slot in range(per_byte):
        torch.bitwise_and(packed >> (slot * bits), (1 << bits) - 1, out=values[:, slot])
    return values.view(-1)[:count].to(torch.int64)


def _pack_bits_stream(values: Tensor, bits: int) -> Tensor:
    """:func:`_pack_bits` one bit at a time (any ``bits``)."""
    shifts = torch.arange(bits, device=values.device)
    stream = ((values.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=values.device)
    return (stream * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def _unpack_bits_stream(packed: Tensor, bits: int, count: int) -> Tensor:
    """:func:`_unpack_bits` one bit at a time (any ``bits``)."""
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    digits = stream[:count * bits].view(count, bits)
    return (digits << torch.arange(bits, device=packed.device)).sum(dim=1)
