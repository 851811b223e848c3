"""Emulated cluster benchmark: N ranks in network namespaces on rate-limited links, Lightning strategies compared.

Usage (root; each contender is a separate training run of ``train.py`` in every rank's namespace)::

    python benchmarks/cluster/bench.py                                  # every contender, results kept in --results-dir
    python benchmarks/cluster/bench.py --contenders ddp,gossip_local_int8
    python benchmarks/cluster/bench.py --report-only --json runs/cluster.json --img-dir docs/img  # table, plots
    python benchmarks/cluster/bench.py --quick                          # smoke run: small model, few steps
    python benchmarks/cluster/bench.py --cleanup                        # remove leftovers of a killed run
    python benchmarks/cluster/bench.py --contenders ddp --seed 1 --probe  # another seed; the 2-rank exchange probe

On a 2-core machine the whole default set takes about an hour (``ddp`` ~8 min, ``adacons`` ~14 min at 100 Mbit/s),
so run it in parts of under 20 minutes with ``--contenders`` and write the report at the end.

Results of finished contenders are stored per contender (``<results-dir>/<contender>.json``, with the command
line, date and load) and reused by later invocations with the same configuration, so the benchmark can be run in
parts (``--contenders``) and reported once (``--report-only``: the markdown table on stdout, the rows as JSON with
``--json``, plots with ``--img-dir``). ``--rerun`` runs stored contenders again.

Every rank runs in its own network namespace (``netns.py``): a veth to a bridge in another namespace, with a
``tc tbf`` of ``--rate-mbit`` on both directions of its link. Ranks are launched as one process per node
(``num_nodes=N``, ``devices=1``, ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``NODE_RANK``/
``LOCAL_RANK=0``, gloo with ``GLOO_SOCKET_IFNAME`` = the rank's veth). If one rank fails, or ``--timeout``
passes, every rank is killed; namespaces are removed on every exit path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import netns  # noqa: E402
from harness import Column, markdown_table, new_results, write_results  # noqa: E402

from lightning_dopt.options import Options  # noqa: E402
from lightning_dopt.traffic import expected_traffic  # noqa: E402

ORDER = ("ddp", "ddp_powersgd", "ddp_fp16", "ddp_bf16", "post_local_sgd", "local_sgd", "gossip_local",
         "gossip_local_int8", "gossip_local_int8_overlap", "gossip_local_int4", "gossip_local_int8_h8", "adacons",
         "no_sync")
CONFIG_KEYS = ("ranks", "rate_mbit", "steps", "batch_size", "eval_every", "hidden", "lr", "momentum", "local_steps",
               "warmup", "powersgd_rank", "test_limit", "seed", "threads", "compute_sleep")

# ------------------------------------------------------------------------------------------------- formulas
def local_steps_of(name: str, cfg: dict[str, Any]) -> int:
    """H of a contender: the configured ``local_steps``, or the fixed H its name ends with (``_h8``; ``train.py``
    builds that contender with the same H)."""
    fixed = re.fullmatch(r".*_h([1-9][0-9]*)", name)
    return int(fixed.group(1)) if fixed else cfg["local_steps"]


def ring(payload: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``payload`` bytes: ``2(n−1)/n · payload``."""
    return 2 * (n - 1) / n * payload


def mlp_shapes(hidden: int) -> list[tuple[int, ...]]:
    return [(hidden, 784), (hidden,), (hidden, hidden), (hidden,), (10, hidden), (10,)]


def powersgd_payload(shapes: list[tuple[int, ...]], rank: int, min_rate: float = 2.0) -> int:
    """Values PowerSGD all-reduces per step: 1-D tensors and matrices not worth compressing as they are
    (torch's ``_should_compress``: ``(n + m)·r·min_rate < n·m``), P (n×r) and Q (m×r) for the others."""
    values = 0
    for shape in shapes:
        n = shape[0]
        m = math.prod(shape[1:]) if len(shape) > 1 else 1
        compress = len(shape) > 1 and (n + m) * rank * min_rate < n * m
        values += (n + m) * rank if compress else n * m
    return values


