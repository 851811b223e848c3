"""Vision recipe, one run per strategy config: test accuracy, bytes sent, wall time, and accuracy against bytes.

Each run is ``python -m recipes.vision fit`` on ``--base`` and the strategy config plus ``--extra`` (a CSV logger, no
checkpoints). Read from its outputs: ``test/acc``, ``val/acc`` per epoch and rank 0's cumulative ``comm/bytes_sent``
(CSV); every rank's training bytes (Lightning's ``ddp``: the ring all-reduce formula) and the fit time (``CommReport``).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from harness import Column, new_results, plot_lines, recipe_args, report, run_recipe

STRATEGIES = ("ddp", "gossip_local", "gossip_local_int8", "local_sgd", "adacons", "scaled_adam", "noloco", "noloco_int8",
              "sparse_local_sgd", "sparse_diloco")
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
    """The run's numbers from its printed output (``CommReport``) and CSV metrics."""
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


def run_strategy(name: str, args: Any) -> dict[str, Any]:
    out_dir = args.results_dir / name
    if args.report_only:  # the stored run
        return json.loads((out_dir / "summary.json").read_text())
    child, record = run_recipe("vision", name, args.base, [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out_dir}",
        "--trainer.enable_checkpointing=false", *args.extra], out_dir, args.timeout)
    metrics = sorted(out_dir.rglob("metrics.csv"))
    if child.returncode != 0 or not metrics:
        raise RuntimeError(f"[{name}] no metrics.csv under {out_dir}; {child.failure()}")
    with metrics[-1].open() as handle:
        summary = parse_run(child.log.read_text(), list(csv.DictReader(handle)))
    fit_seconds = re.search(r"\(fit: (\d+) s on", child.log.read_text())
    summary |= {"name": name, **record, "fit_seconds": float(fit_seconds[1]) if fit_seconds else None}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[{name}] test accuracy {100 * summary['test_acc']:.2f}%, {summary['training_mb_per_rank']:.2f} MB/rank, "
          f"{child.seconds:.0f} s wall", flush=True)
    return summary


def main() -> None:
    args = recipe_args(__doc__.split("\n\n")[0], STRATEGIES, STRATEGIES, Path("runs/vision_benchmark"), 3600, None)
    results = new_results("vision_recipe", vars(args))
    summaries = results["rows"] = [run_strategy(name, args) for name in args.strategies]
    reference = next((summary for summary in summaries if summary["name"] == "ddp"), None)
    for summary in summaries:
        summary["accuracy"], summary["bytes_ratio"] = (100 * summary["test_acc"],
                                                       summary["training_mb_per_rank"] / summary["ddp_mb_per_rank"])
        summary["delta_accuracy"] = summary["accuracy"] - 100 * reference["test_acc"] if reference else None
    report(results, COLUMNS, args.json)
    if args.plot:
        curves = {s["name"]: [(max(p["rank0_bytes_sent"], 1.0) / 1e6, 100 * p["val_acc"]) for p in s["curve"]]
                  for s in summaries}
        plot_lines(curves, args.plot, "MB sent by rank 0 (cumulative; DDP: ring all-reduce formula)",
                           "test accuracy after each epoch (%)")


if __name__ == "__main__":
    main()
