"""Non-blocking gossip: is communication hidden, and what does one slow rank cost the others?

Usage::

    python benchmarks/straggler.py [--ranks 4] [--steps 120] [--out docs/benchmarks.md]

Every contender trains the same MLP (``WIDTHS``, 4.2 M fp32 parameters, 16.8 MB) for ``--steps`` optimizer steps on
``--ranks`` CPU ranks (gloo, spawn launcher, one intra-op thread each) with SGD on synthetic data. Each step also
sleeps ``--compute`` seconds inside ``training_step``: this stands for accelerator compute, during which a GPU
host's CPU is idle and can drive communication (on this CPU-only machine the real forward/backward of the MLP
competes with communication for the same cores, which no GPU run would see). The straggler runs add
:class:`benchmarks/slow_ranks.py: SlowRanks` making the last rank 2× slower (it sleeps once more its measured compute
time after each batch).

Measures, per rank: optimizer steps per second over the steps after ``WARMUP`` (from ``on_train_batch_end``
timestamps), and the share of its steps each rank trained on (the rest were skipped for partial work). "Fast ranks"
are all but the slow one. Contenders: Lightning ``ddp`` (gradient all-reduce every step), ``local`` (our strategy
with no rounds at all: pure local training, the floor for communication cost), blocking ``gossip_local`` and
``overlap=True`` (random pairwise gossip) at each ``--local-steps`` value of ``H``, each also with
``min_work=--min-work`` (a slow rank skips a share of its steps instead of holding the others back).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dopt import GossipLocalStrategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_doc import write_section  # noqa: E402
from slow_ranks import SlowRanks  # noqa: E402

WIDTHS = (1024, 2048, 1024, 10)
WARMUP = 10
SECTION_TITLE = "## Non-blocking gossip: hidden communication and a slow rank (issue: non-blocking gossip)"
NO_ROUNDS = 10**9  # local_steps for pure local training: no round ever happens


class SleepyMLP(pl.LightningModule):
    """MLP + cross-entropy; ``training_step`` also sleeps ``compute`` seconds (emulated accelerator time)."""

    def __init__(self, compute: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip(WIDTHS[:-1], WIDTHS[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.compute = compute

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self.net(inputs), targets)
        time.sleep(self.compute)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepClock(pl.Callback):
    """Writes this rank's ``on_train_batch_end`` timestamps to ``<folder>/rank<r>.json`` at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.stamps: list[float] = []
        self.skipped = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.stamps.append(time.perf_counter())
        self.skipped += bool(isinstance(outputs, dict) and outputs.get("dopt_skipped"))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = getattr(trainer.strategy, "comm_stats", None)
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"stamps": self.stamps, "skipped": self.skipped,
                       "wait_seconds": stats.seconds if stats else None}, handle)


CONTENDERS = ("blocking", "overlap", "blocking_partial", "overlap_partial")
LABELS = {"local": "no communication", "ddp": "Lightning `ddp`", "blocking": "`gossip_local`",
          "overlap": "`gossip_local`, `overlap=True`", "blocking_partial": "`gossip_local`, `min_work={w}`",
          "overlap_partial": "`gossip_local`, `overlap=True, min_work={w}`"}


def strategy_for(name: str, local_steps: int, min_work: float) -> Any:
    if name == "ddp":
        return "ddp_spawn"
    if name == "local":
        return GossipLocalStrategy(local_steps=NO_ROUNDS, start_method="spawn")
    return GossipLocalStrategy(local_steps=local_steps, topology="random", overlap=name.startswith("overlap"),
                               min_work=min_work if name.endswith("_partial") else 1.0, start_method="spawn")


