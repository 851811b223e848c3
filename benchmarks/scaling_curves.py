"""Scaled local steps (SAVIC-style frozen diagonal preconditioners) vs SGD vs per-rank Adam, and DiLoCo's outer
optimizer vs plain Local SGD, at equal steps on a real task.

Usage (the driver; runs every contender in its own subprocess with a timeout, prints a markdown table, draws
``docs/img/scaling_curves.png``)::

    python benchmarks/scaling_curves.py [--source fashion_mnist|mnist5k] [--steps 480] [--out docs/benchmarks.md]

One contender alone (what the driver runs; Lightning's ``popen`` launcher re-runs this same command line for
ranks 1..n-1, and rank 0 writes the JSON result)::

    python benchmarks/scaling_curves.py --run sgd --devices 4 --steps 480 --result r.json

Every run trains the vision recipe's classifier (:class:`recipes.vision.module.ImageClassifier`, subclassed in
``vision_runs`` to pick the optimizer, drop weight decay and anneal the learning rate per step) on 4 CPU ranks with
:class:`~lightning_dopt.GossipLocalStrategy`, ``local_steps=8``, topology ``complete`` (Local SGD: exact mean by
all-reduce every 8 steps) unless the contender says ``random`` (pairwise gossip), for the same number of optimizer
steps, with the same seed (initialization, data order), data and batch size per rank. Contenders
(:data:`CONTENDERS`):

* ``sgd``: SGD, momentum 0.9 (the recipe's optimizer), no scaling. The reference.
* ``scaled-adam`` / ``scaled-rmsprop`` / ``scaled-oasis``: the same SGD-momentum optimizer, but every local step
  sees ``D⁻¹ g`` with the strategy's frozen-between-rounds diagonal ``D`` (``scaling=...``). So the "γ step" is SGD
  with momentum 0.9; the only difference from ``sgd`` is ``D`` (and the learning rate, tuned coarsely per family).
* ``adam``: per-rank ``torch.optim.Adam`` inside every replica (its moments are local and never communicated), no
  scaling; replicas are averaged every 8 steps like the others.
* ``diloco``: SGD-momentum inner steps (same lr as ``sgd``) plus ``outer_optimizer="diloco"`` (Nesterov SGD,
  lr 0.7, momentum 0.9 on the averaged pseudo-gradient).
* ``gossip-sgd``, ``gossip-scaled-adam``: ``topology="random"`` instead of ``complete`` (statistics are then only
  pulled together pairwise, so ``D`` differs slightly between ranks).

Recorded per run: every rank's training loss at every step, gathered once at the end and averaged over ranks; test
accuracy and loss of the exact average of the replicas after fit; bytes sent per rank from
``strategy.comm_stats.bytes_sent_by_purpose`` (purpose ``round``; the ``start`` broadcast, the ``final`` average and
test-time traffic are reported separately/excluded); training wall time on rank 0.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from recipes.vision.data import SOURCES, ImageClassificationData  # noqa: E402
from recipes.vision.models import MODELS  # noqa: E402

from results_doc import write_section
from vision_runs import Classifier, CurveRecorder, contender_list, default_source, run_child

SECTION_TITLE = "## Scaled local steps and outer optimizer (issue: local adaptivity via scaling)"
DEFAULT_PLOT = REPO_ROOT / "docs" / "img" / "scaling_curves.png"
SMOOTHING = 25
"""Moving-average window (optimizer steps) of the plotted loss curves."""


@dataclass(frozen=True)
class Contender:
    """One way of training: optimizer, scaling family, outer optimizer, topology and its (coarsely tuned) lr."""

    name: str
    label: str
    optimizer: str  # "sgd" (momentum 0.9) or "adam" (per-rank torch.optim.Adam)
    lr: float
    scaling: str | None = None
    outer_optimizer: str | None = None
    topology: str = "complete"
    options: dict[str, Any] = field(default_factory=dict)  # extra GossipLocalStrategy options

    @property
    def reference(self) -> str:
        return "gossip-sgd" if self.topology == "random" else "sgd"


SCALING_OPTIONS: dict[str, dict[str, Any]] = {
    "adam": {"scaling_beta": 0.99, "scaling_eps": 1e-4},
    "rmsprop": {"scaling_beta": 0.99, "scaling_eps": 1e-4},
    "oasis": {"scaling_beta": 0.99, "scaling_alpha_min": 1e-2},
}
"""Scaling constants used for every family (see the module docstring of ``lightning_dopt.scaling``)."""

CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    Contender("sgd", "Local SGD, SGD m=0.9", "sgd", 0.05),
    Contender("scaled-adam", "Local SGD, SGD m=0.9 + Adam scaling", "sgd", 3e-4, scaling="adam",
              options=SCALING_OPTIONS["adam"]),
    Contender("scaled-rmsprop", "Local SGD, SGD m=0.9 + RMSProp scaling", "sgd", 3e-4, scaling="rmsprop",
              options=SCALING_OPTIONS["rmsprop"]),
    Contender("scaled-oasis", "Local SGD, SGD m=0.9 + OASIS scaling", "sgd", 3e-3, scaling="oasis",
              options=SCALING_OPTIONS["oasis"]),
    Contender("adam", "Local SGD, per-rank Adam", "adam", 1e-3),
    Contender("diloco", "DiLoCo (outer Nesterov 0.7/0.9), SGD m=0.9 inner", "sgd", 0.05, outer_optimizer="diloco"),
    Contender("gossip-sgd", "gossip random, SGD m=0.9", "sgd", 0.05, topology="random"),
    Contender("gossip-scaled-adam", "gossip random, SGD m=0.9 + Adam scaling", "sgd", 3e-4, scaling="adam",
              topology="random", options=SCALING_OPTIONS["adam"]),
)}
DEFAULT_CONTENDERS = ("sgd", "scaled-adam", "scaled-rmsprop", "scaled-oasis", "adam", "diloco", "gossip-sgd",
                      "gossip-scaled-adam")
SWEEP: dict[str, tuple[float, ...]] = {
    "scaled-adam": (3e-4, 1e-3),
    "scaled-rmsprop": (1e-4, 3e-4),
    "scaled-oasis": (3e-3, 1e-2),
}
"""Coarse learning-rate sweep of the scaled families (×3 apart): each value is a full run; the one with the lowest
final training loss (not test accuracy) goes into the main table. Other contenders use the fixed lr of
:data:`CONTENDERS` (the recipe's SGD lr 0.05, Adam's usual 1e-3)."""
INHERIT_LR = {"gossip-scaled-adam": "scaled-adam"}
"""Contenders that reuse the lr the sweep picked for another contender."""


# ------------------------------------------------------------------------------------------------ arguments
def _lr_overrides(value: str) -> dict[str, float]:
    """``name=lr,name=lr`` (the driver's coarse lr sweep uses this)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        name, _, lr = part.partition("=")
        if name not in CONTENDERS:
            raise argparse.ArgumentTypeError(f"unknown contender {name!r}")
        out[name] = float(lr)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the driver and of the child (``--run``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=tuple(CONTENDERS), help="child mode: train this one contender")
    parser.add_argument("--lr", type=float, help="child mode: learning rate (default: the contender's)")
    parser.add_argument("--result", help="child mode: where rank 0 writes its JSON result")
    parser.add_argument("--devices", type=int, default=4, help="CPU ranks")
    parser.add_argument("--steps", type=int, default=480, help="optimizer steps (equal for every contender)")
    parser.add_argument("--local-steps", type=int, default=8, help="H, optimizer steps between rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and rounds")
    parser.add_argument("--source", choices=SOURCES, default=default_source(),
                        help="data (default: fashion_mnist if its IDX files are installed, else mnist5k)")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp", help="vision recipe model")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--contenders", type=contender_list(CONTENDERS), default=list(DEFAULT_CONTENDERS),
                        help="driver: comma-separated contenders (default: %(default)s)")
    parser.add_argument("--lrs", type=_lr_overrides, default={},
                        help="driver: override learning rates, e.g. scaled-adam=1e-3,scaled-oasis=1e-2")
    parser.add_argument("--no-sweep", action="store_true", help="driver: one run per contender at its default lr")
    parser.add_argument("--timeout", type=float, default=300.0, help="driver: seconds per child run")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="driver: PNG path of the loss curves")
    parser.add_argument("--out", help="driver: markdown file whose section to (re)write, e.g. docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.run and not args.result:
        parser.error("--run needs --result")
    if min(args.devices, args.steps, args.batch_size, args.local_steps) < 1 or args.devices < 2:
        parser.error("--steps, --batch-size, --local-steps must be >= 1 and --devices >= 2")
    return args


# ----------------------------------------------------------------------------------------- child: one training run
def build_strategy(contender: Contender, args: argparse.Namespace) -> GossipLocalStrategy:
    return GossipLocalStrategy(local_steps=args.local_steps, topology=contender.topology, seed=args.seed,
                               scaling=contender.scaling, outer_optimizer=contender.outer_optimizer,
                               start_method="popen", process_group_backend="gloo", **contender.options)


def run_one(args: argparse.Namespace) -> None:
    """Train one contender, test the averaged model; rank 0 writes ``args.result``."""
    torch.set_num_threads(1)
    contender = CONTENDERS[args.run]
    lr = args.lr if args.lr is not None else contender.lr
    pl.seed_everything(args.seed, verbose=False)
    report, recorder = CommReport(), CurveRecorder()
    strategy = build_strategy(contender, args)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                         max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[report, recorder])
    data = ImageClassificationData(source=args.source, batch_size=args.batch_size, seed=args.seed)
    model = Classifier(contender.optimizer, args.model, lr, weight_decay=0.0)
    trainer.fit(model, datamodule=data)
    by_purpose = dict(strategy.comm_stats.bytes_sent_by_purpose)  # this rank, after fit (before test traffic)
    steps, rounds = strategy.steps, strategy.comm_stats.rounds
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    if not trainer.is_global_zero:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    result = {"contender": args.run, "seed": args.seed, "world_size": trainer.world_size, "steps": steps,
              "rounds": rounds, "lr": lr, "test_acc": float(metrics["test/acc"]),
              "test_loss": float(metrics["test/loss"]), "losses": recorder.mean_over_ranks,
              "train_seconds": recorder.train_seconds,
              "round_bytes_per_rank": [row["by_purpose"].get("round", 0) for row in report.rows],
              "by_purpose_rank0": by_purpose, "train_samples": len(data.train_dataset),
              "test_samples": len(data.test_dataset), "params": sum(p.numel() for p in params),
              "param_tensors": len(params)}
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- driver: launching
def child_command(name: str, lr: float, args: argparse.Namespace, result_path: Path) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--run", name, "--lr", repr(lr), "--devices",
            str(args.devices), "--steps", str(args.steps), "--local-steps", str(args.local_steps), "--seed",
            str(args.seed), "--result", str(result_path), "--source", args.source, "--model", args.model,
            "--batch-size", str(args.batch_size)]


