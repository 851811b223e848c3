"""Paired timing of two contenders on the emulated cluster: ``A`` and ``B`` run ``--pairs`` times per seed, each pair
in its own results folder, the order alternating from one pair to the next across all seeds (A B, B A, A B, ...), so
a slow spell of a shared machine falls on both of a pair's runs and each contender goes first about as often; writes
every run's time per step and accuracy and each pair's ratio B / A (JSON), and prints them.

Run as root, like ``bench.py`` (one ``bench.py`` command per run; arguments after ``--`` go to every one of them)::

    python benchmarks/cluster/paired.py --a ddp_powersgd --b sparse_local_sgd_g16_m8_h2 --seeds 0,1 --pairs 3 \
        --json docs/results/cluster_paired.json

Every run is a ``bench.py`` command, which reuses a result stored in its folder with the same configuration (and
runs again otherwise, or with ``--rerun``); the options ``paired.py`` sets itself (contender, seed, results folder)
are refused after ``--``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from bench import result_path, summarize  # noqa: E402
from train import CONTENDERS  # noqa: E402


OWN_OPTIONS = ("--contenders", "--seed", "--results-dir", "--report-only")
"""``bench.py`` options that ``paired.py`` sets for every run, refused among the arguments after ``--``."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, choices=CONTENDERS, metavar="A", help="the reference contender")
    parser.add_argument("--b", required=True, choices=CONTENDERS, metavar="B", help="the contender compared to A")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs per seed (default 3)")
    parser.add_argument("--results-dir", type=Path, default=Path("/tmp/dopt_cluster_paired"),
                        help="runs go to <dir>/seed<s>/pair<k> (default /tmp/dopt_cluster_paired)")
    parser.add_argument("--rerun", action="store_true", help="run every pair again, even where results are stored")
    parser.add_argument("--json", type=Path, help="write the runs and ratios here")
    parser.add_argument("--target", type=float, default=84.0, help="as bench.py's --target")
    parser.add_argument("--skip", type=int, default=8, help="as bench.py's --skip")
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.a == args.b:
        parser.error("--a and --b must name two different contenders")
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if clashes := sorted({arg.split("=")[0] for arg in extra} & set(OWN_OPTIONS)):
        parser.error(f"{', '.join(clashes)} after '--': paired.py sets {', '.join(OWN_OPTIONS)} for every run")
    args.extra = extra
    return args


def bench_command(name: str, seed: int, folder: Path, extra: list[str], rerun: bool) -> list[str]:
    """The ``bench.py`` command of one run."""
    return [sys.executable, str(HERE / "bench.py"), "--contenders", name, "--seed", str(seed), "--results-dir",
            str(folder), *(["--rerun"] if rerun else []), *extra]


def run_bench(command: list[str]) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def run(name: str, seed: int, folder: Path, extra: list[str], rerun: bool,
        runner: Callable[[list[str]], None]) -> dict[str, Any]:
    """``name``'s result for ``seed`` in ``folder`` after its ``bench.py`` command (which runs it unless a result of
    the same configuration is stored there)."""
    runner(bench_command(name, seed, folder, extra, rerun))
    path = result_path(folder, name, seed)
    result = json.loads(path.read_text())
    if result.get("status") != "ok":
        raise SystemExit(f"{path}: the run did not finish ({result.get('status')})")
    return result


def main(argv: Sequence[str] | None = None, runner: Callable[[list[str]], None] = run_bench) -> None:
    args = parse_args(argv)
    pairs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for index in range(args.pairs):
            folder = args.results_dir / f"seed{seed}" / f"pair{index}"
            order = (args.a, args.b) if len(pairs) % 2 == 0 else (args.b, args.a)
            rows = {name: summarize(run(name, seed, folder, args.extra, args.rerun, runner), args.target, args.skip)
                    for name in order}
            a, b = rows[args.a], rows[args.b]
            pairs.append({"seed": seed, "pair": index, "order": list(order),
                          "a_step": a["step_median_rank0"], "b_step": b["step_median_rank0"],
                          "a_step_ranks_mean": a["step_median_mean"], "b_step_ranks_mean": b["step_median_mean"],
                          "ratio": b["step_median_rank0"] / a["step_median_rank0"],
                          "a_accuracy": a["final_accuracy"], "b_accuracy": b["final_accuracy"],
                          "a_bytes_per_step": a["bytes_per_step"], "b_bytes_per_step": b["bytes_per_step"],
                          "a_date": a["date"], "b_date": b["date"], "a_load": a["load"], "b_load": b["load"]})
            print(f"seed {seed}, pair {index} ({' then '.join(order)}): {args.a} {a['step_median_rank0']:.3f} s, "
                  f"{args.b} {b['step_median_rank0']:.3f} s per step; B / A = {pairs[-1]['ratio']:.3f}", flush=True)
    summary = {}
    for seed in args.seeds:
        ratios = [p["ratio"] for p in pairs if p["seed"] == seed]
        summary[str(seed)] = {"median_ratio": statistics.median(ratios), "max_ratio": max(ratios),
                              "b_faster": sum(r < 1 for r in ratios), "pairs": len(ratios)}
        print(f"seed {seed}: B / A median {summary[str(seed)]['median_ratio']:.3f}, largest {max(ratios):.3f}; "
              f"B faster in {summary[str(seed)]['b_faster']} of {len(ratios)} pairs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "a": args.a, "b": args.b, "extra": args.extra, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python", "benchmarks/cluster/paired.py", *(sys.argv[1:] if argv is None else argv)]),
            "pairs": pairs, "summary": summary}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
