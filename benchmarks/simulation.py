"""SimulatedStrategy at 4 to 256 workers: time and memory per epoch, accuracy of the average, consensus curve.

The vision recipe's MLP, ``--topology`` gossip every ``--local-steps`` steps, a fixed global batch split over ``N``
workers as over ``N`` DDP ranks. Each ``N`` runs in a child process, so its peak memory (``ru_maxrss``) is its own.
Setup and reading: ``docs/simulation.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from harness import (QUIET, REPO_ROOT, Column, child_command, new_results, pyplot, read_result, report, run_child,
                     save_figure)
from lightning_dopt import SimulatedStrategy
from recipes.vision.data import ImageClassificationData
from recipes.vision.module import ImageClassifier
from vision_runs import default_source

COLUMNS = [Column("workers", "workers N", "d"), Column("batch_per_worker", "batch per worker", "d"),
           Column("steps", "steps", "d"), Column("last_epoch_seconds", "s/epoch (last)", ".1f"),
           Column("peak_rss_mb", "peak RSS (MB)", ".0f"), Column("last_accuracy", "test accuracy (%)", ".2f"),
           Column("last_consensus", "last consensus distance", ".2e"), Column("rounds", "rounds", "d"),
           Column("round_bytes_per_worker", "round MB/worker", ".1f", 1e6)]


class EpochRecorder(pl.Callback):
    """Training seconds per epoch, the consensus distance every 10 steps, the average's accuracy per epoch."""

    def __init__(self) -> None:
        self.epoch_seconds, self.consensus, self.accuracy, self._start = [], [], [], 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        distance = trainer.callback_metrics.get("dopt/consensus_distance")
        if distance is not None and trainer.global_step % 10 == 0:
            self.consensus.append((trainer.global_step, float(distance)))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            self.accuracy.append(float(trainer.callback_metrics["val/acc"]))


def run(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """One contender in this process (``--run N --result FILE``): its record."""
    if args.global_batch % workers:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of {workers} workers")
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    data = ImageClassificationData(source=args.source, batch_size=args.global_batch // workers)
    model = ImageClassifier(model="mlp", lr=args.lr, momentum=0.9, weight_decay=5e-4)
    strategy = SimulatedStrategy(workers=workers, local_steps=args.local_steps, topology=args.topology,
                                 seed=args.seed, consensus_interval=10)
    recorder = EpochRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=args.epochs,
                         num_sanity_val_steps=0, callbacks=[recorder], **QUIET)
    trainer.fit(model, datamodule=data)
    stats = strategy.comm_stats
    return {"workers": workers, "batch_per_worker": args.global_batch // workers, "steps": trainer.global_step,
            "seconds_per_epoch": recorder.epoch_seconds, "accuracy": recorder.accuracy, "consensus": recorder.consensus,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "round_bytes_per_worker": stats.bytes_sent_by_purpose.get("round", 0), "rounds": stats.rounds,
            "last_epoch_seconds": recorder.epoch_seconds[-1], "last_accuracy": 100 * recorder.accuracy[-1],
            "last_consensus": recorder.consensus[-1][1] if recorder.consensus else None}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: accuracy of the average after the last epoch against ``N``; right: consensus distance per step."""
    figure, (accuracy, consensus) = pyplot().subplots(1, 2, figsize=(10, 4))
    workers = [row["workers"] for row in rows]
    accuracy.plot(workers, [row["last_accuracy"] for row in rows], "o-")
    accuracy.set(xscale="log", xlabel="simulated workers N (global batch fixed)",
                 ylabel="test accuracy of the average (%)", title="Accuracy after the last epoch")
    accuracy.set_xticks(workers, [str(n) for n in workers])
    for row in rows:
        steps, distances = zip(*row["consensus"]) if row["consensus"] else ((), ())
        consensus.plot(steps, distances, label=f"N = {row['workers']}")
    consensus.set(yscale="log", xlabel="optimizer step", ylabel="consensus distance", title="Consensus distance")
    consensus.legend()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="4,16,64,256", help="comma-separated worker counts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--topology", default="random")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument("--source", default=None, help="fashion_mnist or mnist5k (default: what is installed)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per contender")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "simulation.json", help="results JSON")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.source = args.source or default_source()
    if args.run is not None:
        args.result.write_text(json.dumps(run(args.run, args)))
        return
    results = new_results("simulation", vars(args))
    with tempfile.TemporaryDirectory(prefix="simulation_") as workdir:
        for workers in [int(n) for n in args.workers.split(",")]:
            path = Path(workdir, f"{workers}.json")
            print(f"running N = {workers} ...", flush=True)
            child = run_child(child_command(f"--run={workers}", f"--result={path}"), path.with_suffix(".log"),
                              args.timeout)
            result = read_result(path, child)
            if result is None:
                sys.exit(f"N = {workers} produced no result")
            results["rows"].append(result)
    report(results, COLUMNS, args.out)
    if args.plot is not None:
        plot(results["rows"], args.plot)


if __name__ == "__main__":
    main()