def run(name: str, local_steps: int, straggler: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Train one contender; returns steps/s of every rank."""
    torch.manual_seed(0)
    inputs = torch.randn(args.batch_size * args.steps, WIDTHS[0])
    targets = torch.randint(0, WIDTHS[-1], (args.batch_size * args.steps,))
    data = DataLoader(TensorDataset(inputs, targets), batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        callbacks: list[pl.Callback] = [StepClock(folder)]
        if straggler:
            callbacks.append(SlowRanks({args.ranks - 1: 2.0}))
        strategy = strategy_for(name, local_steps, args.min_work)
        trainer = pl.Trainer(accelerator="cpu", devices=args.ranks, strategy=strategy,
                             max_steps=args.steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                             use_distributed_sampler=False)
        trainer.fit(SleepyMLP(args.compute), data)
        records = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    rates = []
    for record in records:
        stamps = record["stamps"][WARMUP:]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"contender": name, "H": local_steps, "straggler": straggler, "steps_per_s": rates,
            "trained_share": [1.0 - record["skipped"] / len(record["stamps"]) for record in records],
            "wait_seconds": [record["wait_seconds"] for record in records]}


def fast(result: dict[str, Any]) -> float:
    """Mean steps/s of the fast ranks (all but the last, which is the slow one in straggler runs)."""
    return statistics.mean(result["steps_per_s"][:-1])


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    by_key = {(r["contender"], r["H"], r["straggler"]): r for r in results}
    local = fast(by_key[("local", 1, False)])
    lines = [SECTION_TITLE, "",
             f"Command: `{command}` ({datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end). {args.ranks} ranks, MLP {'-'.join(map(str, WIDTHS))} "
             f"({sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:])):,} parameters), batch {args.batch_size}, "
             f"{args.steps} steps (rates over steps {WARMUP}..{args.steps}), emulated compute "
             f"{args.compute * 1000:.0f} ms per step. Straggler: rank {args.ranks - 1} 2× slower "
             "(`benchmarks/slow_ranks.py: SlowRanks`).", "",
             "| contender | H | fast ranks, steps/s | vs pure local | with a 2× slow rank, steps/s | kept | slow rank, "
             "steps/s | slow rank, share of steps trained |", "|---|---|---|---|---|---|---|---|"]
    for (name, h) in [("local", 1), ("ddp", 1)] + [(n, h) for h in args.local_steps for n in CONTENDERS]:
        alone, slowed = by_key.get((name, h, False)), by_key.get((name, h, True))
        if alone is None:
            continue
        label = LABELS[name].format(w=args.min_work)
        row = f"| {label} | {'–' if name in ('local', 'ddp') else h} | {fast(alone):.2f} | {fast(alone) / local:.2f} |"
        if slowed is not None:
            row += (f" {fast(slowed):.2f} | {fast(slowed) / fast(alone):.0%} | {slowed['steps_per_s'][-1]:.2f} | "
                    f"{slowed['trained_share'][-1]:.0%} |")
        else:
            row += " | | | |"
        lines.append(row)
    lines += ["", "\"kept\" is the fast ranks' rate with the slow rank divided by their rate without it. A step "
              "skipped for partial work still counts as a step of the slow rank. Raw per-rank rates and trained "
              "shares are in the JSON written with `--json`.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compute", type=float, default=0.1, help="emulated compute seconds per step")
    parser.add_argument("--local-steps", type=int, nargs="+", default=[1], help="values of H to run")
    parser.add_argument("--min-work", type=float, default=0.5, help="min_work of the partial-work contenders")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                        help="gossip contenders to run at each H (local and ddp always run)")
    parser.add_argument("--out", type=Path, help="markdown file whose section to rewrite (docs/benchmarks.md)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    plan = [("local", 1, False), ("ddp", 1, False), ("ddp", 1, True)]
    for h in args.local_steps:
        for name in args.contenders:
            plan += [(name, h, False), (name, h, True)]
    results = []
    for name, h, straggler in plan:
        result = run(name, h, straggler, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    section = render(results, args, command)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.out:
        write_section(args.out, SECTION_TITLE, section)


if __name__ == "__main__":
    main()
