"""Emulated cluster benchmark: N ranks in network namespaces on rate-limited links, Lightning strategies compared.

Run as root. Every rank runs ``train.py`` in its own namespace (``netns.py``), one process per node. Each contender's
result is stored in ``<results-dir>/<contender>.json`` and reused by later runs with the same configuration, so the
benchmark can run in parts (``--contenders``) and report once (``--report-only``). Columns: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(HERE)]

import netns  # noqa: E402
from harness import Column, comma_list, new_results, plot_lines, report, utc_now  # noqa: E402
from train import CONTENDERS as ORDER, DOPT_CONTENDERS  # noqa: E402

from lightning_dopt.options import Options  # noqa: E402
from lightning_dopt.traffic import expected_traffic  # noqa: E402

CONFIG_KEYS = ("ranks", "rate_mbit", "steps", "batch_size", "eval_every", "hidden", "lr", "momentum", "local_steps",
               "warmup", "powersgd_rank", "test_limit", "seed", "threads", "compute_sleep", "ranks_per_node")
ADDED_KEYS = {"ranks_per_node": 1}
"""Configuration keys added later, with the value that results stored before them had."""


def local_steps_of(name: str, cfg: dict[str, Any]) -> int:
    """H of a contender: the configured ``local_steps``, or the fixed H of its ``train.DOPT_CONTENDERS`` options."""
    return DOPT_CONTENDERS.get(name, {}).get("local_steps", cfg["local_steps"])


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
    """Bytes per rank and step by definition, and whether exact (``=``) or leaving out small messages (``≈``)."""
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
    if name in DOPT_CONTENDERS:
        options = Options(**{"local_steps": cfg["local_steps"], "warmup_steps": w, **DOPT_CONTENDERS[name]})
        traffic = expected_traffic(options, params, len(mlp_shapes(cfg["hidden"])), n, steps,
                                   ranks_per_node=cfg.get("ranks_per_node", ADDED_KEYS["ranks_per_node"]))
        # compressed runs also refresh their anchor when the noise check asks (anchor_tolerance): not counted here
        return traffic.total / steps, "≈" if options.compression else "="
    if name == "adacons":
        return 2 * full + ring(4 * n, n), "≈"
    if name == "no_sync":
        return 0.0, "≈"
    raise ValueError(name)


def measure_goodput(cluster: netns.EmulatedCluster, megabytes: int = 8) -> float:
    """TCP goodput from rank 0 to the first rank of the next node through the bridge, Mbit/s (``megabytes`` MB sent
    with plain sockets)."""
    peer = cluster.ranks_per_node
    server = ("import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
              "s.bind(('0.0.0.0',5201));s.listen(1);c,_=s.accept();n=0;t=None\n"
              "while True:\n d=c.recv(1<<20)\n if not d: break\n t=t or time.perf_counter();n+=len(d)\n"
              "print(n*8/(time.perf_counter()-t)/1e6)")
    client = (f"import socket,time\ntime.sleep(0.5)\ns=socket.socket();s.bind(('{cluster.address(0)}',0))\n"
              f"s.connect(('{cluster.address(peer)}',5201))\n"
              f"b=bytes(1<<20)\nfor _ in range({megabytes}): s.sendall(b)\ns.close()")
    srv = subprocess.Popen(cluster.command(peer, [sys.executable, "-c", server]), stdout=subprocess.PIPE, text=True)
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
    """Train ``name`` on every rank; the combined result, also written to ``results_dir``."""
    work = Path(tempfile.mkdtemp(prefix=f"dopt_cluster_{name}_"))
    argv = [sys.executable, str(HERE / "train.py"), "--contender", name, "--result-dir", str(work), "--config",
            json.dumps(cfg)]
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
              "date": utc_now()[:-len(":SS UTC")] + " UTC",  # to the minute
              "load_start": load_start, "load_end": load_end, "run_seconds": run.seconds,
              "goodput_mbit": goodput, "ranks": ranks}
    result_path(results_dir, name, cfg["seed"]).write_text(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)  # logs are kept only when a run fails
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {run.seconds:.0f} s (load {load_end[0]:.1f})", flush=True)
    return result


COLUMNS = [Column("name", "contender"), Column("seed", "seed"), Column("H", "H"),
           Column("step_median_rank0", "time/step, rank 0 median (s)", ".3f"),
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
    """A contender's table row: time per step, bytes, time and step to the target, accuracy, the curve."""
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
    rank0, clock = ranks[0], ranks[0]["clock"]
    reached = next((e for e in rank0["evals"] if e["accuracy"] >= target), None)
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
    """Each row's speed-up over ``ddp``, time per step over ``no_sync``'s and accuracy Δ to ``ddp``."""
    by = {row["name"]: row for row in rows}
    ddp, floor = by.get("ddp"), by.get("no_sync")
    for row in rows:
        if ddp is not None:
            row["speedup"] = ddp["step_median_rank0"] / row["step_median_rank0"]
            row["delta"] = row["final_accuracy"] - ddp["final_accuracy"] if row is not ddp else None
        if floor is not None:
            row["vs_no_sync"] = row["step_median_rank0"] / floor["step_median_rank0"]


