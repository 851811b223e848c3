"""Bytes sent and wall time per optimizer step: Lightning ``ddp`` versus ``gossip_local``.

Usage (the driver; runs every contender in its own subprocess, prints a markdown table)::

    python benchmarks/comm_per_step.py [--out docs/benchmarks.md]

One contender alone (what the driver runs; Lightning's ``popen`` launcher re-runs this same command line
for ranks 1..n-1, and rank 0 writes the JSON result)::

    python benchmarks/comm_per_step.py --contender gossip_local --local-steps 4 --topology random --result r.json

This benchmark measures communication, not accuracy: the model is a ~10 M parameter MLP trained with SGD
(momentum 0.9) on a fixed synthetic data set (random inputs, random labels), on ``n`` CPU ranks (gloo).

Per rank and optimizer step, for ``P`` trainable fp32 parameters (``4P`` bytes):

* ``ddp``: a ring all-reduce of the gradients, ``2(n-1)/n · 4P`` bytes sent. The payload actually handed to the
  all-reduce is counted by a DDP communication hook (DDP buckets the gradients, but a ring all-reduce costs the
  same per byte whatever the bucketing), and the ring formula is applied to it.
* ``gossip_local``, ``random``: one pairwise exchange of the model every ``H`` steps, ``4P / H`` bytes sent.
* ``gossip_local``, ``complete``: one all-reduce of the model every ``H`` steps, ``2(n-1)/n · 4P / H``.

``gossip_local`` bytes are the strategy's own counters, purposes ``round`` + ``warmup`` only (training
traffic); the one-time ``start`` broadcast, the ``final`` average and ``control``/``eval`` traffic are excluded.
Time per step is measured on rank 0 from ``time.perf_counter()`` at ``on_train_batch_end``, over the steps
after a warm-up; the step count is a multiple of 16 so every ``H`` in {1, 4, 16} runs whole rounds.
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations at runtime.
import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from lightning_dopt import GossipLocalStrategy
from lightning_dopt.comm import ring_allreduce_bytes

from results_doc import write_section

LAYER_WIDTHS = (1024, 2048, 2048, 1024, 1024, 512, 10)
"""MLP widths: 9,973,258 fp32 parameters (≈10 M)."""
TRAINING_PURPOSES = ("round", "warmup")
SECTION_TITLE = "## Bytes and time per optimizer step (issue: core strategy)"
H_VALUES = (1, 4, 16)
COMPARED_TOPOLOGIES = ("random", "complete")
CHECK_H, CHECK_TOPOLOGY, CHECK_FRACTION = 4, "random", 1 / 5


# ----------------------------------------------------------------------------------------------- model and data
class SyntheticMLP(pl.LightningModule):
    """An MLP (ReLU between ``LAYER_WIDTHS``) with cross-entropy loss and SGD with momentum."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip(LAYER_WIDTHS[:-1], LAYER_WIDTHS[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def trainable_parameters(module: nn.Module) -> int:
    """``P``: the number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def synthetic_loader(samples: int, batch_size: int) -> DataLoader:
    """A fixed random data set (the same on every rank; Lightning's DistributedSampler splits it)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, LAYER_WIDTHS[0], generator=generator)
    labels = torch.randint(0, LAYER_WIDTHS[-1], (samples,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False, drop_last=True)


# ------------------------------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    """One row of the table: ``ddp`` (``local_steps``/``topology`` unused) or ``gossip_local``."""

    name: str
    local_steps: int = 1
    topology: str = "-"

    def cli_args(self) -> list[str]:
        if self.name == "ddp":
            return ["--contender", "ddp"]
        return ["--contender", self.name, "--local-steps", str(self.local_steps), "--topology", self.topology]

    def expected_bytes_per_step(self, params: int, world_size: int) -> float:
        """Formula, bytes sent per rank and step: ``2(n-1)/n · 4P`` (ddp), ``4P/H`` (random),
        ``2(n-1)/n · 4P/H`` (complete)."""
        if self.name == "ddp":
            return ring_allreduce_bytes(4 * params, world_size)
        if self.topology == "complete":
            return ring_allreduce_bytes(4 * params, world_size) / self.local_steps
        return 4 * params / self.local_steps


def all_contenders() -> list[Contender]:
    """Lightning ``ddp`` first (the reference), then ``gossip_local`` for every ``H`` × topology."""
    return [Contender("ddp")] + [Contender("gossip_local", h, t) for t in COMPARED_TOPOLOGIES for h in H_VALUES]


# ----------------------------------------------------------------------------------------- child: one contender
class DDPPayloadCounter(pl.Callback):
    """Counts the gradient bytes DDP hands to all-reduce (the payload ``b``, not the ring cost ``2(n-1)/n · b``).

    Lightning registers ``DDPStrategy(ddp_comm_hook=...)`` only on CUDA, so the hook is registered here, before
    the first backward.
    """

    def __init__(self) -> None:
        self.payload_bytes = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(self, counting_allreduce_hook)


def counting_allreduce_hook(state: DDPPayloadCounter, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's default all-reduce hook (mean over the world), counting each bucket's bytes first."""
    buffer = bucket.buffer()
    state.payload_bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


class StepRecorder(pl.Callback):
    """Records, at the end of every step, the time and (``gossip_local``) the strategy's cumulative
    ``comm_stats.seconds`` (wall time inside its communication calls); at the end of training rank 0 writes the
    JSON result.

    ``gather_comm_stats()`` is collective, so :meth:`on_train_end` runs it on every rank (it happens before
    the strategy's ``final`` average, which is excluded anyway).
    """

    def __init__(self, result_path: Path, payload_counter: DDPPayloadCounter | None) -> None:
        self.result_path = result_path
        self.payload_counter = payload_counter
        self.step_end_times: list[float] = []
        self.comm_seconds: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step_end_times.append(time.perf_counter())
        if isinstance(trainer.strategy, GossipLocalStrategy):
            self.comm_seconds.append(trainer.strategy.comm_stats.seconds)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        per_rank_bytes = None
        if isinstance(strategy, GossipLocalStrategy):
            per_rank_bytes = [sum(s.bytes_sent_by_purpose.get(p, 0) for p in TRAINING_PURPOSES)
                              for s in strategy.gather_comm_stats()]
        if trainer.global_rank != 0:
            return
        result = {"params": trainable_parameters(pl_module), "world_size": trainer.world_size,
                  "steps": trainer.global_step, "step_end_times": self.step_end_times,
                  "comm_seconds": self.comm_seconds or None,
                  "training_bytes_sent_per_rank": per_rank_bytes,
                  "ddp_payload_bytes": self.payload_counter.payload_bytes if self.payload_counter else None}
        self.result_path.write_text(json.dumps(result))


def build_strategy(contender: Contender) -> DDPStrategy:
    """Lightning's ``DDPStrategy`` or ``GossipLocalStrategy``, both with the ``popen`` launcher and gloo."""
    if contender.name == "ddp":
        return DDPStrategy(start_method="popen", process_group_backend="gloo")
    return GossipLocalStrategy(local_steps=contender.local_steps, topology=contender.topology,
                               start_method="popen", process_group_backend="gloo")


def run_contender(contender: Contender, args: argparse.Namespace) -> None:
    """Train ``args.steps`` optimizer steps on ``args.devices`` CPU ranks; rank 0 writes ``args.result``."""
    pl.seed_everything(0, verbose=False)
    payload_counter = DDPPayloadCounter() if contender.name == "ddp" else None
    callbacks: list[pl.Callback] = [StepRecorder(Path(args.result), payload_counter)]
    callbacks += [payload_counter] if payload_counter else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=build_strategy(contender), max_steps=args.steps,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    loader = synthetic_loader(args.steps * args.batch_size * args.devices, args.batch_size)
    trainer.fit(SyntheticMLP(), train_dataloaders=loader)


# -------------------------------------------------------------------------------------------- driver: summary
@dataclass(frozen=True)
class Row:
    """Measured numbers of one contender (bytes per rank and step; times in seconds)."""

    contender: Contender
    bytes_per_step: float
    bytes_spread: tuple[float, float]
    expected_bytes_per_step: float
    step_times: list[float]
    comm_time_per_step: float | None
    load: float

    @property
    def mean_step_time(self) -> float:
        return statistics.fmean(self.step_times)


def summarize(contender: Contender, result: dict[str, Any], skip: int) -> Row:
    """Bytes per step: ``ddp`` = ``ring_allreduce_bytes(payload) / steps``; ``gossip_local`` = counters
    (``round`` + ``warmup``) / steps, averaged over ranks. Step times, and for ``gossip_local`` the time inside
    its communication calls: rank 0, steps ``skip+1 .. steps``."""
    steps, world_size = result["steps"], result["world_size"]
    if contender.name == "ddp":
        per_rank = [ring_allreduce_bytes(result["ddp_payload_bytes"], world_size) / steps]
    else:
        per_rank = [b / steps for b in result["training_bytes_sent_per_rank"]]
    times = result["step_end_times"]
    durations = [end - start for start, end in zip(times[skip - 1:-1], times[skip:])]
    comm = result["comm_seconds"]
    comm_per_step = (comm[-1] - comm[skip - 1]) / len(durations) if comm else None
    return Row(contender, statistics.fmean(per_rank), (min(per_rank), max(per_rank)),
               contender.expected_bytes_per_step(result["params"], world_size), durations, comm_per_step,
               result["load"])


def run_child(contender: Contender, args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    """Run one contender in its own process group, killed whole after ``args.timeout`` seconds.

    Returns rank 0's result plus ``load``, the 1-minute load average when the child ended (it covers most of the
    child's run), or ``None`` (after printing the log's tail) when the child produced none."""
    tag = "_".join([contender.name, str(contender.local_steps), contender.topology])
    result_path, log_path = workdir / f"{tag}.json", workdir / f"{tag}.log"
    command = [sys.executable, os.path.abspath(__file__), *contender.cli_args(), "--result", str(result_path),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--devices", str(args.devices)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        print(f"FAILED: {tag} produced no result (exit code {process.returncode}); log tail:\n{tail}", flush=True)
        return None
    return {**json.loads(result_path.read_text()), "load": os.getloadavg()[0]}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def markdown_table(rows: list[Row]) -> str:
    """Bytes in MB (10^6 bytes), times in ms; ratios to the ``ddp`` row (the first). "in comm calls" is rank 0's
    time inside the strategy's communication calls (not measured for DDP, whose all-reduce overlaps backward);
    "load" is the machine's 1-minute load average at the end of the contender's run (other jobs included)."""
    ddp = rows[0]
    lines = ["| contender | H | topology | bytes/step/rank (MB) | formula (MB) | ratio to DDP | "
             "time/step mean (ms) | p10–p90 (ms) | time ratio to DDP | in comm calls (ms/step) | load |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        c = row.contender
        h = "-" if c.name == "ddp" else str(c.local_steps)
        lines.append(
            f"| {c.name} | {h} | {c.topology} | {row.bytes_per_step / 1e6:.3f} | "
            f"{row.expected_bytes_per_step / 1e6:.3f} | {row.bytes_per_step / ddp.bytes_per_step:.3f} | "
            f"{_ms(row.mean_step_time)} | {_ms(_percentile(row.step_times, 0.1))}–"
            f"{_ms(_percentile(row.step_times, 0.9))} | {row.mean_step_time / ddp.mean_step_time:.2f} | "
            f"{_ms(row.comm_time_per_step)} | {row.load:.1f} |")
    return "\n".join(lines)


def _find(rows: list[Row], local_steps: int, topology: str) -> Row | None:
    return next((r for r in rows if r.contender == Contender("gossip_local", local_steps, topology)), None)


def check_line(rows: list[Row]) -> str:
    """The issue's acceptance check: ``gossip_local`` (random), H=4, bytes/step ≤ 1/5 of DDP's."""
    ddp, row = rows[0], _find(rows, CHECK_H, CHECK_TOPOLOGY)
    title = f"Check `gossip_local` ({CHECK_TOPOLOGY}) H={CHECK_H} bytes ≤ 1/5 of DDP:"
    if row is None:
        return f"{title} **FAIL** — the contender produced no result."
    ratio = row.bytes_per_step / ddp.bytes_per_step
    verdict, sign = ("PASS", "≤") if ratio <= CHECK_FRACTION else ("FAIL", ">")
    return (f"{title} **{verdict}** — {row.bytes_per_step / 1e6:.3f} MB vs DDP {ddp.bytes_per_step / 1e6:.3f} MB "
            f"per step and rank (ratio {ratio:.3f} {sign} {CHECK_FRACTION:.3f}).")


def notes(rows: list[Row], failed: list[Contender]) -> list[str]:
    """Contenders whose ranks sent different amounts (the table shows the mean over ranks), and failures."""
    spread = [f"Note: {r.contender.name} H={r.contender.local_steps} {r.contender.topology}: ranks sent between "
              f"{r.bytes_spread[0] / 1e6:.3f} and {r.bytes_spread[1] / 1e6:.3f} MB per step."
              for r in rows if r.bytes_spread[1] - r.bytes_spread[0] > 0.5]
    return spread + [f"FAILED (no result within the timeout or a crash): `{' '.join(c.cli_args())}`." for c in failed]


def load_warning(rows: list[Row], world_size: int) -> list[str]:
    """A warning when other jobs pushed the load average above our own ``world_size`` ranks."""
    busiest = max(rows, key=lambda r: r.load)
    if busiest.load <= world_size:
        return []
    return [f"Warning: other jobs oversubscribed the machine during this run (load average up to {busiest.load:.1f} "
            f"with {world_size} ranks of ours on {os.cpu_count()} cores; see the load column): the time columns "
            "largely reflect what else was running when each contender ran and are not a reliable comparison."]


def interpretation(rows: list[Row], world_size: int, load: tuple[float, float]) -> str:
    """Honest reading of the table, with its numbers filled in (``load``: 1-minute load average at start/end).

    Effective loopback rate: bytes sent per step / time in comm calls per step, for random gossip at H=1."""
    ddp, params, random_h4 = rows[0], trainable_parameters(SyntheticMLP()), Contender("gossip_local", 4, "random")
    link = 1.25e9  # 10 Gb/s Ethernet, bytes per second
    matches = all(abs(r.bytes_per_step - r.expected_bytes_per_step) < 1 for r in rows)
    text = [
        "The bytes columns are exact: `gossip_local` numbers are the strategy's own counters and "
        f"{'match' if matches else '**do not all match**'} the formula column, and DDP's is the ring all-reduce "
        "cost `2(n-1)/n` applied to the gradient payload its communication hook actually handed to all-reduce.",
        f"Times are much weaker evidence: {world_size} ranks share {os.cpu_count()} CPU cores (load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end, other jobs included), so a step is dominated by "
        "compute contention, and with one run per contender only large differences in the time columns mean "
        "anything.",
    ]

    every_step = _find(rows, 1, "random")
    if every_step is not None and every_step.comm_time_per_step:
        rate = every_step.bytes_per_step / every_step.comm_time_per_step
        comparison = "slower" if rate < link else "faster"
        text.append(
            f"Loopback gloo is not a free network here either: random gossip at H=1 spent "
            f"{_ms(every_step.comm_time_per_step)} ms of its {_ms(every_step.mean_step_time)} ms step in its exchange "
            f"({every_step.bytes_per_step / 1e6:.1f} MB sent and as much received), an effective "
            f"{rate / 1e9:.2f} GB/s per rank (a lower bound: the time includes waiting for the partner), {comparison} "
            f"than a 10 Gb/s link ({link / 1e9:.2f} GB/s), because the copies compete with compute for the same "
            "cores.")
    text += [
        f"Still, the time ratios here *understate* what a slow interconnect with fast (GPU) compute would show: "
        f"CPU compute makes even DDP's step {_ms(ddp.mean_step_time)} ms long, so communication is a minority of "
        "the step, whereas when communication dominates the time ratio approaches the bytes ratio; DDP also "
        "overlaps its all-reduce with backward while `gossip_local` rounds block (and pack, mix and unpack the "
        "model on the critical path), which favours DDP in time but not in bytes.",
        f"For scale, on a 10 Gb/s link the transfer alone would take about {ddp.bytes_per_step / link * 1e3:.0f} ms "
        f"per step for DDP and {random_h4.expected_bytes_per_step(params, world_size) / link * 1e3:.0f} ms for "
        "random gossip at H=4.",
        "Nothing here measures accuracy: with local steps the replicas drift apart between rounds, and what that "
        "costs in convergence must be judged from training runs.",
    ]
    return " ".join(text)


def doc_section(rows: list[Row], failed: list[Contender], args: argparse.Namespace, command: str, seconds: float,
                load: tuple[float, float]) -> str:
    """The ``##`` section for ``docs/benchmarks.md``."""
    params = trainable_parameters(SyntheticMLP())
    facts = (f"- Date: {datetime.date.today().isoformat()}; total benchmark wall time {seconds:.0f} s.\n"
             f"- Machine: {os.cpu_count()} CPU cores (`os.cpu_count()`), torch {torch.__version__}, lightning "
             f"{lightning.__version__}, backend gloo, {args.devices} CPU ranks (popen launcher).\n"
             f"- Model: MLP {'→'.join(map(str, LAYER_WIDTHS))}, P = {params:,} fp32 parameters "
             f"(4P = {4 * params / 1e6:.1f} MB); synthetic data (random inputs and labels: this measures "
             f"communication, not accuracy); SGD, momentum 0.9; batch size {args.batch_size} per rank.\n"
             f"- {args.steps} optimizer steps per contender; time per step on rank 0 over steps "
             f"{args.skip + 1}–{args.steps} (`time.perf_counter()` at `on_train_batch_end`), mean and p10–p90 "
             f"of single-step durations. Validation, logging, checkpointing, progress bar and model summary off.\n"
             f"- Bytes: sent per rank and optimizer step, training traffic only (`gossip_local`: purposes "
             f"`round` + `warmup` of `CommStats.bytes_sent_by_purpose`; the one-time `start` broadcast, the `final` "
             f"average and evaluation are excluded; Lightning's 1-element per-batch SIGTERM broadcast is not "
             f"counted for either contender). MB = 10^6 bytes.")
    body = "\n\n".join([SECTION_TITLE, f"Command:\n\n```\n{command}\n```", facts, markdown_table(rows),
                        check_line(rows), *notes(rows, failed), *load_warning(rows, args.devices),
                        interpretation(rows, args.devices, load)])
    return body + "\n"


def run_driver(args: argparse.Namespace) -> None:
    """Run every contender, print the table and the check, optionally write ``args.out``."""
    command = shlex.join(["python", *sys.argv])
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="comm_per_step_") as workdir:
        for contender in all_contenders():
            print(f"running {' '.join(contender.cli_args())} ...", flush=True)
            result = run_child(contender, args, Path(workdir))
            if result is None:
                failed.append(contender)
            else:
                rows.append(summarize(contender, result, args.skip))
    seconds, load = time.perf_counter() - started, (load_start, os.getloadavg()[0])
    if not rows or rows[0].contender.name != "ddp":
        sys.exit("the ddp reference produced no result: nothing to compare with")
    print(f"\nP = {trainable_parameters(SyntheticMLP()):,} trainable fp32 parameters, {args.devices} ranks\n")
    print(markdown_table(rows))
    print("\n" + check_line(rows))
    for note in notes(rows, failed) + load_warning(rows, args.devices):
        print(note)
    print(f"\nTotal wall time: {seconds:.0f} s; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end")
    if args.out:
        write_section(Path(args.out), SECTION_TITLE, doc_section(rows, failed, args, command, seconds, load))
        print(f"wrote section '{SECTION_TITLE[3:]}' of {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", choices=("ddp", "gossip_local"), help="run one contender (child mode)")
    parser.add_argument("--local-steps", type=int, default=1, help="H, for gossip_local")
    parser.add_argument("--topology", default="random", help="for gossip_local")
    parser.add_argument("--result", help="child mode: where rank 0 writes its JSON result")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per contender (a multiple of 16)")
    parser.add_argument("--skip", type=int, default=16, help="first steps left out of the time per step")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--devices", type=int, default=4, help="CPU ranks")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per contender subprocess")
    parser.add_argument("--out", help="markdown file whose section to (re)write, e.g. docs/benchmarks.md")
    args = parser.parse_args()
    if args.steps % max(H_VALUES) or not 0 < args.skip < args.steps:
        parser.error(f"--steps must be a multiple of {max(H_VALUES)} and 0 < --skip < --steps")
    if args.contender and not args.result:
        parser.error("--contender needs --result")
    return args


def main() -> None:
    args = parse_args()
    if args.contender:
        topology = args.topology if args.contender == "gossip_local" else "-"
        local_steps = args.local_steps if args.contender == "gossip_local" else 1
        run_contender(Contender(args.contender, local_steps, topology), args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
