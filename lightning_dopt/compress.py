"""Codecs for what crosses the wire at a synchronization round, and error feedback. Pure tensor functions.

A codec turns a flat fp32 tensor of ``n`` values into ONE flat ``torch.uint8`` payload and back; the receiver knows
``n``. Everything runs on the input's device (no ``.item()``, no host copies, no Python loop over elements or blocks,
only over chunks of many blocks), so a CUDA encode/decode launches kernels and synchronizes at most once: the
finiteness check. ``BlockQuantCodec(fused=True)`` runs int8/int4 as fused Triton kernels on CUDA instead of torch ops
(:mod:`lightning_dopt.quant_kernels`, same payload format; experimental).

What each codec sends, for ``n`` fp32 values (``4n`` bytes uncompressed):

* ``bf16`` / ``fp16`` (:class:`CastCodec`): ``x.to(dtype)`` viewed as bytes, ``2n`` bytes (0.5 of fp32). Rounding is
  to nearest, so the error is at most half an ulp of the value: ``|decode(x) − x| ≤ 2^-8·|x|`` for bf16 (8 significant
  bits; ``≤ 2^-134`` absolute for fp32 subnormals, where bf16 has fewer bits) and ``≤ 2^-11·|x|`` for fp16 (11
  significant bits; fp16 also flushes magnitudes below ``2^-14`` to subnormals with absolute error ``≤ 2^-25`` and
  cannot represent ``|x| > 65504``, which encode refuses). It is deterministic, hence biased (``unbiased = False``):
  the caller applies error feedback (:func:`error_feedback_encode`).
* ``int8`` / ``int4`` (:class:`BlockQuantCodec`): blockwise asymmetric quantization with stochastic rounding. The
  input is cut into ``B = ceil(n / block_size)`` blocks (the last one padded with its own last value, so padding never
  widens a block's range). Per block, with ``levels = 2^bits − 1``::

      lo = min(block),   step = (max(block) − lo) / levels                     # fp32
      q  = clamp(floor((x − lo) / step + u), 0, levels)                         # q = 0 where step == 0
      u  = (r + 0.5) / 2^16,   r uniform on {0, …, 2^16 − 1}  (16 random bits per value)
      decode = lo + q · step

  Payload layout: the codes (one byte each for int8; two per byte for int4, the first in the low nibble), then the
  ``B`` values of ``lo`` as fp32 bytes, then the ``B`` values of ``step`` as fp32 bytes::

      payload_bytes(n) = B · block_size · bits / 8 + 8 · B

  At ``block_size = 256``: int8 sends 264 bytes per 256 values (0.2578 of fp32), int4 136 (0.1328).
  Error bound, per element: ``|decode(x) − x| < step`` of the element's own block (in exact arithmetic; fp32 rounding
  adds a few ulps of ``max(|lo|, |max|)``); a constant block (``step = 0``) decodes exactly; a block whose range is so
  small (below ``levels · 2^-149``) that ``step`` underflows to 0 decodes to ``lo``, with an error below that range.
  Encode refuses NaN/Inf, and a block whose range overflows fp32 or whose maximum comes within ``2^-20`` (relative) of
  the largest fp32, where decode's rounding could produce Inf. Unbiased up to the noise's resolution: with
  ``t = (x − lo) / step``, ``q = floor(t) + 1`` with probability ``frac(t)`` rounded to a multiple of ``2^-16``, so
  ``|E[decode(x)] − x| ≤ step · 2^-17`` (exact arithmetic; for int8 that is ``2^-25`` of the block's range, below fp32's
  own rounding of ``x``), with per-element variance ``≤ step² / 4``.

  Cost (torch ops): encode reads ``x`` once from memory and makes about ten passes over a cache-sized chunk (min, max,
  shift, scale, noise, add, clamp, two conversions); the random bits (one 64-bit draw per four values) are about a
  third of its time on a CPU. Decode is three passes (convert, multiply, add) and can write into a caller's buffer
  (``out``). The fused CUDA kernels (``fused=True``) read ``x`` once and write the payload once (their noise has
  24-bit resolution).

Why the caller encodes differences from an anchor: the strategy sends ``Q(x_i − a)`` where ``a`` is an anchor every
rank holds identically, and receivers add ``a`` back. The quantization error is proportional to each block's *range*
of the differences ``x_i − a``: the replicas' spread plus their common drift since the anchor was last refreshed. It
does not vanish at consensus (identical replicas that moved away from the anchor still carry an error proportional to
that move); it vanishes when the anchor is refreshed, which is why the strategy refreshes it when the error grows
large against the replicas' distance (``anchor_tolerance``). Quantizing raw weights instead would leave an error
proportional to the weights' own range (∝ ``‖x‖``) however close the replicas are (see ``research/algorithms.md``
§1.5 and §4.7). Error feedback (§4.8) makes a biased codec's
errors cancel over rounds: what was not sent this round is added to the next round's input.
"""

