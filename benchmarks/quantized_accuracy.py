"""Test accuracy at equal steps: ``gossip_local`` with fp32 rounds versus quantized rounds (int8, int4, bf16).

Jobs, child runs and rows: ``vision_runs``; the recipe's ``small_cnn`` and optimizer, random gossip, the epochs of
:data:`SOURCE_EPOCHS`. The formula column (``lightning_dopt.traffic``) counts the scheduled anchor refreshes only, not
those the noise check asks for. Setup: ``docs/benchmarks.md``, "Quantized gossip".
"""

from __future__ import annotations

import argparse

from harness import Column, Contender
from vision_runs import Study, main

SOURCE_EPOCHS: dict[str, tuple[int, int | float]] = {"fashion_mnist": (4, 116), "mnist5k": (12, 1.0)}
"""Per source, ``(epochs, limit_train_batches)``. Fashion-MNIST: 4 × 116 = 464 steps, about one pass over the 60,000
images at a global batch of 128 (116 is a multiple of H = 4). mnist5k: 12 full epochs of 31 batches = 372 steps."""


def epochs_of_source(args: argparse.Namespace) -> None:
    """``--epochs`` and ``--limit-train-batches`` default to :data:`SOURCE_EPOCHS` of ``--source``."""
    epochs, batches = SOURCE_EPOCHS[args.source]
    args.epochs, args.limit_train_batches = args.epochs or epochs, args.limit_train_batches or batches


STUDY = Study("quantized_accuracy", __doc__.split("\n\n")[0], {
    name: Contender(name, {"compression": codec}, {"label": name, "optimizer": "recipe", "reference": "fp32"})
    for name, codec in (("fp32", None), ("int8", "int8"), ("int4", "int4"), ("bf16", "bf16"))}, columns=[
    Column("contender", "contender"), Column("seed", "seed", "d"), Column("steps", "steps", "d"),
    Column("accuracy", "test accuracy (%)", ".2f"), Column("delta_accuracy", "Δ vs fp32 (points)", "+.2f"),
    Column("rounds", "rounds", ".0f"), Column("bytes_per_rank", "round bytes/rank (MB)", ".3f", 1e6),
    Column("formula_per_rank", "formula (MB)", ".3f", 1e6),
    Column("bytes_per_round", "bytes/round/rank (kB)", ".2f", 1e3),
    Column("bytes_ratio", "ratio to fp32 bytes", ".3f"), Column("train_seconds", "training time (s)", ".0f")],
    defaults={"model": "small_cnn", "lr": 0.05, "local_steps": 4, "topology": "random", "threads": None,
              "seeds": [0, 1], "noise_contenders": ["fp32", "int8"]}, prepare=epochs_of_source)

if __name__ == "__main__":
    main(STUDY)
