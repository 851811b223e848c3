"""SimulatedStrategy at 4 to 256 workers: time and memory per epoch, accuracy of the average, consensus curve.

The vision recipe's MLP (784-64-10, 50,890 parameters) on Fashion-MNIST (mnist5k when Fashion-MNIST is not installed),
random gossip with H = 4 local steps (``--topology``, ``--local-steps``), SGD with momentum 0.9 and the recipe's cosine learning rate, for a fixed global
batch: each of the ``N`` workers trains on batches of ``global_batch / N`` from its own shard (as ``N`` ranks of DDP
would), so every contender sees the same images per optimizer step and per epoch, and the same learning rate.

Each contender runs in a child process (``--run N``), so peak memory (``ru_maxrss``) is its own; it writes one JSON
record: seconds per epoch (training only, validation excluded), peak resident memory, test accuracy of the exact
average after each epoch, and the consensus distance ``mean_i ‖x_i − x̄‖² / ‖x̄‖²`` every 10 optimizer steps.
``--plot`` draws accuracy and consensus distance against the worker count from the JSON.

    python benchmarks/simulation.py --workers 4,16,64,256 --epochs 3 --out docs/simulation.json \
        --plot docs/img/simulation.png
    python benchmarks/simulation.py --workers 4,64,256 --epochs 1 --topology complete --local-steps 1 \
        --out docs/simulation_control.json     # exact averaging every step: minibatch SGD at any N
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # ``recipes`` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO_ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_dopt import SimulatedStrategy  # noqa: E402
from recipes.vision.data import ImageClassificationData  # noqa: E402
from recipes.vision.module import ImageClassifier  # noqa: E402
from vision_runs import default_source  # noqa: E402


class EpochRecorder(pl.Callback):
    """Training seconds per epoch, the consensus distance every 10 steps, the average's accuracy per epoch."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.consensus: list[tuple[int, float]] = []
        self.accuracy: list[float] = []
        self._start = 0.0

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
    """One contender in this process."""
    if args.global_batch % workers:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of {workers} workers")
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    data = ImageClassificationData(source=args.source, batch_size=args.global_batch // workers)
    model = ImageClassifier(model="mlp", lr=args.lr, momentum=0.9, weight_decay=5e-4)
    strategy = SimulatedStrategy(workers=workers, local_steps=args.local_steps, topology=args.topology,
                                 seed=args.seed, consensus_interval=10)
    recorder = EpochRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    stats = strategy.comm_stats
    return {"workers": workers, "topology": args.topology, "local_steps": args.local_steps, "batch_per_worker": args.global_batch // workers, "global_batch": args.global_batch,
            "steps": trainer.global_step, "epochs": args.epochs, "source": args.source,
            "seconds_per_epoch": recorder.epoch_seconds, "peak_rss_mb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "accuracy": recorder.accuracy,
            "consensus": recorder.consensus, "round_bytes_per_worker": stats.bytes_sent_by_purpose.get("round", 0),
            "rounds": stats.rounds, "threads": args.threads}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, consensus) = plt.subplots(1, 2, figsize=(10, 4))
    workers = [r["workers"] for r in results]
    accuracy.plot(workers, [100 * r["accuracy"][-1] for r in results], "o-")
    accuracy.set(xscale="log", xlabel="simulated workers N (global batch fixed)",
                 ylabel="test accuracy of the average (%)", title="Accuracy after the last epoch")
    accuracy.set_xticks(workers, [str(n) for n in workers])
    for r in results:
        steps, distances = zip(*r["consensus"]) if r["consensus"] else ((), ())
        consensus.plot(steps, distances, label=f"N = {r['workers']}")
    consensus.set(yscale="log", xlabel="optimizer step", ylabel="consensus distance", title="Consensus distance")
    consensus.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="4,16,64,256", help="comma-separated worker counts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--topology", default="random")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument("--source", default=None, help="fashion_mnist or mnist5k (default: what is installed)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "simulation.json")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.source = args.source or default_source()
    if args.run is not None:
        args.result.write_text(json.dumps(run(args.run, args)))
        return
    results = []
    for workers in [int(n) for n in args.workers.split(",")]:
        result_file = args.out.with_suffix(f".{workers}.tmp.json")
        child = [sys.executable, __file__, "--run", str(workers), "--result", str(result_file)] + [
            f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
            if name in ("epochs", "global_batch", "local_steps", "topology", "lr", "seed", "threads", "source")]
        subprocess.run(child, check=True, timeout=3600)
        results.append(json.loads(result_file.read_text()))
        result_file.unlink()
        last = results[-1]
        print(f"N={workers}: {last['seconds_per_epoch']} s/epoch, {last['peak_rss_mb']:.0f} MB, "
              f"accuracy {last['accuracy']}", flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    if args.plot is not None:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
