"""Vision recipe, one run per strategy config: test accuracy of the final model, bytes sent, wall time, and a plot
of accuracy against bytes sent.

Usage (runs every strategy through the recipe's command line, one after another, then writes the table and plot)::

    python benchmarks/vision_recipe.py --out docs/recipes/vision.md --plot docs/img/vision_accuracy_vs_bytes.png
    python benchmarks/vision_recipe.py --strategies ddp,gossip_local --results-dir /tmp/vision_runs
    python benchmarks/vision_recipe.py --report-only --results-dir /tmp/vision_runs --out docs/recipes/vision.md

Each run is exactly ``python -m recipes.vision fit --config <base> --config strategies/<name>.yaml`` (plus
``--extra`` arguments, a CSV logger in the results directory and no checkpoints), so it measures the configs users
run. Per run it reads the recipe's own outputs: the CSV metrics (``val/acc`` per epoch, rank 0's cumulative
``comm/bytes_sent`` per logged step, ``test/acc`` of the model tested after fit) and the ``CommReport`` table
printed at the end of training (every rank's training bytes: rounds, warm-up and gradient-aggregation traffic).
DDP's traffic is not counted by ``lightning_dopt``; its bytes are the ring all-reduce formula ``2(n−1)/n · 4P``
per optimizer step that ``CommReport`` prints. A run's summary is kept as ``<results-dir>/<name>/summary.json``,
so ``--report-only`` rebuilds the table and the plot without training.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "recipes" / "vision" / "configs"
STRATEGIES = ("ddp", "gossip_local", "gossip_local_int8", "local_sgd", "adacons", "scaled_adam")
REFERENCE = "ddp"
SECTION_TITLE = "## Results"
DOC_INTRO = "# Vision recipe\n"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_doc import write_section  # noqa: E402

_RANK_ROW = re.compile(r"^\s*(\d+)\s+([\d,.]+) MB\s+([\d,.]+) MB\s+([\d,.]+) MB\s+([\d.]+|nan)\s*$")
_DDP_LINE = re.compile(r"DDP: (\d+) optimizer steps on (\d+) ranks; a ring all-reduce of the gradients sends "
                       r"([\d,.]+) MB per rank")
_COMM_HEADER = re.compile(r"Communication after (\d+) optimizer steps on (\d+) ranks")


def _load() -> float:
    return os.getloadavg()[0]


def _csv_rows(root: Path) -> list[dict[str, str]]:
    paths = sorted(root.rglob("metrics.csv"))
    if not paths:
        raise RuntimeError(f"no metrics.csv under {root}")
    with paths[-1].open() as fh:
        return list(csv.DictReader(fh))


def _megabytes(text: str) -> float:
    return float(text.replace(",", ""))


def parse_run(output: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The run's numbers from its printed output (CommReport) and CSV metrics (see the module docstring)."""
    curve: list[dict[str, float]] = []
    last_bytes = 0.0
    for row in rows:
        if row.get("comm/bytes_sent"):
            last_bytes = float(row["comm/bytes_sent"])
        if row.get("val/acc"):
            curve.append({"epoch": float(row["epoch"]), "step": float(row["step"]), "val_acc": float(row["val/acc"]),
                          "rank0_bytes_sent": last_bytes})
    test_acc = [float(row["test/acc"]) for row in rows if row.get("test/acc")]
    summary: dict[str, Any] = {"curve": curve, "test_acc": test_acc[-1] if test_acc else None}
    ddp = _DDP_LINE.search(output)
    header = _COMM_HEADER.search(output)
    if ddp:
        steps, world = int(ddp.group(1)), int(ddp.group(2))
        summary.update(steps=steps, world_size=world, training_mb_per_rank=_megabytes(ddp.group(3)),
                       ddp_mb_per_rank=_megabytes(ddp.group(3)), bytes_source="formula (ring all-reduce)")
    elif header:
        ranks = [m for m in (_RANK_ROW.match(line) for line in output.splitlines()) if m]
        if not ranks:
            raise RuntimeError("CommReport header found but no rank rows")
        steps, world = int(header.group(1)), int(header.group(2))
        training = [_megabytes(m.group(2)) for m in ranks]
        summary.update(steps=steps, world_size=world, training_mb_per_rank=sum(training) / len(training),
                       all_mb_per_rank=sum(_megabytes(m.group(3)) for m in ranks) / len(ranks),
                       ddp_mb_per_rank=_megabytes(ranks[0].group(4)), bytes_source="measured (CommStats)")
    else:
        raise RuntimeError("neither a CommReport table nor a DDP line in the output")
    if ddp is None:  # a DDP curve's bytes come from the formula: steps at each validation × bytes per step
        return summary
    per_step = summary["ddp_mb_per_rank"] * 1e6 / max(summary["steps"], 1)
    for point in curve:
        point["rank0_bytes_sent"] = (point["step"] + 1) * per_step
    return summary


