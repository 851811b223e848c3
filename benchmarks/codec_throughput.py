"""Encode and decode throughput of the codecs in ``lightning_dopt.compress``, in GB/s of fp32 input.

Usage::

    python benchmarks/codec_throughput.py [--sizes 1000000 16000000] [--repeats 7] [--threads N] [--out docs/benchmarks.md]

For every codec (bf16, fp16, int8, int4 at block size 256) and size ``n``, a random fp32 tensor of ``n`` values is
encoded and decoded ``--repeats`` times after one warm-up; the table reports ``4n`` bytes divided by the median
time of encode, of decode, and of encode + decode (one repeat's pair). It runs on the CPU, and on CUDA as well when
``torch.cuda.is_available()`` (with ``torch.cuda.synchronize()`` around every timed call). A ``clone`` row (an fp32
copy of the input) gives the memory-bandwidth scale of the machine.

In a pairwise exchange each rank encodes its own message and decodes its partner's, so a codec saves time over
sending fp32 on a link of bandwidth ``L`` only when ``4n/T + r·4n/L < 4n/L`` (``T`` = encode + decode throughput,
``r`` = payload / fp32), i.e. on links slower than the break-even bandwidth ``T·(1 − r)`` that the table lists
(ignoring any overlap of communication with compute).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_dopt.compress import CODECS, Codec, make_codec

from results_doc import write_section

SECTION_TITLE = "## Codec throughput (issue: quantized synchronization)"
BLOCK_SIZE = 256


@dataclass
class Row:
    device: str
    codec: str
    numel: int
    ratio: float  # payload bytes / fp32 bytes
    encode_s: float
    decode_s: float
    roundtrip_s: float

    def gbps(self, seconds: float) -> float:
        return 4 * self.numel / seconds / 1e9


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of ``fn()`` with the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def measure(codec: Codec | None, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median encode, decode and encode + decode seconds (``codec=None``: ``x.clone()`` as encode, no decode)."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    encode_times, decode_times, pair_times = [], [], []
    for attempt in range(repeats + 1):  # attempt 0 is the warm-up
        if codec is None:
            encode_s, _ = timed(x.clone, x.device)
            decode_s = 0.0
        else:
            encode_s, payload = timed(lambda: codec.encode(x, generator), x.device)
            decode_s, _ = timed(lambda: codec.decode(payload, x.numel()), x.device)
        if attempt:
            encode_times.append(encode_s)
            decode_times.append(decode_s)
            pair_times.append(encode_s + decode_s)
    return statistics.median(encode_times), statistics.median(decode_times), statistics.median(pair_times)


def run(sizes: list[int], repeats: int) -> list[Row]:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for numel in sizes:
            x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(device)
            for name in ("clone", *CODECS):
                codec = None if name == "clone" else make_codec(name, block_size=BLOCK_SIZE)
                ratio = 1.0 if codec is None else codec.payload_bytes(numel) / (4 * numel)
                encode_s, decode_s, pair_s = measure(codec, x, repeats)
                rows.append(Row(device.type, name, numel, ratio, encode_s, decode_s, pair_s))
                print(f"  {device.type} {name:5s} n={numel:>11,}: encode+decode {rows[-1].gbps(pair_s):7.3g} GB/s",
                      flush=True)
            del x
    return rows


def break_even_gbit(row: Row) -> float:
    """Link bandwidth (Gbit/s) below which sending this codec's payload beats sending fp32."""
    return row.gbps(row.roundtrip_s) * (1 - row.ratio) * 8


def markdown_table(rows: list[Row]) -> str:
    lines = ["| device | codec | elements | payload / fp32 | encode GB/s | decode GB/s | encode+decode GB/s "
             "| break-even link |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.codec == "clone":
            lines.append(f"| {row.device} | clone (fp32 copy, reference) | {row.numel:,} | 1 | "
                         f"{row.gbps(row.encode_s):.3g} | | | |")
            continue
        lines.append(f"| {row.device} | {row.codec} | {row.numel:,} | {row.ratio:.4f} | {row.gbps(row.encode_s):.3g} "
                     f"| {row.gbps(row.decode_s):.3g} | {row.gbps(row.roundtrip_s):.3g} "
                     f"| {break_even_gbit(row):.3g} Gbit/s |")
    return "\n".join(lines)


def interpretation(rows: list[Row]) -> str:
    sentences = []
    for device in dict.fromkeys(row.device for row in rows):
        largest = max(row.numel for row in rows if row.device == device)
        at_size = {row.codec: row for row in rows if row.device == device and row.numel == largest}
        codecs = [at_size[name] for name in CODECS]
        slowest = min(codecs, key=lambda row: row.gbps(row.roundtrip_s))
        fastest = max(codecs, key=lambda row: row.gbps(row.roundtrip_s))
        sentences.append(
            f"On {device} at {largest:,} values, encode + decode runs at {slowest.gbps(slowest.roundtrip_s):.3g} "
            f"({slowest.codec}) to {fastest.gbps(fastest.roundtrip_s):.3g} GB/s ({fastest.codec}), against "
            f"{at_size['clone'].gbps(at_size['clone'].encode_s):.3g} GB/s for a plain fp32 copy; so int8 shortens a "
            f"round only on links slower than about {break_even_gbit(at_size['int8']):.3g} Gbit/s and int4 below "
            f"{break_even_gbit(at_size['int4']):.3g} Gbit/s, unless the exchange overlaps with compute.")
    sentences.append("Block-codec encode makes several passes over the data (per-block min/max, scaling, one random "
                     "draw per value for stochastic rounding, packing), so it is several times slower than its decode "
                     "(one multiply-add per value).")
    if not torch.cuda.is_available():
        sentences.append("No GPU was available for this run; on a machine with one, CUDA rows are added.")
    return " ".join(sentences)


def machine_facts() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = [f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"torch {torch.__version__}",
             f"{os.cpu_count()} CPU cores ({cpu}), torch CPU threads: {torch.get_num_threads()}"]
    if hasattr(os, "getloadavg"):
        facts.append(f"load average at start {os.getloadavg()[0]:.1f} (shared machine: CPU numbers are noisy)")
    if torch.cuda.is_available():
        facts.append(f"GPU: {torch.cuda.get_device_name()}")
    return "; ".join(facts) + "."


def doc_section(rows: list[Row], command: str, facts: str, repeats: int) -> str:
    method = (f"Random fp32 input, block size {BLOCK_SIZE} for int8/int4; GB/s = 4·n bytes of fp32 input / median "
              f"time of {repeats} repeats after one warm-up. Break-even link: `encode+decode GB/s × (1 − payload/fp32)`, "
              f"the link bandwidth below which compressing saves time in a pairwise exchange (no overlap).")
    body = "\n\n".join([SECTION_TITLE, f"Command:\n\n```\n{command}\n```", facts, method, markdown_table(rows),
                        interpretation(rows)])
    return body + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000], help="elements per tensor")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out", help="markdown file whose own section to (re)write, e.g. docs/benchmarks.md")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.sizes) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --sizes and --threads must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    facts = machine_facts()
    print(facts)
    rows = run(args.sizes, args.repeats)
    table = markdown_table(rows)
    print("\n" + table + "\n\n" + interpretation(rows))
    if args.out:
        write_section(Path(args.out), SECTION_TITLE, doc_section(rows, command, facts, args.repeats))
        print(f"wrote section '{SECTION_TITLE[3:]}' of {args.out}")


if __name__ == "__main__":
    main()