def formula_bytes(name: str, cfg: dict[str, Any], params: int) -> tuple[float, str]:
    """Bytes per rank and step from the algorithm's definition, and whether that is exact (``=``) or ignores small
    control messages / anchor-round details (``≈``)."""
    n, steps, h, w = cfg["ranks"], cfg["steps"], local_steps_of(name, cfg), cfg["warmup"]
    full = ring(4 * params, n)
    if name == "ddp":
        return full, "="
    if name in ("ddp_fp16", "ddp_bf16"):
        return ring(2 * params, n), "="
    if name == "ddp_powersgd":
        compressed = ring(4 * powersgd_payload(mlp_shapes(cfg["hidden"]), cfg["powersgd_rank"]), n)
        return (2 * full + (steps - 2) * compressed) / steps, "="
    if name == "post_local_sgd":
        averagings = sum(1 for s in range(steps) if s >= w and (s - w) % h == 0)
        return (w * full + averagings * full) / steps, "="
    options = dopt_options(name, cfg)
    if options is not None:
        traffic = expected_traffic(options, params, len(mlp_shapes(cfg["hidden"])), n, steps)
        # compressed runs also refresh their anchor when the noise check asks (anchor_tolerance): not counted here
        return traffic.total / steps, "≈" if options.compression else "="
    if name == "adacons":
        return 2 * full + ring(4 * n, n), "≈"
    if name == "no_sync":
        return 0.0, "≈"
    raise ValueError(name)


def dopt_options(name: str, cfg: dict[str, Any]) -> Options | None:
    """The ``GossipLocalStrategy`` options ``train.py`` gives a ``lightning_dopt`` contender (``None`` for others)."""
    common = {"local_steps": local_steps_of(name, cfg), "warmup_steps": cfg["warmup"]}
    return {"local_sgd": Options(topology="complete", **common), "gossip_local": Options(**common),
            "gossip_local_int8": Options(compression="int8", **common),
            "gossip_local_int8_overlap": Options(compression="int8", overlap=True, **common),
            "gossip_local_int4": Options(compression="int4", **common),
            "gossip_local_int8_h8": Options(compression="int8", **common)}.get(name)


# --------------------------------------------------------------------------------------------------- running
def child_args(cfg: dict[str, Any]) -> list[str]:
    return ["--steps", str(cfg["steps"]), "--batch-size", str(cfg["batch_size"]), "--eval-every",
            str(cfg["eval_every"]), "--hidden", str(cfg["hidden"]), "--lr", str(cfg["lr"]), "--momentum",
            str(cfg["momentum"]), "--local-steps", str(cfg["local_steps"]), "--warmup", str(cfg["warmup"]),
            "--powersgd-rank", str(cfg["powersgd_rank"]), "--test-limit", str(cfg["test_limit"]),
            "--seed", str(cfg["seed"]), "--compute-sleep", str(cfg["compute_sleep"])]


def measure_goodput(cluster: netns.EmulatedCluster, megabytes: int = 8) -> float:
    """TCP goodput rank 0 → rank 1 through the bridge, Mbit/s (``megabytes`` MB sent with plain sockets)."""
    server = ("import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
              "s.bind(('0.0.0.0',5201));s.listen(1);c,_=s.accept();n=0;t=None\n"
              "while True:\n d=c.recv(1<<20)\n if not d: break\n t=t or time.perf_counter();n+=len(d)\n"
              "print(n*8/(time.perf_counter()-t)/1e6)")
    client = (f"import socket,time\ntime.sleep(0.5)\ns=socket.create_connection(('{cluster.address(1)}',5201))\n"
              f"b=bytes(1<<20)\nfor _ in range({megabytes}): s.sendall(b)\ns.close()")
    srv = subprocess.Popen(cluster.command(1, [sys.executable, "-c", server]), stdout=subprocess.PIPE, text=True)
    try:
        subprocess.run(cluster.command(0, [sys.executable, "-c", client]), check=True, timeout=120)
        out, _ = srv.communicate(timeout=60)
        return float(out.strip())
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def run_contender(name: str, cfg: dict[str, Any], cluster: netns.EmulatedCluster, port: int, results_dir: Path,
                  timeout: float, command: str, goodput: float) -> dict[str, Any] | None:
    """Train ``name`` on every rank; return the combined result (also written to ``results_dir/<name>.json``)."""
    work = Path(tempfile.mkdtemp(prefix=f"dopt_cluster_{name}_"))
    argv = [sys.executable, str(HERE / "train.py"), "--contender", name, "--result-dir", str(work), *child_args(cfg)]
    base = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    load_start = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: starting {cfg['ranks']} ranks (load {load_start[0]:.1f})",
          flush=True)
    run = netns.run_ranks(cluster, lambda rank: argv, lambda rank: cluster.rank_env(rank, port, base), timeout,
                          work / "logs")
    load_end = os.getloadavg()
    if not run.ok:
        rank = run.failed_rank if run.failed_rank is not None else 0
        reason = "timed out" if run.timed_out else f"rank {rank} exited with {run.returncodes[rank]}"
        print(f"{name}: FAILED ({reason}, {run.seconds:.0f} s); logs in {work / 'logs'}; tail of rank {rank}:\n"
              f"{run.log_tail(rank)}", flush=True)
        return None
    ranks = [json.loads((work / f"rank{k}.json").read_text()) for k in range(cfg["ranks"])]
    result = {"contender": name, "status": "ok", "config": cfg, "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_start": load_start, "load_end": load_end, "run_seconds": run.seconds,
              "goodput_mbit": goodput, "ranks": ranks}
    result_path(results_dir, name, cfg["seed"]).write_text(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)  # logs are kept only when a run fails
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {run.seconds:.0f} s (load {load_end[0]:.1f})", flush=True)
    return result