def plot(rows: list[dict[str, Any]], target: float, img_dir: Path, title: str) -> list[Path]:
    accuracy = "test accuracy of the (averaged) model (%)"
    paths = [img_dir / "cluster_accuracy_vs_time.png", img_dir / "cluster_bytes_vs_accuracy.png"]
    plot_lines({row["name"]: [(t, a) for t, _, a in row["curve"]] for row in rows}, paths[0],
               "training wall time (s, evaluation excluded)", accuracy, title, target)
    plot_lines({row["name"]: [(b / 1e6, a) for _, b, a in row["curve"]] for row in rows
                if row["bytes_per_step"] >= 1e3},  # no_sync: nothing to put on a log axis of bytes
               paths[1], "bytes sent per rank (MB, training)", accuracy, title, target)
    return paths


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--contenders", type=comma_list(), default=list(ORDER), help=f"comma-separated, from: {', '.join(ORDER)}")
    for key, kind, default, text in (
            ("ranks", int, 4, None), ("rate-mbit", float, 100.0, "link rate per rank and direction"),
            ("ranks-per-node", int, 1, "ranks (emulated GPUs) per node: one namespace per node, one rate-limited link "
                                       "per rank, intra-node traffic unlimited (loopback)"),
            ("steps", int, 120, None), ("batch-size", int, 125, "per rank"), ("eval-every", int, 12, None),
            ("hidden", int, 2048, None), ("lr", float, 0.1, None), ("momentum", float, 0.9, None),
            ("local-steps", int, 4, "H for the local/gossip contenders"), ("warmup", int, 0, "synchronous steps first"),
            ("powersgd-rank", int, 4, None), ("test-limit", int, 0, "evaluate on the first N test images (0: all)"),
            ("seed", int, 0, None), ("threads", int, 1, "torch threads per rank"),
            ("compute-sleep", float, 0.0, "accelerator emulation: each step sleeps this long (CPU idle) and computes "
                                          "the loss of only 8 examples (0: real compute on the whole batch)"),
            ("target", float, 84.0, "test accuracy target (%%)"),
            ("skip", int, 8, "steps left out of the time per step"),
            ("timeout", float, 1500.0, "seconds per contender run (all ranks)")):
        add(f"--{key}", type=kind, default=default, help=text)
    add("--results-dir", default=None, help="default /tmp/dopt_cluster_results (quick: _quick; with --compute-sleep: "
                                            "_sleep)")
    add("--rerun", action="store_true", help="run contenders that have stored results again")
    add("--report-only", action="store_true", help="run nothing; report the stored results")
    add("--json", type=Path, help="write the table's rows (stored results, every seed) here")
    add("--img-dir", type=Path, help="draw accuracy against time and bytes into this folder")
    add("--quick", action="store_true", help="smoke run: hidden 256, 16 steps, evaluation every 8 steps on 2,000 "
                                             "test images")
    add("--cleanup", action="store_true", help="remove leftovers of killed runs and exit")
    add("--probe", action="store_true", help="also time a 2-rank exchange of the model with gloo five ways "
                                             "(probe_exchange.py)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.steps, args.eval_every, args.test_limit, args.skip = 256, 16, 8, 2000, 4
    default_dir = "/tmp/dopt_cluster_quick" if args.quick else "/tmp/dopt_cluster_results"
    args.results_dir = Path(args.results_dir or (default_dir + ("_sleep" if args.compute_sleep else "")))
    if unknown := [c for c in args.contenders if c not in ORDER]:
        parser.error(f"unknown contenders {unknown}; valid: {', '.join(ORDER)}")
    args.names = [c for c in ORDER if c in args.contenders]
    if args.ranks_per_node < 1 or args.ranks % args.ranks_per_node:
        parser.error(f"--ranks-per-node must divide --ranks ({args.ranks})")
    if args.steps % args.eval_every or args.eval_every % args.local_steps:
        parser.error("--steps must be a multiple of --eval-every, and --eval-every a multiple of --local-steps")
    return args


def result_path(results_dir: Path, name: str, seed: int) -> Path:
    return results_dir / (f"{name}.json" if seed == 0 else f"{name}.seed{seed}.json")


def stored(results_dir: Path, cfg: dict[str, Any], name: str | None = None) -> list[dict[str, Any]]:
    """Stored ok results with configuration ``cfg``: contender ``name``'s, or (``None``) those with another seed."""
    found = []
    for path in [result_path(results_dir, name, cfg["seed"])] if name else sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        config = result.get("config") if isinstance(result, dict) else None
        if (config and result.get("status") == "ok" and (name is not None or config.get("seed") != cfg["seed"])
                and all(config.get(k, ADDED_KEYS.get(k)) == cfg[k] for k in CONFIG_KEYS if name or k != "seed")):
            found.append(result)
    return found


def main() -> None:
    args = parse_args()
    if args.cleanup:
        print("\n".join(f"removed {r}" for r in netns.cleanup_leftovers()) or "nothing to remove")
        return
    cfg = {key: getattr(args, key) for key in CONFIG_KEYS}
    command = shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    to_run = [] if args.report_only else [n for n in args.names if args.rerun or not stored(args.results_dir, cfg, n)]
    failed: list[str] = []
    probe_path = args.results_dir / "probe_exchange.json"
    if (args.probe and not args.report_only or to_run) and (why := netns.missing_requirements()) is not None:
        raise SystemExit(f"the emulated cluster {why}")
    if args.probe and not args.report_only:
        import probe_exchange
        probed = probe_exchange.probe(args.rate_mbit, sum(math.prod(shape) for shape in mlp_shapes(args.hidden)))
        probe_path.write_text(json.dumps({**probed, "command": command}))
        print(f"exchange probe: {json.dumps(probed['median_seconds'])} (bound {probed['bound_seconds']:.2f} s)")
    if to_run:
        started = time.perf_counter()
        with netns.signals_raise(), netns.EmulatedCluster(args.ranks, rate_mbit=args.rate_mbit,
                                                          ranks_per_node=args.ranks_per_node) as cluster:
            goodput = measure_goodput(cluster) if args.ranks > args.ranks_per_node else float("nan")
            print(f"cluster {cluster.cluster_id}: {args.ranks} ranks ({args.ranks_per_node} per node) at "
                  f"{args.rate_mbit:g} Mbit/s per direction; measured TCP goodput rank 0 → {args.ranks_per_node}: "
                  f"{goodput:.1f} Mbit/s", flush=True)
            for index, name in enumerate(to_run):
                if run_contender(name, cfg, cluster, 29500 + index, args.results_dir, args.timeout, command,
                                 goodput) is None:
                    failed.append(name)
        print(f"ran {len(to_run)} contender(s) in {time.perf_counter() - started:.0f} s", flush=True)
    results = [r for n in ORDER for r in stored(args.results_dir, cfg, n)]
    if not results:
        raise SystemExit("no stored results for this configuration")
    rows = [summarize(r, args.target, args.skip) for r in results]
    compare(rows)
    others = [summarize(r, args.target, args.skip) for r in stored(args.results_dir, cfg)]
    print(f"\ntarget: {args.target:g} % test accuracy; failed: {', '.join(failed) or 'none'}")
    probe = json.loads(probe_path.read_text()) if probe_path.exists() else None
    report({**new_results("cluster", cfg), "rows": rows + others, "probe": probe,
            "runs": [r["command"] for r in results]}, COLUMNS, args.json)
    if probe is not None:
        print("\nexchange probe (median s of 3 trials × 2 ranks): " + json.dumps(probe["median_seconds"])
              + f"; one direction at link rate: {probe['bound_seconds']:.2f} s")
    if args.img_dir:
        nodes = "" if cfg["ranks_per_node"] == 1 else f" ({cfg['ranks_per_node']} per node)"
        title = (f"{cfg['ranks']} ranks{nodes}, {cfg['rate_mbit']:g} Mbit/s links, MLP {results[0]['ranks'][0]['params']:,} "
                 f"params, {cfg['steps']} steps × batch {cfg['batch_size']}/rank")
        print("plots: " + ", ".join(map(str, plot(rows, args.target, args.img_dir, title))))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as interrupt:  # SIGINT/SIGTERM/SIGHUP, after the ranks and namespaces are gone
        print(f"interrupted ({interrupt}): ranks killed, namespaces removed", file=sys.stderr)
        sys.exit(130)
