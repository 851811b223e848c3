"""Non-blocking gossip: is communication hidden, and what does one slow rank cost the others?

No rounds, Lightning ``ddp`` and at each ``H`` random-pairwise ``gossip_local`` (blocking or ``overlap=True``, each also
with ``min_work``) train ``comm_per_step.SyntheticMLP`` sleeping ``--compute`` s per step, alone and with ``SlowRanks``
making the last rank 2× slower: steps per second after :data:`WARMUP` steps, share of steps trained, time in comm calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from comm_per_step import SyntheticMLP, synthetic_loader
from harness import QUIET, Column, new_results, report
from lightning_dopt import GossipLocalStrategy
from slow_ranks import SlowRanks

WIDTHS = (1024, 2048, 1024, 10)
WARMUP = 10
NO_ROUNDS = 10**9  # local_steps for pure local training: no round ever happens
GOSSIP = ("blocking", "overlap", "blocking_partial", "overlap_partial")
LABELS = {"local": "no communication", "ddp": "Lightning `ddp`", "blocking": "`gossip_local`",
          "overlap": "`gossip_local`, `overlap=True`", "blocking_partial": "`gossip_local`, `min_work={w}`",
          "overlap_partial": "`gossip_local`, `overlap=True, min_work={w}`"}
COLUMNS = [Column("label", "contender"), Column("H", "H"), Column("fast", "fast ranks, steps/s", ".2f"),
           Column("vs_local", "vs pure local", ".2f"), Column("fast_slowed", "with a 2× slow rank, steps/s", ".2f"),
           Column("kept", "kept", ".0%"), Column("slow", "slow rank, steps/s", ".2f"),
           Column("slow_trained", "slow rank, share of steps trained", ".0%")]


class StepClock(pl.Callback):
    """This rank's step end times, skipped steps and ``comm_stats.seconds``, written to ``<folder>/rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.stamps, self.skipped = folder, [], 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.stamps.append(time.perf_counter())
        self.skipped += bool(isinstance(outputs, dict) and outputs.get("dopt_skipped"))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = getattr(trainer.strategy, "comm_stats", None)
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"stamps": self.stamps, "skipped": self.skipped, "wait_seconds": stats.seconds if stats else None}))


def strategy_for(name: str, local_steps: int, min_work: float) -> Any:
    if name in ("ddp", "local"):
        return "ddp_spawn" if name == "ddp" else GossipLocalStrategy(local_steps=NO_ROUNDS, start_method="spawn")
    return GossipLocalStrategy(local_steps=local_steps, topology="random", overlap=name.startswith("overlap"),
                               min_work=min_work if name.endswith("_partial") else 1.0, start_method="spawn")


def run(name: str, local_steps: int, straggler: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Train one contender: every rank's steps/s, share of steps trained and time in comm calls."""
    with tempfile.TemporaryDirectory() as folder:
        callbacks: list[pl.Callback] = [StepClock(folder)] + ([SlowRanks({args.ranks - 1: 2.0})] if straggler else [])
        trainer = pl.Trainer(accelerator="cpu", devices=args.ranks, strategy=strategy_for(name, local_steps,
                             args.min_work), max_steps=args.steps, callbacks=callbacks, use_distributed_sampler=False,
                             **QUIET)
        trainer.fit(SyntheticMLP(WIDTHS, args.compute), synthetic_loader(args.batch_size * args.steps, args.batch_size,
                                                                         WIDTHS))
        records = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    rates = [(len(r["stamps"][WARMUP:]) - 1) / (r["stamps"][-1] - r["stamps"][WARMUP]) for r in records]
    shares = [1.0 - record["skipped"] / len(record["stamps"]) for record in records]
    return {"steps_per_s": rates, "trained_share": shares, "wait_seconds": [r["wait_seconds"] for r in records],
            "fast": statistics.mean(rates[:-1]), "slow": rates[-1], "slow_trained": shares[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compute", type=float, default=0.1, help="emulated compute seconds per step")
    parser.add_argument("--local-steps", type=int, nargs="+", default=[1], help="values of H to run")
    parser.add_argument("--min-work", type=float, default=0.5, help="min_work of the partial-work contenders")
    parser.add_argument("--contenders", nargs="+", choices=GOSSIP, default=list(GOSSIP),
                        help="gossip contenders to run at each H (local and ddp always run)")
    parser.add_argument("--json", type=Path, help="write the results (harness JSON) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = new_results("straggler", vars(args))
    local = run("local", 1, False, args)
    results["rows"].append({"contender": "local", "label": LABELS["local"], "H": "–", "alone": local,
                            "fast": local["fast"], "vs_local": 1.0})
    for name, h in [("ddp", 1)] + [(name, h) for h in args.local_steps for name in args.contenders]:
        print(f"running {name}, H = {h} ...", flush=True)
        alone, slowed = run(name, h, False, args), run(name, h, True, args)
        results["rows"].append({
            "contender": name, "label": LABELS[name].format(w=args.min_work), "H": "–" if name == "ddp" else h,
            "alone": alone, "slowed": slowed, "fast": alone["fast"], "vs_local": alone["fast"] / local["fast"],
            "fast_slowed": slowed["fast"], "kept": slowed["fast"] / alone["fast"], "slow": slowed["slow"],
            "slow_trained": slowed["slow_trained"]})
    report(results, COLUMNS, args.json)


if __name__ == "__main__":
    main()