from __future__ import annotations

import functools
import importlib
import operator
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import Tensor

CODECS: tuple[str, ...] = ("bf16", "fp16", "int8", "int4")
"""Codec names accepted by :func:`make_codec` (besides ``None`` and a :class:`Codec` instance)."""

_CAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

_DECODE_LIMIT = torch.finfo(torch.float32).max * (1 - 2**-20)
"""int8/int4 encode refuses a block whose decoded maximum ``lo + levels·step`` reaches this (16 fp32 ulps below the
largest float): decode's rounding could otherwise turn a finite input into Inf."""


def _extremes(x: Tensor) -> Tensor:
    """``[min(x), max(x)]``: both finite iff every element is (NaN propagates through min/max; ±Inf is an extreme).
    One fused reduction, several times cheaper on CPU than ``torch.isfinite(x).all()``."""
    return torch.stack(torch.aminmax(x))


def finite_flag(x: Tensor) -> Tensor:
    """A 0-dim bool tensor on ``x``'s device: whether every value of the floating-point or complex ``x`` is finite
    (one min/max reduction, no host sync, no tensor of ``x``'s size allocated)."""
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    return torch.isfinite(_extremes(x)).all()


def check_finite(x: Tensor, what: str) -> None:
    """Raise ``ValueError`` if the floating-point tensor ``x`` holds NaN or ±Inf (one device reduction, one host sync)."""
    if x.numel() and not bool(torch.isfinite(_extremes(x)).all()):
        bad = (~torch.isfinite(x)).flatten().nonzero().flatten()  # error path only: extra syncs are fine here
        raise ValueError(f"{what} contains NaN or Inf: {bad.numel()} of {x.numel()} elements, first at flat index "
                         f"{int(bad[0])}; non-finite values are never encoded (they would corrupt every replica)")


