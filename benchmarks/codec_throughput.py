"""Encode and decode speed of the codecs in ``lightning_dopt.compress``, against an fp32 ``clone`` of the same tensor.

For every codec and size ``n``, ``torch.utils.benchmark.Timer`` (median of ``blocked_autorange``) times on a random
fp32 tensor ``x.clone()``, ``encode``, ``decode`` into a reused buffer (as rounds do) and into new memory. GB/s = ``4n``
bytes / median time; ``vs clone`` = clone time / (encode + decode) time. ``--baseline REV`` adds the codecs of
``lightning_dopt/compress.py`` at git revision ``REV``. CUDA rows are added when CUDA is available, with the int8/int4
codecs also timed as fused Triton kernels (``int8 fused``: ``BlockQuantCodec(fused=True)``) where Triton imports.
The sparse codecs are timed too (not part of ``--baseline``, which covers ``compress.py`` only): the ``sparse_local_sgd``
preset's (``groupmax``: ``GroupMaxCodec(group=16, bits=4, mean_group=8)``) and its mean codec (``groupmax mean``:
group 8), and the preset's TopK codec before it (``topk``: ``TopKCodec(k=128, bits=4)``, the same bytes as
``groupmax``) with its mean codec (``topk mean``: ``k = 384``).
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import benchmark

from harness import REPO_ROOT, Column, new_results, report
from lightning_dopt.compress import CODECS, BlockQuantCodec, Codec, fused_kernels_available, make_codec
from lightning_dopt.options import PRESETS
from lightning_dopt.topk import TopKCodec

BLOCK_SIZE = 256
COLUMNS = [Column("device", "device"), Column("codec", "codec"), Column("numel", "elements", ",.0f"),
           Column("payload_ratio", "payload / fp32", ".4f"), Column("encode_gbps", "encode GB/s", ".3g"),
           Column("decode_gbps", "decode GB/s", ".3g"), Column("decode_into", "decoded into"),
           Column("decode_new_gbps", "decode GB/s (new tensor)", ".3g"),
           Column("roundtrip_gbps", "encode+decode GB/s", ".3g"), Column("vs_clone", "encode+decode vs clone", ".2f")]


def median_seconds(statement: str, scope: dict, threads: int, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt=statement, globals=scope, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compress_module_at(revision: str) -> ModuleType:
    """``lightning_dopt/compress.py`` as it was at git ``revision``, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:lightning_dopt/compress.py"], check=True, capture_output=True,
                            text=True, cwd=REPO_ROOT).stdout
    module = ModuleType("compress_baseline")
    exec(compile(source, f"lightning_dopt/compress.py@{revision}", "exec"), module.__dict__)
    return module


def measure(device: torch.device, numel: int, threads: int, min_run_time: float,
            codecs: dict[str, Codec]) -> list[dict]:
    """One row per codec (and the clone reference) for a random fp32 tensor of ``numel`` values."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(device)
    gbps = 4 * numel / 1e9
    clone_s = median_seconds("x.clone()", {"x": x}, threads, min_run_time)
    rows = [{"device": device.type, "codec": "clone", "numel": numel, "payload_ratio": 1.0,
             "encode_gbps": gbps / clone_s, "clone_s": clone_s}]
    for name, codec in codecs.items():
        scope = {"codec": codec, "x": x, "n": numel, "out": torch.empty_like(x),
                 "generator": torch.Generator(device=device).manual_seed(0)}
        scope["payload"] = codec.encode(x, scope["generator"])
        encode_s = median_seconds("codec.encode(x, generator)", scope, threads, min_run_time)
        takes_out = "out" in inspect.signature(codec.decode).parameters  # older codecs decode into new memory only
        decode_s = median_seconds("codec.decode(payload, n, out=out)" if takes_out else "codec.decode(payload, n)",
                                  scope, threads, min_run_time)
        decode_new_s = median_seconds("codec.decode(payload, n)", scope, threads, min_run_time)
        rows.append({"device": device.type, "codec": name, "numel": numel,
                     "payload_ratio": codec.payload_bytes(numel) / (4 * numel),
                     "decode_into": "out" if takes_out else "new tensor",
                     "encode_s": encode_s, "decode_s": decode_s, "decode_new_s": decode_new_s, "clone_s": clone_s,
                     "encode_gbps": gbps / encode_s, "decode_gbps": gbps / decode_s,
                     "decode_new_gbps": gbps / decode_new_s, "roundtrip_gbps": gbps / (encode_s + decode_s),
                     "vs_clone": clone_s / (encode_s + decode_s)})
        print(f"  {device.type} {name} n={numel:,}: {rows[-1]['vs_clone']:.2f}x clone", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000], help="elements per tensor")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement (at least)")
    parser.add_argument("--json", type=Path, help="write the rows here (harness JSON)")
    parser.add_argument("--baseline", metavar="REV", help="also time compress.py as it was at this git revision")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"],
                        help="devices to time (cuda only where available; default: both)")
    args = parser.parse_args()
    if min(args.sizes) < 1 or args.threads < 1 or args.min_run_time <= 0:
        parser.error("--sizes, --threads and --min-run-time must be positive")
    torch.set_num_threads(args.threads)
    results = new_results("codec_throughput", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    devices = [torch.device(d) for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    codecs = {name: make_codec(name, block_size=BLOCK_SIZE) for name in CODECS}
    preset, topk = PRESETS["sparse_local_sgd"][0]["compression"], TopKCodec(k=128, bits=4, mean_k=384)
    codecs |= {"groupmax": preset, "groupmax mean": preset.mean_codec, "topk": topk, "topk mean": topk.mean_codec}
    if args.baseline:
        baseline = compress_module_at(args.baseline)
        codecs |= {f"{name}@{args.baseline}": baseline.make_codec(name, block_size=BLOCK_SIZE) for name in CODECS}
    fused = {f"int{bits} fused": BlockQuantCodec(bits, BLOCK_SIZE, fused=True) for bits in (8, 4)} \
        if fused_kernels_available() else {}
    results["rows"] = [row for device in devices for numel in args.sizes
                       for row in measure(device, numel, args.threads, args.min_run_time,
                                          codecs | fused if device.type == "cuda" else codecs)]
    report(results, COLUMNS, args.json)


if __name__ == "__main__":
    main()