def run_contender(name: str, lr: float, args: argparse.Namespace,
                  workdir: Path) -> tuple[dict[str, Any] | None, float]:
    """Run one contender at one lr (killed whole after ``args.timeout`` seconds); its result or ``None``, and the
    wall time."""
    tag = f"{name}_lr{lr:g}"
    result_path = workdir / f"{tag}.json"
    return run_child(child_command(name, lr, args, result_path), tag, result_path, workdir, args.timeout)


# ---------------------------------------------------------------------------------------------- driver: summary
@dataclass(frozen=True)
class Row:
    name: str
    result: dict[str, Any]
    wall_seconds: float

    @property
    def contender(self) -> Contender:
        return CONTENDERS[self.name]

    @property
    def accuracy(self) -> float:
        return 100.0 * self.result["test_acc"]

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(v) for v in self.result["losses"]) or not math.isfinite(self.result["test_loss"])

    @property
    def final_loss(self) -> float:
        """Mean over ranks of the training loss over the last 10% of the steps (at least 10 steps)."""
        losses = self.result["losses"]
        tail = max(10, len(losses) // 10)
        return statistics.fmean(losses[-tail:])

    @property
    def round_bytes(self) -> float:
        """Round bytes sent per rank over the whole fit, averaged over ranks."""
        return statistics.fmean(self.result["round_bytes_per_rank"])


def _find(rows: Sequence[Row], name: str) -> Row | None:
    return next((row for row in rows if row.name == name), None)


def _optimizer_text(row: Row) -> str:
    base = "Adam (per rank)" if row.contender.optimizer == "adam" else "SGD m=0.9"
    extra = ""
    if row.contender.scaling:
        opts = row.contender.options
        floor = (f"α_min={opts['scaling_alpha_min']:g}" if row.contender.scaling == "oasis"
                 else f"eps={opts['scaling_eps']:g}")
        extra = f", D: {row.contender.scaling} β={opts['scaling_beta']:g} {floor}"
    return f"{base} lr {row.result['lr']:g}{extra}"


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per contender; Δ accuracy and byte ratio against plain SGD with the same topology."""
    lines = ["| contender | topology | optimizer, γ and D | steps | test accuracy (%) | Δ vs SGD (points) | "
             "final train loss | round MB/rank | ratio to SGD bytes | training wall time (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        reference = _find(rows, row.contender.reference)
        if reference is row:
            delta = "(ref)"
        else:
            delta = f"{row.accuracy - reference.accuracy:+.2f}" if reference else "-"
        ratio = f"{row.round_bytes / reference.round_bytes:.3f}" if reference and reference.round_bytes else "-"
        loss = "diverged (NaN)" if row.diverged else f"{row.final_loss:.4f}"
        lines.append(f"| {row.contender.label} | {row.contender.topology} | {_optimizer_text(row)} | "
                     f"{row.result['steps']} | {row.accuracy:.2f} | {delta} | {loss} | {row.round_bytes / 1e6:.3f} | "
                     f"{ratio} | {row.result['train_seconds']:.0f} |")
    return "\n".join(lines)


def sweep_table(sweep: Sequence[Row], rows: Sequence[Row]) -> str:
    """The coarse lr sweep of the scaled families (every run; the picked one marked)."""
    if not sweep:
        return ""
    lines = ["Coarse lr sweep (same setup; picked = lower final train loss):", "",
             "| contender | lr | test accuracy (%) | final train loss | picked |", "|---|---:|---:|---:|---|"]
    for row in sweep:
        loss = "diverged (NaN)" if row.diverged else f"{row.final_loss:.4f}"
        picked = "yes" if any(r is row for r in rows) else ""
        lines.append(f"| {row.contender.label} | {row.result['lr']:g} | {row.accuracy:.2f} | {loss} | {picked} |")
    return "\n".join(lines)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` values (truncated at both ends)."""
    half = window // 2
    out = []
    for index in range(len(values)):
        low, high = max(0, index - half), min(len(values), index + half + 1)
        out.append(statistics.fmean(values[low:high]))
    return out


def plot_curves(rows: Sequence[Row], path: Path, local_steps: int) -> None:
    """Loss vs step: left Local SGD (complete) contenders, right gossip (random) contenders with SGD as reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    colours = dict(zip(CONTENDERS, plt.get_cmap("tab10").colors))
    gossip = [r for r in rows if r.contender.topology == "random"]
    panels = [("complete (Local SGD)", [r for r in rows if r.contender.topology == "complete"])]
    if gossip:
        panels.append(("random pairwise gossip", gossip + [r for r in rows if r.name == "sgd"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for axis, (title, panel_rows) in zip(axes[0], panels):
        for row in panel_rows:
            losses = [v if math.isfinite(v) else float("nan") for v in row.result["losses"]]
            axis.plot(range(1, len(losses) + 1), moving_average(losses, SMOOTHING), color=colours[row.name],
                      linestyle=":" if row.contender.topology == "complete" and title.startswith("random") else "-",
                      linewidth=1.5, label=f"{row.contender.label} (lr {row.result['lr']:g})")
        axis.set_title(f"{title}, H={local_steps}, {SMOOTHING}-step moving average", fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss (mean over ranks), log scale")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        axis.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versus(row: Row, reference: Row) -> str:
    return (f"{row.accuracy - reference.accuracy:+.2f} points test accuracy, final train loss {row.final_loss:.3f} vs "
            f"{reference.final_loss:.3f}")


def interpretation(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """A few sentences reading the table (numbers filled in from it)."""
    sgd = _find(rows, "sgd")
    if sgd is None:
        return ""
    parts = []
    scaled = [r for r in rows if r.contender.scaling and r.contender.topology == "complete"]
    if scaled:
        best = min(scaled, key=lambda r: math.inf if r.diverged else r.final_loss)
        parts.append("Against Local SGD with SGD momentum (the reference), the scaled contenders reached: "
                     + "; ".join(f"{r.contender.scaling} {_versus(r, sgd)}" for r in scaled)
                     + f". The best scaled family by training loss was {best.contender.scaling}.")
    adam = _find(rows, "adam")
    if adam is not None:
        parts.append(f"Per-rank Adam (local, uncommunicated moments): {_versus(adam, sgd)}.")
    diloco = _find(rows, "diloco")
    if diloco is not None:
        parts.append(f"DiLoCo's outer Nesterov step (lr 0.7, momentum 0.9) on top of the same inner SGD, same H = "
                     f"{args.local_steps}: {_versus(diloco, sgd)}; round bytes ratio "
                     f"{diloco.round_bytes / sgd.round_bytes:.3f}.")
    gossip, gossip_scaled = _find(rows, "gossip-sgd"), _find(rows, "gossip-scaled-adam")
    if gossip is not None and gossip_scaled is not None:
        parts.append(f"With random pairwise gossip instead of the exact mean, Adam scaling vs SGD: "
                     f"{_versus(gossip_scaled, gossip)}.")
    ratios = sorted({f"{r.round_bytes / sgd.round_bytes:.3f}" for r in rows
                     if r.contender.scaling and r.contender.topology == "complete" and sgd.round_bytes})
    if ratios:
        parts.append(f"Round bytes with scaling / without: {', '.join(ratios)} (the statistics double the round "
                     "message; OASIS's two extra passes per step cost compute, not bytes).")
    test, p = sgd.result["test_samples"], sgd.result["test_acc"]
    parts.append(f"Single seed: the binomial standard error of a difference between two models on {test:,} test "
                 f"images is about {100 * math.sqrt(2 * p * (1 - p) / test):.1f} points, so differences below about "
                 "1 point are not evidence either way; the learning rates of the scaled families were tuned only "
                 "coarsely (two values each).")
    return " ".join(parts)


def docs_link(path: Path) -> str:
    docs = (REPO_ROOT / "docs").resolve()
    resolved = path.resolve()
    return resolved.relative_to(docs).as_posix() if resolved.is_relative_to(docs) else str(path)


def setup_lines(args: argparse.Namespace, rows: Sequence[Row], seconds: float, load: tuple[float, float],
                plot: Path) -> str:
    first = rows[0].result
    data = ("Fashion-MNIST, 60,000 training images; test: the official 10,000 test images"
            if args.source == "fashion_mnist" else
            "mnist5k (5,000 MNIST digits): 4,000 training, 1,000 held-out test digits")
    epochs = args.steps * args.batch_size * args.devices / first["train_samples"]
    plot_link = docs_link(plot)
    scaling = "; ".join(f"{name}: " + ", ".join(f"{k.removeprefix('scaling_')}={v:g}" for k, v in opts.items())
                        for name, opts in SCALING_OPTIONS.items())
    lines = [
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; total benchmark wall time "
        f"{seconds:.0f} s; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        f"- Machine: {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}, lightning "
        f"{lightning.__version__}, backend gloo, popen launcher, every contender in its own subprocess "
        f"(timeout {args.timeout:.0f} s), one torch thread per rank.",
        f"- Model: vision recipe `{args.model}` (P = {first['params']:,} fp32 parameters), no weight decay, cosine "
        "annealing of the learning rate to 0 over the run, per step. Data: "
        f"{data}; batch size {args.batch_size} per rank.",
        f"- {args.devices} ranks, H = {args.local_steps} local steps per round, {args.steps} optimizer steps for every "
        f"contender ({args.steps // args.local_steps} rounds, global batch {args.batch_size * args.devices}, "
        f"{epochs:.2f} epochs), seed {args.seed} for all (initialization, data order, round schedule, Hutchinson "
        "probes).",
        "- γ step of the scaled contenders: `torch.optim.SGD` with momentum 0.9 fed `D⁻¹ g` (the same optimizer as "
        f"the SGD reference; only `D` and the lr differ). Scaling constants: {scaling}. `D = 1` until the first "
        "round; frozen within each phase of H steps.",
        "- Per-rank Adam: `torch.optim.Adam` (betas 0.9/0.999, eps 1e-8), moments local to each rank, only the "
        "parameters are averaged. DiLoCo: `outer_optimizer=\"diloco\"` (Nesterov SGD, lr 0.7, momentum 0.9) on "
        "`anchor − mean_i x_i`, inner SGD momentum 0.9 at the SGD reference's lr.",
    ]
    if not args.no_sweep:
        lines.append("- Learning rates, tuned only coarsely: SGD 0.05 (the recipe's) and Adam 1e-3 (its usual default) "
                     "fixed, not tuned; each scaling family ran the two values listed in the sweep table below (×3 "
                     "apart, full-length runs) and the one with the lower final training loss (not test accuracy) is "
                     "in the main table; the gossip contender reuses the lr picked for its `complete` twin. No other "
                     "hyperparameter was tuned.")
    lines += [
        "- Measured: training loss = every rank's batch loss at every step, averaged over ranks (gathered once after "
        "fit); final train loss = mean over the last 10% of the steps; test accuracy of the exact average of the "
        "replicas after fit (`trainer.test`); round MB/rank = `strategy.comm_stats.bytes_sent_by_purpose['round']` "
        "after fit, mean over ranks (MB = 10^6 bytes; excludes the start broadcast and the final average); training "
        "wall time on rank 0.",
        f"- Plot: [`{plot_link}`]({plot_link}): loss vs step, {SMOOTHING}-step centred moving average, log scale.",
    ]
    return "\n".join(lines)


def doc_section(args: argparse.Namespace, rows: Sequence[Row], sweep: Sequence[Row], failed: Sequence[str],
                command: str, seconds: float, load: tuple[float, float], plot: Path) -> str:
    plot_link = docs_link(plot)
    failures = [f"FAILED (no result within {args.timeout:.0f} s, or a crash): {name}." for name in failed]
    body = "\n\n".join([SECTION_TITLE, f"Command:\n\n```\n{command}\n```", setup_lines(args, rows, seconds, load, plot),
                        markdown_table(rows), sweep_table(sweep, rows),
                        f"![Scaled local steps: training loss]({plot_link})", *failures, interpretation(rows, args)])
    return body + "\n"


def run_driver(args: argparse.Namespace) -> None:
    command = shlex.join(["python", *sys.argv])
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    rows: list[Row] = []
    sweep: list[Row] = []
    chosen: dict[str, float] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scaling_curves_") as workdir:
        for name in args.contenders:
            if name in args.lrs:
                grid: tuple[float, ...] = (args.lrs[name],)
            elif name in INHERIT_LR and INHERIT_LR[name] in chosen:
                grid = (chosen[INHERIT_LR[name]],)
            elif name in SWEEP and not args.no_sweep:
                grid = SWEEP[name]
            else:
                grid = (CONTENDERS[name].lr,)
            candidates: list[Row] = []
            for lr in grid:
                print(f"running {name} (lr {lr:g}, {args.steps} steps) ...", flush=True)
                result, seconds = run_contender(name, lr, args, Path(workdir))
                if result is None:
                    failed.append(f"{name} (lr {lr:g})")
                    continue
                row = Row(name, result, seconds)
                candidates.append(row)
                print(f"  test accuracy {row.accuracy:.2f}%, final train loss {row.final_loss:.4f}, round "
                      f"{row.round_bytes / 1e6:.3f} MB/rank, train {result['train_seconds']:.0f} s, wall "
                      f"{seconds:.0f} s", flush=True)
            if not candidates:
                continue
            best = min(candidates, key=lambda r: math.inf if r.diverged else r.final_loss)
            chosen[name] = best.result["lr"]
            rows.append(best)
            if len(grid) > 1:
                sweep += candidates
    seconds, load = time.perf_counter() - started, (load_start, os.getloadavg()[0])
    if not rows:
        sys.exit("no run produced a result")
    plot = Path(args.plot)
    plot_curves(rows, plot, args.local_steps)
    print("\n" + markdown_table(rows) + "\n\n" + sweep_table(sweep, rows) + "\n\n" + interpretation(rows, args))
    print(f"\nPlot: {plot}\nTotal wall time: {seconds:.0f} s; load average {load[0]:.1f} at the start, "
          f"{load[1]:.1f} at the end")
    if args.out:
        write_section(Path(args.out), SECTION_TITLE,
                      doc_section(args, rows, sweep, failed, command, seconds, load, plot))
        print(f"wrote section '{SECTION_TITLE[3:]}' of {args.out}")


def main() -> None:
    args = parse_args()
    if args.run:
        run_one(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
