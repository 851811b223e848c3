"""Vision recipe, one run per strategy config: test accuracy, bytes sent, wall time, and accuracy against bytes.

    python benchmarks/vision_recipe.py --json runs/vision_benchmark.json --plot docs/img/vision_accuracy_vs_bytes.png
    python benchmarks/vision_recipe.py --strategies ddp,gossip_local --results-dir /tmp/vision_runs
    python benchmarks/vision_recipe.py --report-only --results-dir /tmp/vision_runs --json runs/vision_benchmark.json

Each run is ``python -m recipes.vision fit --config <base> --config strategies/<name>.yaml`` plus ``--extra`` (a CSV
logger, no checkpoints) in its own process group, killed after ``--timeout`` s. Read from its outputs: ``test/acc``,
``val/acc`` per epoch and rank 0's cumulative ``comm/bytes_sent`` (CSV); every rank's training bytes (mean over ranks;
Lightning's ``ddp``: the ring all-reduce formula ``2(n−1)/n · 4P`` per step) and the fit time (``CommReport``'s
printout). Summaries are kept in ``<results-dir>/<name>/summary.json`` (``--report-only`` reads them).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from harness import REPO_ROOT, Column, load_average, markdown_table, new_results, run_child, utc_now, write_results

CONFIGS = REPO_ROOT / "recipes" / "vision" / "configs"
STRATEGIES = ("ddp", "gossip_local", "gossip_local_int8", "local_sgd", "adacons", "scaled_adam")
COLUMNS = [Column("name", "strategy"), Column("accuracy", "test accuracy (%)", ".2f"),
           Column("delta_accuracy", "Δ vs ddp (points)", "+.2f"), Column("steps", "steps", "d"),
           Column("training_mb_per_rank", "training MB sent per rank", ".2f"),
           Column("bytes_ratio", "ratio to DDP bytes", ".3f"), Column("fit_seconds", "fit time (s)", ".0f"),
           Column("wall_seconds", "run wall time (s)", ".0f"), Column("load_start", "load at start", ".1f"),
           Column("load_end", "load at end", ".1f")]
RANK_ROW = re.compile(r"^\s*(\d+)\s+([\d,.]+) MB\s+([\d,.]+) MB\s+([\d,.]+) MB\s+([\d.]+|nan)\s*$", re.MULTILINE)
DDP_LINE = re.compile(r"DDP: (\d+) optimizer steps on (\d+) ranks; a ring all-reduce of the gradients sends ([\d,.]+)")
COMM_HEADER = re.compile(r"Communication after (\d+) optimizer steps on (\d+) ranks")


def parse_run(output: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The run's numbers from its printed output (``CommReport``) and CSV metrics (module docstring)."""
    curve, sent = [], 0.0
    for row in rows:
        sent = float(row["comm/bytes_sent"]) if row.get("comm/bytes_sent") else sent
        if row.get("val/acc"):
            curve.append({"epoch": float(row["epoch"]), "step": float(row["step"]), "val_acc": float(row["val/acc"]),
                          "rank0_bytes_sent": sent})
    test_acc = [float(row["test/acc"]) for row in rows if row.get("test/acc")]
    megabytes = [[float(text.replace(",", "")) for text in match[1:4]] for match in RANK_ROW.findall(output)]
    if ddp := DDP_LINE.search(output):
        steps, world, training = int(ddp[1]), int(ddp[2]), float(ddp[3].replace(",", ""))
        summary = {"ddp_mb_per_rank": training, "bytes_source": "formula (ring all-reduce)"}
        for point in curve:  # the formula times the steps done at each validation
            point["rank0_bytes_sent"] = (point["step"] + 1) * training * 1e6 / max(steps, 1)
    elif (header := COMM_HEADER.search(output)) and megabytes:
        steps, world = int(header[1]), int(header[2])
        training = sum(row[0] for row in megabytes) / len(megabytes)
        summary = {"all_mb_per_rank": sum(row[1] for row in megabytes) / len(megabytes),
                   "ddp_mb_per_rank": megabytes[0][2], "bytes_source": "measured (CommStats)"}
    else:
        raise RuntimeError("neither a CommReport table nor a DDP line in the output")
    return {"curve": curve, "test_acc": test_acc[-1] if test_acc else None, "steps": steps, "world_size": world,
            "training_mb_per_rank": training, **summary}