def run_strategy(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one strategy through the recipe's CLI; write and return its summary."""
    out_dir = args.results_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = ["--config", str(args.base), "--config", str(CONFIGS / "strategies" / f"{name}.yaml")]
    if args.data:
        configs += ["--config", str(args.data)]
    command = [sys.executable, "-m", "recipes.vision", "fit", *configs,
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out_dir}",
               "--trainer.enable_checkpointing=false", *args.extra]
    print(f"[{name}] {shlex.join(command)}", flush=True)
    load_start, start = _load(), time.perf_counter()
    with (out_dir / "output.txt").open("w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            returncode = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise RuntimeError(f"[{name}] did not finish within {args.timeout} s; see {out_dir / 'output.txt'}")
    wall = time.perf_counter() - start
    output = (out_dir / "output.txt").read_text()
    if returncode != 0:
        raise RuntimeError(f"[{name}] exit code {returncode}; see {out_dir / 'output.txt'}:\n{output[-3000:]}")
    summary = parse_run(output, _csv_rows(out_dir))
    fit_seconds = re.search(r"\(fit: (\d+) s on", output)
    summary.update(name=name, command=shlex.join(["python", *command[1:]]).replace(str(REPO_ROOT) + "/", ""),
                   wall_seconds=wall, fit_seconds=float(fit_seconds.group(1)) if fit_seconds else None,
                   load_start=load_start, load_end=_load(), date=datetime.datetime.now(datetime.timezone.utc)
                   .strftime("%Y-%m-%d %H:%M UTC"))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    acc = summary["test_acc"]
    print(f"[{name}] test accuracy {100 * acc:.2f}%, {summary['training_mb_per_rank']:.2f} MB/rank, "
          f"{wall:.0f} s wall", flush=True)
    return summary


# --------------------------------------------------------------------------------------------------- report
def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy after each epoch against rank 0's cumulative bytes sent, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for summary in summaries:
        xs = [max(p["rank0_bytes_sent"], 1.0) / 1e6 for p in summary["curve"]]
        ys = [100 * p["val_acc"] for p in summary["curve"]]
        style = "--" if summary["name"] == REFERENCE else "-"
        ax.plot(xs, ys, style, marker="o", markersize=3, label=summary["name"])
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("MB sent by rank 0 (cumulative; DDP: ring all-reduce formula)")
    ax.set_ylabel("test accuracy after each epoch (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(summaries: list[dict[str, Any]], args: argparse.Namespace, plot_path: Path | None) -> str:
    """The ``## Results`` section: commands, conditions, the table and the plot."""
    ref = next((s for s in summaries if s["name"] == REFERENCE), None)
    first = summaries[0]
    lines = [SECTION_TITLE, "",
             f"Produced by `python benchmarks/vision_recipe.py {' '.join(args.argv)}`"
             " (every run is the command in the last column of the second table). Machine: "
             f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs; "
             "load average (1 min) at the start and end of each run in the table.", "",
             "| strategy | test accuracy (%) | Δ vs ddp (points) | steps | training MB sent per rank | ratio to DDP "
             "bytes | fit time (s) | run wall time (s) | load start/end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        acc = 100 * s["test_acc"]
        delta = "(ref)" if s is ref else (f"{acc - 100 * ref['test_acc']:+.2f}" if ref else "-")
        ratio = s["training_mb_per_rank"] / s["ddp_mb_per_rank"]
        lines.append(f"| {s['name']} | {acc:.2f} | {delta} | {s['steps']} | {s['training_mb_per_rank']:.2f} | "
                     f"{ratio:.3f} | {s['fit_seconds']:.0f} | {s['wall_seconds']:.0f} | "
                     f"{s['load_start']:.1f}/{s['load_end']:.1f} |")
    lines += ["", "| strategy | date | command |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['date']} | `{s['command']}` |" for s in summaries]
    lines += ["",
              f"- {first['world_size']} processes. Test accuracy: the model after fit (for the `lightning_dopt` "
              "strategies the exact average of the replicas), on the data's test split, from the run's own "
              "`test/acc`.",
              "- Training MB sent per rank: `lightning_dopt` strategies: the `CommReport` table (round, warm-up and "
              "aggregation traffic, mean over ranks; the start broadcast and the evaluation averages are left out); "
              "`ddp`: the ring all-reduce formula `steps · 2(n−1)/n · 4P` (DDP's traffic is not counted). "
              "MB = 10^6 bytes.",
              "- Fit time: from the start of `fit` to its end on rank 0 (includes validation after every epoch); run "
              "wall time adds process start-up and the test after fit. Both depend on what else ran on the machine."]
    if plot_path is not None:
        relative = os.path.relpath(plot_path, args.out.parent) if args.out else plot_path
        lines += ["", f"![accuracy vs bytes sent]({relative})", "",
                  "The plot: test accuracy after every epoch (validation runs on the test split) against the "
                  "cumulative bytes rank 0 had sent by then (`comm/bytes_sent`, all purposes, so the start "
                  "broadcast and the per-epoch evaluation averages are included; DDP: the formula)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=CONFIGS / "quick.yaml", help="base config of every run")
    parser.add_argument("--data", type=Path, help="optional data override config, e.g. configs/mnist5k.yaml")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated strategy configs to run (of: {', '.join(STRATEGIES)})")
    parser.add_argument("--results-dir", type=Path, default=Path("runs/vision_benchmark"))
    parser.add_argument("--out", type=Path, help="markdown file whose '## Results' section is (re)written")
    parser.add_argument("--plot", type=Path, help="PNG of accuracy vs bytes sent")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--skip-existing", action="store_true", help="reuse runs that already have a summary.json")
    parser.add_argument("--report-only", action="store_true", help="no training: report the existing summaries")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to every run's command line (e.g. --trainer.max_epochs=1)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        parser.error(f"unknown strategies {unknown}; valid choices: {', '.join(STRATEGIES)}")
    args.names = names
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summaries = []
    for name in args.names:
        existing = args.results_dir / name / "summary.json"
        if args.report_only or (args.skip_existing and existing.is_file()):
            if existing.is_file():
                summaries.append(json.loads(existing.read_text()))
            continue
        summaries.append(run_strategy(name, args))
    if not summaries:
        raise SystemExit(f"no results under {args.results_dir}")
    if args.plot:
        plot(summaries, args.plot)
    section = report(summaries, args, args.plot)
    print(section)
    if args.out:
        write_section(args.out, SECTION_TITLE, section, intro=DOC_INTRO)


if __name__ == "__main__":
    main()