# -------------------------------------------------------------------------------------------------- summary
COLUMNS = [Column("name", "contender"), Column("H", "H"), Column("step_median_rank0", "time/step, rank 0 median (s)", ".3f"),
           Column("step_median_mean", "mean of ranks' medians (s)", ".3f"), Column("speedup", "speed-up vs ddp", ".2f"),
           Column("vs_no_sync", "time/step vs no_sync", ".2f"),
           Column("comm_per_step", "in comm calls/step, rank 0 (s)", ".3f"),
           Column("bytes_per_step", "bytes sent/step/rank (MB)", ".3f", 1e6),
           Column("formula_kind", ""), Column("formula", "formula (MB)", ".3f", 1e6),
           Column("wire_per_step", "on the wire/step/rank (MB)", ".3f", 1e6),
           Column("time_to_target", "time to target (s)", ".0f"), Column("step_to_target", "at step", "d"),
           Column("final_accuracy", "final accuracy (%)", ".2f"), Column("delta", "Δ vs ddp (points)", "+.2f"),
           Column("train_seconds", "training time (s)", ".0f"), Column("load", "load (start–end)")]


def window_step_times(clock: list[float], window: int, skip: int) -> list[float]:
    """Per-step time over consecutive windows of ``window`` steps after the first ``skip`` steps (a window holds
    exactly one round for H = ``window``, so periodic round costs are included, not filtered out by the median)."""
    return [(clock[s + window - 1] - clock[s - 1]) / window for s in range(skip, len(clock) - window + 1, window)]


def summarize(result: dict[str, Any], target: float, skip: int) -> dict[str, Any]:
    """One table row of a contender's run: time per step (median over windows), bytes (counted, formula, wire),
    time and step to the accuracy target, final accuracy, and the curve (training seconds, MB sent, accuracy)."""
    cfg, ranks, name = result["config"], result["ranks"], result["contender"]
    n, steps, params = cfg["ranks"], ranks[0]["steps"], ranks[0]["params"]
    formula, kind = formula_bytes(name, cfg, params)

    def sent(rank: dict[str, Any], counted: float, step: int) -> float:
        if rank["counted_kind"] == "allreduce_payload":
            return ring(counted, n)
        if rank["counted_kind"] == "none":  # plain DDP: C++ reducer, no Python hook to count; use the formula
            return formula * step
        return counted

    medians = [statistics.median(window_step_times(r["clock"], local_steps_of(name, cfg), skip)) for r in ranks]
    rank0 = ranks[0]
    reached = next((e for e in rank0["evals"] if e["accuracy"] >= target), None)
    clock = rank0["clock"]
    h = 1 if name in ("ddp", "ddp_powersgd", "ddp_fp16", "ddp_bf16", "adacons") else (
        "∞" if name == "no_sync" else local_steps_of(name, cfg))
    return {
        "name": name, "H": str(h), "seed": cfg["seed"], "step_median_rank0": medians[0],
        "step_median_mean": statistics.fmean(medians),
        "step_mean_rank0": (clock[-1] - clock[skip - 1]) / (len(clock) - skip),
        "bytes_per_step": statistics.fmean(sent(r, r["counted_bytes"], steps) / steps for r in ranks),
        "formula": formula, "formula_kind": kind,
        "wire_per_step": statistics.fmean(r["wire_tx_bytes"] / steps for r in ranks),
        "time_to_target": reached["clock"] if reached else None, "step_to_target": reached["step"] if reached else None,
        "final_accuracy": rank0["evals"][-1]["accuracy"], "final_step": rank0["evals"][-1]["step"],
        "train_seconds": clock[-1], "eval_seconds": sum(e["eval_seconds"] for e in rank0["evals"]),
        "comm_per_step": rank0["comm_seconds"] / steps if rank0.get("comm_seconds") is not None else None,
        "load": f"{result['load_start'][0]:.1f}–{result['load_end'][0]:.1f}", "date": result["date"],
        "curve": [(e["clock"], statistics.fmean(sent(r, r["evals"][i]["counted_bytes"], e["step"]) for r in ranks),
                   e["accuracy"]) for i, e in enumerate(rank0["evals"])]}