def run_strategy(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one strategy through the recipe's command line; write and return its summary."""
    out_dir = args.results_dir / name
    configs = [args.base, CONFIGS / "strategies" / f"{name}.yaml"] + ([args.data] if args.data else [])
    command = [sys.executable, "-m", "recipes.vision", "fit", *(f"--config={config}" for config in configs),
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out_dir}",
               "--trainer.enable_checkpointing=false", *args.extra]
    print(f"[{name}] {shlex.join(command)}", flush=True)
    load_start, date = load_average(), utc_now()
    child = run_child(command, out_dir / "output.txt", args.timeout, env={"PYTHONUNBUFFERED": "1"})
    metrics = sorted(out_dir.rglob("metrics.csv"))
    if child.returncode != 0 or not metrics:
        raise RuntimeError(f"[{name}] no metrics.csv under {out_dir}; {child.failure()}")
    with metrics[-1].open() as handle:
        summary = parse_run(child.log.read_text(), list(csv.DictReader(handle)))
    fit_seconds = re.search(r"\(fit: (\d+) s on", child.log.read_text())
    summary |= {"name": name, "command": shlex.join(["python", *command[1:]]).replace(f"{REPO_ROOT}/", ""),
                "wall_seconds": child.seconds, "fit_seconds": float(fit_seconds[1]) if fit_seconds else None,
                "load_start": load_start, "load_end": load_average(), "date": date}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[{name}] test accuracy {100 * summary['test_acc']:.2f}%, {summary['training_mb_per_rank']:.2f} MB/rank, "
          f"{child.seconds:.0f} s wall", flush=True)
    return summary


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy after each epoch against rank 0's cumulative bytes sent, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for summary in summaries:
        ax.plot([max(p["rank0_bytes_sent"], 1.0) / 1e6 for p in summary["curve"]],
                [100 * p["val_acc"] for p in summary["curve"]], "--" if summary["name"] == "ddp" else "-", marker="o",
                markersize=3, label=summary["name"])
    ax.set(xscale="log", xlabel="MB sent by rank 0 (cumulative; DDP: ring all-reduce formula)",
           ylabel="test accuracy after each epoch (%)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=CONFIGS / "quick.yaml", help="base config of every run")
    parser.add_argument("--data", type=Path, help="optional data override config, e.g. configs/mnist5k.yaml")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated strategy configs to run (of: {', '.join(STRATEGIES)})")
    parser.add_argument("--results-dir", type=Path, default=Path("runs/vision_benchmark"))
    parser.add_argument("--json", type=Path, help="write the results (harness JSON) here")
    parser.add_argument("--plot", type=Path, help="PNG of accuracy vs bytes sent")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--skip-existing", action="store_true", help="reuse runs that already have a summary.json")
    parser.add_argument("--report-only", action="store_true", help="no training: report the existing summaries")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to every run's command line (e.g. --trainer.max_epochs=1)")
    args = parser.parse_args()
    names = [name.strip() for name in args.strategies.split(",") if name.strip()]
    if not names or set(names) - set(STRATEGIES):
        parser.error(f"unknown strategies {sorted(set(names) - set(STRATEGIES))}; valid: {', '.join(STRATEGIES)}")
    args.results_dir = args.results_dir.resolve()
    results, summaries = new_results("vision_recipe", vars(args)), []
    for name in names:
        existing = args.results_dir / name / "summary.json"
        if args.report_only or args.skip_existing and existing.is_file():
            summaries += [json.loads(existing.read_text())] if existing.is_file() else []
        else:
            summaries.append(run_strategy(name, args))
    if not summaries:
        raise SystemExit(f"no results under {args.results_dir}")
    reference = next((summary for summary in summaries if summary["name"] == "ddp"), None)
    for summary in summaries:
        summary["accuracy"], summary["bytes_ratio"] = (100 * summary["test_acc"],
                                                       summary["training_mb_per_rank"] / summary["ddp_mb_per_rank"])
        summary["delta_accuracy"] = summary["accuracy"] - 100 * reference["test_acc"] if reference else None
    results["rows"] = summaries
    print(markdown_table(summaries, COLUMNS))
    if args.json:
        write_results(args.json, results)
    if args.plot:
        plot(summaries, args.plot)


if __name__ == "__main__":
    main()