def _check_encode_input(x: Tensor, codec: str) -> None:
    """Type, dtype, shape and emptiness checks (no device sync)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{codec} encode expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{codec} encode expects a float32 tensor, got {x.dtype}; convert it first")
    if x.dim() != 1:
        raise ValueError(f"{codec} encode expects a flat 1-D tensor, got shape {tuple(x.shape)}; flatten it first")
    if x.numel() == 0:
        raise ValueError(f"{codec} encode got an empty tensor; there is nothing to send")
    if x.device.type == "meta":
        raise ValueError(f"{codec} encode got a tensor on the meta device, which holds no values to send")


def _check_numel(numel: int) -> int:
    if isinstance(numel, bool):
        raise TypeError(f"numel must be an int, got {numel!r}")
    try:
        numel = operator.index(numel)
    except TypeError:
        raise TypeError(f"numel must be an int, got {type(numel).__name__} {numel!r}") from None
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return numel


def _check_generator(generator: torch.Generator | None, codec: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{codec} encode: generator must be a torch.Generator or None, got {type(generator).__name__}")


def _bytes_as(payload: Tensor, dtype: torch.dtype) -> Tensor:
    """Reinterpret a flat uint8 tensor as ``dtype`` (copying only when its offset is misaligned for ``dtype``)."""
    if not payload.is_contiguous() or payload.storage_offset() % dtype.itemsize:
        payload = payload.clone()
    return payload.view(dtype)


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive multiple of 2 (int4 packs two codes per byte), "
                         f"got {block_size!r}")
    return block_size


class Codec(ABC):
    """Encodes a flat fp32 tensor into one flat uint8 payload; decodes it back given the element count."""

    name: str
    unbiased: bool
    """True if ``E[decode(encode(x))] == x`` (stochastic rounding); False: the caller uses error feedback."""
    sparse: bool = False
    """True if a payload drops most values (top-k), so what error feedback holds back is a large part of an update,
    not rounding: an anchored replica then keeps it (:class:`~lightning_dopt.compressed_rounds.AnchoredCompression`)."""

    @property
    def mean_codec(self) -> Codec:
        """The codec of the owners' means in a compressed exact-mean round (this codec unless a subclass says
        otherwise; same block size): :class:`~lightning_dopt.topk.TopKCodec` keeps more values of a mean, whose
        support is up to ``n`` ranks' kept positions."""
        return self

    @abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Exact size in bytes of :meth:`encode`'s output for ``numel`` input values."""

    @abstractmethod
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """1-D float32 ``x`` -> 1-D uint8 payload on ``x.device``. Raises ``ValueError`` on NaN/Inf."""

    @abstractmethod
    def decode(self, payload: Tensor, numel: int, out: Tensor | None = None) -> Tensor:
        """Payload of ``numel`` encoded values -> 1-D float32 tensor on ``payload.device`` (``out`` when given: a
        contiguous float32 tensor of ``numel`` values there, overwritten)."""

    def _check_payload(self, payload: Tensor, numel: int) -> int:
        if not isinstance(payload, Tensor):
            raise TypeError(f"{self.name} decode expects a torch.Tensor payload, got {type(payload).__name__}")
        numel = _check_numel(numel)
        if numel == 0:
            raise ValueError(f"{self.name} decode got numel=0; encode never produces an empty payload")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"{self.name} payload must be a 1-D torch.uint8 tensor, got {payload.dtype} with shape "
                             f"{tuple(payload.shape)}")
        expected = self.payload_bytes(numel)
        if payload.numel() != expected:
            raise ValueError(f"{self.name} payload has {payload.numel()} bytes; expected {expected} for "
                             f"numel={numel}")
        return numel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class CastCodec(Codec):
    """Sends ``x.to(dtype)`` (bf16 or fp16) as bytes: ``2n`` bytes, round-to-nearest, biased."""

    unbiased = False

    def __init__(self, dtype: torch.dtype) -> None:
        if not isinstance(dtype, torch.dtype) or dtype not in _CAST_NAMES:
            raise ValueError(f"CastCodec supports torch.bfloat16 and torch.float16, got {dtype}")
        self.dtype = dtype
        self.name = _CAST_NAMES[dtype]

    def payload_bytes(self, numel: int) -> int:
        return _check_numel(numel) * self.dtype.itemsize

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``generator`` is accepted for a uniform interface and ignored (the cast is deterministic)."""
        _check_encode_input(x, self.name)
        _check_generator(generator, self.name)
        # Rounding is monotonic: the cast is finite everywhere iff the cast of x's min and max is (this also catches
        # NaN/Inf in x). Queued before the cast, read on the host after it: the one sync of encode.
        finite = torch.isfinite(_extremes(x).to(self.dtype)).all()
        cast = x.to(self.dtype, memory_format=torch.contiguous_format)  # unit stride even for one strided element
        if not bool(finite):
            check_finite(x, f"{self.name} encode input")
            other = "int8" if self.dtype == torch.bfloat16 else "bf16 or int8"
            raise ValueError(f"{self.name} encode input has magnitudes up to {float(x.abs().max()):.4g}, beyond the "
                             f"{self.name} range (±{torch.finfo(self.dtype).max:.4g}); use {other} instead")
        return cast.view(torch.uint8)

    def decode(self, payload: Tensor, numel: int, out: Tensor | None = None) -> Tensor:
        numel = self._check_payload(payload, numel)
        return _check_out(out, numel, payload.device, self.name).copy_(_bytes_as(payload, self.dtype))


class BlockQuantCodec(Codec):
    """Blockwise asymmetric ``bits``-bit quantization with stochastic rounding (unbiased); see the module docstring.

    Encode and decode are torch ops over chunks of blocks: ``_CPU_CHUNK_VALUES`` values on the CPU (2 MB of fp32, so
    every pass after the first reads from cache) and ``_DEVICE_CHUNK_VALUES`` elsewhere (each pass one kernel).
    ``fused=True`` (experimental) runs them as one fused Triton kernel each on CUDA instead
    (:mod:`lightning_dopt.quant_kernels`: one read of the input, one write of the output); it needs Triton and CUDA
    tensors, and has so far been checked only in Triton's CPU interpreter, not on a GPU (``scripts/gpu_check.sh`` runs
    its tests and times it). Both paths write the same payload format, so either decodes the other's payloads.
    """

    unbiased = True

    def __init__(self, bits: int = 8, block_size: int = 256, fused: bool = False) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
            raise ValueError(f"BlockQuantCodec supports bits=4 or bits=8, got {bits!r}")
        if not isinstance(fused, bool):
            raise ValueError(f"BlockQuantCodec fused must be True or False, got {fused!r}")
        if fused and _fused_kernels() is None:
            raise ValueError("BlockQuantCodec(fused=True) needs Triton (pip install triton; it ships with CUDA builds "
                             "of torch); use fused=False for torch ops")
        self.bits = bits
        self.block_size = _check_block_size(block_size)
        self.levels = 2**bits - 1
        self.name = f"int{bits}"
        self.fused = fused

    def __repr__(self) -> str:
        fused = ", fused=True" if self.fused else ""
        return f"BlockQuantCodec(bits={self.bits}, block_size={self.block_size}{fused})"

    def _kernels(self, device: torch.device) -> ModuleType | None:
        """The fused kernels' module if this codec uses them, else None."""
        if not self.fused:
            return None
        if device.type != "cuda":
            raise ValueError(f"{self.name} with fused=True runs on CUDA tensors only, got one on {device}; use "
                             f"fused=False (torch ops) elsewhere")
        return _fused_kernels()

    def _num_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _code_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.block_size * self.bits // 8

    def payload_bytes(self, numel: int) -> int:
        num_blocks = self._num_blocks(_check_numel(numel))
        return self._code_bytes(num_blocks) + 8 * num_blocks

    def _blocks_per_chunk(self, device: torch.device) -> int:
        values = _CPU_CHUNK_VALUES if device.type == "cpu" else _DEVICE_CHUNK_VALUES
        return max(1, values // self.block_size)

    def _block_rows(self, x: Tensor) -> list[Tensor]:
        """``x`` as ``(blocks, block_size)`` views: the full blocks, then the last partial block padded by repeating
        the last real value (so padding never widens its range)."""
        full = x.numel() // self.block_size
        rows = [x[:full * self.block_size].view(full, self.block_size)] if full else []
        tail = x[full * self.block_size:]
        if tail.numel():
            rows.append(torch.cat([tail, x[-1:].expand(self.block_size - tail.numel())]).view(1, self.block_size))
        return rows

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Codes, then per-block ``lo`` and ``step`` (fp32 bytes). ``generator`` must live on ``x.device``.

        Per chunk of blocks: min, max, ``(x − lo) / step``, one draw of 16 random bits per value (64-bit draws cut
        in four), add, clamp, convert: about ten passes over cache-resident data, one read of ``x`` from memory.
        """
        _check_encode_input(x, self.name)
        _check_generator(generator, self.name)
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"{self.name} encode: generator is on {generator.device} but the input is on "
                             f"{x.device}; pass a generator created on the input's device")
        num_blocks = self._num_blocks(x.numel())
        code_bytes = self._code_bytes(num_blocks)
        payload = torch.empty(code_bytes + 8 * num_blocks, dtype=torch.uint8, device=x.device)
        codes = payload[:code_bytes].view(num_blocks, self.block_size * self.bits // 8)
        stats = torch.empty(2, num_blocks, dtype=torch.float32, device=x.device)  # lo, step
        kernels = self._kernels(x.device)
        if kernels is not None:
            finite = kernels.encode(x.contiguous(), codes, stats, self.bits, self.block_size, _DECODE_LIMIT, generator)
        else:
            finite = torch.ones((), dtype=torch.bool, device=x.device)
            chunk = min(self._blocks_per_chunk(x.device), num_blocks)
            with _WORKSPACES.borrow(chunk, self.block_size, x.device) as work:
                for start, part in _in_chunks(self._block_rows(x), chunk):
                    stop = start + part.shape[0]
                    finite &= self._encode_blocks(part, codes[start:stop], stats[:, start:stop], work, generator)
        payload[code_bytes:].copy_(stats.view(-1).view(torch.uint8))
        if not bool(finite):  # the one host sync of encode
            check_finite(x, f"{self.name} encode input")
            raise ValueError(f"{self.name} encode input has a block whose range (max − min) overflows fp32 or whose "
                             f"maximum is within 2^-20 of the fp32 limit; values must stay below {_DECODE_LIMIT:.10g} "
                             f"and span less than {torch.finfo(torch.float32).max:.4g} within a block")
        return payload

    def _encode_blocks(self, blocks: Tensor, codes: Tensor, stats: Tensor, work: _Workspace,
                       generator: torch.Generator | None) -> Tensor:
        """Quantize ``(k, block_size)`` blocks into ``codes`` rows and ``stats`` columns; True iff they decode finite.

        ``q = floor(t + u)`` with ``t = (x − lo) / step`` and ``u = (r + 0.5) / 2^16`` for a uniform 16-bit ``r``:
        ``q = floor(t) + 1`` with probability ``frac(t)`` rounded to a multiple of ``2^-16``.
        """
        k = blocks.shape[0]
        lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        step = (hi - lo) / self.levels
        stats[0].copy_(lo.view(-1))
        stats[1].copy_(step.view(-1))
        # The largest value decode can produce in a block is lo + levels·step. NaN/Inf anywhere in a block makes it NaN
        # or Inf, and so does a range beyond fp32 (max − min overflowing); a top within a few ulps of the fp32 limit
        # could round to Inf in decode.
        finite = ((step == 0) | (lo + step * self.levels < _DECODE_LIMIT)).all()

        t, noise, random_words, as_int = work.views(k)
        torch.sub(blocks, lo, out=t)
        t.div_(torch.where(step > 0, step, 1.0))  # a constant block has t = 0 / 1 = 0, so its codes are 0
        random_words.random_(-2**63, None, generator=generator)  # every bit uniform
        noise.copy_(random_words.view(torch.int16)[:t.numel()].view_as(t))  # r − 2^15, in [−2^15, 2^15)
        t.add_(noise, alpha=2.0**-16).add_(0.5 + 2.0**-17).clamp_(0, self.levels)  # t + u, below levels + 1
        as_int.copy_(t)  # truncation = floor, since t + u ≥ 0
        if self.bits == 4:  # two codes per byte, the first in the low nibble
            packed = noise.view(torch.int32)[:, :self.block_size // 2]
            as_int = torch.add(as_int[:, 0::2], as_int[:, 1::2], alpha=16, out=packed)
        codes.copy_(as_int)
        return finite

    @torch.no_grad()
    def decode(self, payload: Tensor, numel: int, out: Tensor | None = None) -> Tensor:
        """``lo + q · step`` per value, written into ``out`` (1-D fp32 of ``numel`` values on the payload's device)
        when given, so a caller decoding every round can reuse one buffer."""
        numel = self._check_payload(payload, numel)
        out = _check_out(out, numel, payload.device, self.name)
        num_blocks = self._num_blocks(numel)
        code_bytes = self._code_bytes(num_blocks)
        stats = _bytes_as(payload[code_bytes:], torch.float32)
        kernels = self._kernels(payload.device)
        if kernels is not None:
            kernels.decode(payload[:code_bytes], stats, out, self.bits, self.block_size)
            return out
        codes = payload[:code_bytes].view(num_blocks, -1)
        lo, step = stats.view(2, num_blocks, 1)
        full = numel // self.block_size
        targets = [out[:full * self.block_size].view(full, self.block_size)] if full else []
        if full < num_blocks:
            targets.append(torch.empty(1, self.block_size, dtype=torch.float32, device=payload.device))
        for start, values in _in_chunks(targets, self._blocks_per_chunk(payload.device)):
            stop = start + values.shape[0]
            if self.bits == 8:
                values.copy_(codes[start:stop])
            else:
                pairs = values.view(values.shape[0], -1, 2)
                pairs[:, :, 0].copy_(codes[start:stop] & 0x0F)
                pairs[:, :, 1].copy_(codes[start:stop] >> 4)
            values.mul_(step[start:stop]).add_(lo[start:stop])
        if full < num_blocks:
            out[full * self.block_size:].copy_(targets[-1].view(-1)[:numel - full * self.block_size])
        return out


def _in_chunks(row_sets: list[Tensor], chunk: int) -> Iterator[tuple[int, Tensor]]:
    """``(first block index, rows)`` for consecutive pieces of at most ``chunk`` rows of each ``(blocks, ·)`` tensor in
    ``row_sets``, block indices counted across the sets."""
    start = 0
    for rows in row_sets:
        for first in range(0, rows.shape[0], chunk):
            part = rows[first:first + chunk]
            yield start, part
            start += part.shape[0]


_CPU_CHUNK_VALUES = 1 << 19
"""Values per chunk on the CPU: 2 MB of fp32 per workspace buffer, so a chunk's passes stay in cache (smaller chunks
lose to per-operation overhead: at 2^16 values the int8 round trip is 1.4× slower on one thread)."""

_DEVICE_CHUNK_VALUES = 1 << 24
"""Values per chunk elsewhere (CUDA): each pass is one kernel over up to 64 MB."""


class _Workspace:
    """Scratch buffers of one encode call, sized for its largest chunk: ``t`` (fp32), the noise (fp32; then the packed
    int4 codes), the random words (int64, 16 bits per value) and the integer codes (int32)."""

    def __init__(self, blocks: int, block_size: int, device: torch.device) -> None:
        self.blocks, self.block_size = blocks, block_size
        self.t = torch.empty(blocks, block_size, dtype=torch.float32, device=device)
        self.noise = torch.empty_like(self.t)
        self.random_words = torch.empty(-(-blocks * block_size // 4), dtype=torch.int64, device=device)
        self.as_int = torch.empty(blocks, block_size, dtype=torch.int32, device=device)

    def views(self, blocks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four buffers cut to ``blocks`` blocks."""
        words = -(-blocks * self.block_size // 4)
        return self.t[:blocks], self.noise[:blocks], self.random_words[:words], self.as_int[:blocks]


class _WorkspacePool:
    """CPU workspaces reused between encode calls: a fresh multi-megabyte allocation costs page faults on every call,
    as much as the encoding itself for a tensor of a million values. Thread-safe; at most ``keep`` idle workspaces
    (each at most ``_CPU_CHUNK_VALUES`` values, 14 bytes per value) are kept. Other devices allocate per call (their
    caching allocators reuse the memory)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._idle: list[_Workspace] = []
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self, blocks: int, block_size: int, device: torch.device) -> Iterator[_Workspace]:
        if device.type != "cpu":
            yield _Workspace(blocks, block_size, device)
            return
        with self._lock:
            work = next((w for w in self._idle if w.block_size == block_size and w.blocks >= blocks), None)
            if work is not None:
                self._idle.remove(work)
        work = work or _Workspace(blocks, block_size, device)
        try:
            yield work
        finally:
            with self._lock:
                if len(self._idle) < self.keep:
                    self._idle.append(work)


_WORKSPACES = _WorkspacePool()


def fused_kernels_available() -> bool:
    """True where ``BlockQuantCodec(fused=True)`` can be built (Triton imports)."""
    return _fused_kernels() is not None


@functools.cache
def _fused_kernels() -> ModuleType | None:
    """:mod:`lightning_dopt.quant_kernels`, or None where Triton does not import (CPU-only installs)."""
    try:
        return importlib.import_module("lightning_dopt.quant_kernels")
    except ImportError:
        return None


def _check_out(out: Tensor | None, numel: int, device: torch.device, codec: str) -> Tensor:
    """``out``, or a new fp32 tensor of ``numel`` values on ``device``; a ``ValueError`` if ``out`` cannot hold them."""
    if out is None:
        return torch.empty(numel, dtype=torch.float32, device=device)
    if not isinstance(out, Tensor) or out.dtype != torch.float32 or out.shape != (numel,) or \
            out.device != device or not out.is_contiguous():
        described = (f"{out.dtype} {tuple(out.shape)} on {out.device}, contiguous={out.is_contiguous()}"
                     if isinstance(out, Tensor) else type(out).__name__)
        raise ValueError(f"{codec} decode: out must be a contiguous float32 tensor of shape ({numel},) on {device}, "
                         f"got {described}")
    return out


def make_codec(spec: str | Codec | None, block_size: int = 256) -> Codec | None:
    """``None`` -> ``None``; a :class:`Codec` -> itself; a name in :data:`CODECS` -> that codec (int8/int4 with
    ``block_size`` values per block)."""
    _check_block_size(block_size)
    if spec is None or isinstance(spec, Codec):
        return spec
    if spec == "bf16":
        return CastCodec(torch.bfloat16)
    if spec == "fp16":
        return CastCodec(torch.float16)
    if spec == "int8":
        return BlockQuantCodec(8, block_size)
    if spec == "int4":
        return BlockQuantCodec(4, block_size)
    raise ValueError(f"unknown compression {spec!r}; valid choices: None, {', '.join(CODECS)}, or a Codec instance")


def error_feedback_encode(codec: Codec, x: Tensor, residual: Tensor,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Encode ``x + residual``; return ``(payload, new_residual)`` with ``new_residual = x + residual − decode``.

    Summed over rounds, what is decoded equals what was meant to be sent minus the last residual, so a biased codec's
    rounding errors do not accumulate (EF, ``research/algorithms.md`` §4.8). Pure: neither input is modified.
    """
    if not isinstance(codec, Codec):
        raise TypeError(f"error_feedback_encode expects a Codec, got {type(codec).__name__}; see make_codec")
    if not isinstance(residual, Tensor) or not isinstance(x, Tensor):
        raise TypeError("error_feedback_encode expects torch.Tensor x and residual")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match x in shape, dtype and device: x is {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}, residual is {tuple(residual.shape)} {residual.dtype} on {residual.device}")
    new_residual = residual.clone()
    return error_feedback_encode_(codec, x, new_residual, generator)[0], new_residual


def error_feedback_encode_(codec: Codec, x: Tensor, residual: Tensor, generator: torch.Generator | None = None,
                           out: Tensor | None = None, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`error_feedback_encode` with ``residual`` updated in place (no checks): ``(payload, decoded)``, the
    decoded values in ``out`` when given. One decode serves the residual and the caller. ``x + residual`` is formed
    in ``scratch`` when given (shaped like ``x``, not ``out``), else in a new tensor; ``residual`` is only written
    after the encode succeeded, so an input the codec refuses leaves it as it was."""
    target = x + residual if scratch is None else torch.add(x, residual, out=scratch)
    payload = codec.encode(target, generator)
    decoded = codec.decode(payload, target.numel(), out=out)
    torch.sub(target, decoded, out=residual)
    return payload, decoded