def compare(rows: list[dict[str, Any]]) -> None:
    """Add each row's speed-up over ``ddp``, time per step over ``no_sync``'s and accuracy Δ to ``ddp`` (when run)."""
    by = {row["name"]: row for row in rows}
    ddp, floor = by.get("ddp"), by.get("no_sync")
    for row in rows:
        if ddp is not None:
            row["speedup"] = ddp["step_median_rank0"] / row["step_median_rank0"]
            row["delta"] = row["final_accuracy"] - ddp["final_accuracy"] if row is not ddp else None
        if floor is not None:
            row["vs_no_sync"] = row["step_median_rank0"] / floor["step_median_rank0"]


def plot(rows: list[dict[str, Any]], target: float, img_dir: Path, title: str) -> list[Path]:
    """Accuracy against training time and against bytes sent per rank, one line per contender (log x axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, xlabel, filename in (("time", "training wall time (s, evaluation excluded)", "cluster_accuracy_vs_time.png"),
                                   ("bytes", "bytes sent per rank (MB, training)", "cluster_bytes_vs_accuracy.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for row in rows:
            if kind == "bytes" and row["bytes_per_step"] < 1e3:
                continue  # no_sync: nothing to put on a log axis of bytes
            xs = [t if kind == "time" else b / 1e6 for t, b, _ in row["curve"]]
            ax.plot(xs, [a for _, _, a in row["curve"]], marker=".", label=row["name"],
                    linestyle="--" if row["name"].startswith("ddp") else "-")
        ax.axhline(target, color="gray", linewidth=0.8, linestyle=":")
        ax.set(xlabel=xlabel, ylabel="test accuracy of the (averaged) model (%)", xscale="log")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(img_dir / filename, dpi=110)
        plt.close(fig)
        paths.append(img_dir / filename)
    return paths


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default=",".join(ORDER), help=f"comma-separated, from: {', '.join(ORDER)}")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=125, help="per rank")
    parser.add_argument("--eval-every", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--local-steps", type=int, default=4, help="H for the local/gossip contenders")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--powersgd-rank", type=int, default=4)
    parser.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--compute-sleep", type=float, default=0.0,
                        help="accelerator emulation: each step sleeps this long (CPU idle) and computes the loss of "
                             "only 8 examples (0: real compute on the whole batch)")
    parser.add_argument("--target", type=float, default=84.0, help="test accuracy target (%%)")
    parser.add_argument("--skip", type=int, default=8, help="steps left out of the time per step")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per contender run (all ranks)")
    parser.add_argument("--results-dir", default=None,
                        help="default /tmp/dopt_cluster_results (quick: _quick; with --compute-sleep: _sleep)")
    parser.add_argument("--rerun", action="store_true", help="run contenders that have stored results again")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the stored results")
    parser.add_argument("--json", type=Path, help="write the table's rows (stored results, every seed) here")
    parser.add_argument("--img-dir", type=Path, help="draw accuracy against time and bytes into this folder")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: hidden 256, 16 steps, evaluation every 8 steps on 2,000 test images")
    parser.add_argument("--cleanup", action="store_true", help="remove leftovers of killed runs and exit")
    parser.add_argument("--probe", action="store_true",
                        help="also time a 2-rank exchange of the model with gloo three ways (probe_exchange.py)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.steps, args.eval_every, args.test_limit, args.skip = 256, 16, 8, 2000, 4
    default_dir = "/tmp/dopt_cluster_quick" if args.quick else "/tmp/dopt_cluster_results"
    args.results_dir = Path(args.results_dir or (default_dir + ("_sleep" if args.compute_sleep else "")))
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in ORDER]
    if unknown:
        parser.error(f"unknown contenders {unknown}; valid: {', '.join(ORDER)}")
    args.names = [c for c in ORDER if c in names]
    if args.steps % args.eval_every or args.eval_every % args.local_steps:
        parser.error("--steps must be a multiple of --eval-every, and --eval-every a multiple of --local-steps")
    return args


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"ranks": args.ranks, "rate_mbit": args.rate_mbit, "steps": args.steps, "batch_size": args.batch_size,
            "eval_every": args.eval_every, "hidden": args.hidden, "lr": args.lr, "momentum": args.momentum,
            "local_steps": args.local_steps, "warmup": args.warmup, "powersgd_rank": args.powersgd_rank,
            "test_limit": args.test_limit, "seed": args.seed, "threads": args.threads,
            "compute_sleep": args.compute_sleep}


def result_path(results_dir: Path, name: str, seed: int) -> Path:
    return results_dir / (f"{name}.json" if seed == 0 else f"{name}.seed{seed}.json")


def stored(results_dir: Path, name: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    path = result_path(results_dir, name, cfg["seed"])
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if all(result["config"].get(k) == cfg[k] for k in CONFIG_KEYS) else None


def other_seeds(results_dir: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Stored results with this configuration except for the seed (for the seed-to-seed spread)."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        config = result.get("config") if isinstance(result, dict) else None
        if (result.get("status") == "ok" and config and config.get("seed") != cfg["seed"]
                and all(config.get(k) == cfg[k] for k in CONFIG_KEYS if k != "seed")):
            found.append(result)
    return found


def main() -> None:
    args = parse_args()
    if args.cleanup:
        removed = netns.cleanup_leftovers()
        print("\n".join(f"removed {r}" for r in removed) if removed else "nothing to remove")
        return
    cfg = config_of(args)
    command = shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    to_run = [] if args.report_only else [n for n in args.names if args.rerun or (r := stored(args.results_dir, n, cfg))
                                          is None or r["status"] != "ok"]
    failed: list[str] = []
    probe_path = args.results_dir / "probe_exchange.json"
    if args.probe and not args.report_only:
        if (why := netns.missing_requirements()) is not None:
            raise SystemExit(f"the emulated cluster {why}")
        import probe_exchange
        params = sum(math.prod(shape) for shape in mlp_shapes(args.hidden))
        probed = probe_exchange.probe(args.rate_mbit, params)
        probe_path.write_text(json.dumps({**probed, "command": command}))
        print(f"exchange probe: {json.dumps(probed['median_seconds'])} (bound {probed['bound_seconds']:.2f} s)")
    if to_run:
        if (why := netns.missing_requirements()) is not None:
            raise SystemExit(f"the emulated cluster {why}")
        started = time.perf_counter()
        with netns.signals_raise(), netns.EmulatedCluster(args.ranks, rate_mbit=args.rate_mbit) as cluster:
            goodput = measure_goodput(cluster) if args.ranks > 1 else float("nan")
            print(f"cluster {cluster.cluster_id}: {args.ranks} ranks at {args.rate_mbit:g} Mbit/s per direction; "
                  f"measured TCP goodput rank 0 → 1: {goodput:.1f} Mbit/s", flush=True)
            for index, name in enumerate(to_run):
                result = run_contender(name, cfg, cluster, 29500 + index, args.results_dir, args.timeout, command,
                                       goodput)
                if result is None:
                    failed.append(name)
        print(f"ran {len(to_run)} contender(s) in {time.perf_counter() - started:.0f} s", flush=True)
    results = [r for n in ORDER if (r := stored(args.results_dir, n, cfg)) is not None and r["status"] == "ok"]
    if not results:
        raise SystemExit("no stored results for this configuration")
    rows = [summarize(r, args.target, args.skip) for r in results]
    compare(rows)
    others = [summarize(r, args.target, args.skip) for r in other_seeds(args.results_dir, cfg)]
    print(f"\ntarget: {args.target:g} % test accuracy; failed: {', '.join(failed) or 'none'}")
    print(markdown_table(rows + others, [*COLUMNS[:1], Column("seed", "seed"), *COLUMNS[1:]]))
    probe = json.loads(probe_path.read_text()) if probe_path.exists() else None
    if probe is not None:
        print("\nexchange probe (median s of 3 trials × 2 ranks): " + json.dumps(probe["median_seconds"])
              + f"; one direction at link rate: {probe['bound_seconds']:.2f} s")
    if args.img_dir:
        title = (f"{cfg['ranks']} ranks, {cfg['rate_mbit']:g} Mbit/s links, MLP {results[0]['ranks'][0]['params']:,} "
                 f"params, {cfg['steps']} steps × batch {cfg['batch_size']}/rank")
        print("plots: " + ", ".join(map(str, plot(rows, args.target, args.img_dir, title))))
    if args.json:
        document = new_results("cluster", cfg)
        document["rows"] = [{k: v for k, v in row.items()} for row in rows + others]
        document["probe"], document["runs"] = probe, [r["command"] for r in results]
        write_results(args.json, document)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as interrupt:  # SIGINT/SIGTERM/SIGHUP, after the ranks and namespaces are gone
        print(f"interrupted ({interrupt}): ranks killed, namespaces removed", file=sys.stderr)
        sys.exit(130)
