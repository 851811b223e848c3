"""Demo: gossip_local on 4 CPU processes with 5,000 real MNIST digits.

Trains the small CNN with local steps and random pairwise gossip, evaluates the exact average of the
replicas on held-out digits, and prints the bytes each rank sent next to what DDP would have sent.

    python -m recipes.vision.demo [--devices 4] [--epochs 4] [--local-steps 4] [--topology random]

Lightning's popen launcher re-runs this command line once per extra rank, so the module must stay importable
and deterministic.
"""

from __future__ import annotations

import argparse
import time

import lightning as L

import lightning_dopt
from lightning_dopt.callbacks import CommReport
from recipes.vision.data import ImageClassificationData
from recipes.vision.module import ImageClassifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4, help="CPU processes (ranks)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4, help="optimizer steps between rounds (H)")
    parser.add_argument("--topology", default="random", choices=lightning_dopt.TOPOLOGIES)
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.epochs < 1:
        parser.error("--devices and --epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    strategy = lightning_dopt.GossipLocalStrategy(local_steps=args.local_steps, topology=args.topology,
                                                  seed=args.seed)
    report = CommReport()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, callbacks=[report])
    data = ImageClassificationData(source="mnist5k", batch_size=args.batch_size, seed=args.seed)
    model = ImageClassifier(model="small_cnn", lr=args.lr)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    results = trainer.test(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        row = report.rows[0]
        print(f"\nAveraged model: test accuracy {100 * results[0]['test/acc']:.2f}% on {len(data.test_dataset)} "
              f"held-out digits after {args.epochs} epochs ({seconds:.0f} s of training on {args.devices} ranks).")
        print(f"Rank 0 sent {row['training_bytes_sent'] / 1e6:.2f} MB for training; DDP would have sent "
              f"{row['ddp_bytes_sent'] / 1e6:.2f} MB ({row['training_bytes_sent'] / row['ddp_bytes_sent']:.3f}x).")


if __name__ == "__main__":
    main()
