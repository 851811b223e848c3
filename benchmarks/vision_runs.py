"""What ``adacons_curves``, ``scaling_curves`` and ``quantized_accuracy`` share: each is a :class:`Study` that
:func:`main` runs. Every job (a contender on ``n`` ranks, a seed, a learning rate) is a child process, the driver's
command line plus ``--run <contender> ... --result <json>``: it trains the vision recipe's classifier with
``GossipLocalStrategy`` on CPU ranks and tests the exact average. Rows add bytes per rank, step and round, their
formula, the final training loss (mean of the last 10 % of the steps) and the differences to the reference's run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from harness import (QUIET, Column, Contender, child_command, comma_list, new_results, pyplot, read_result, report,
                     run_child, save_figure)
from lightning_dopt import GossipLocalStrategy
from lightning_dopt import gradients as dopt_gradients
from lightning_dopt.callbacks import CommReport
from lightning_dopt.comm import TRAINING_PURPOSES
from lightning_dopt.options import Options
from lightning_dopt.traffic import expected_traffic
from recipes.vision.data import FASHION_MNIST_DIRS, SOURCES, ImageClassificationData
from recipes.vision.models import MODELS
from recipes.vision.module import ImageClassifier

Row = dict[str, Any]
SMOOTHING, DIFFERENCE_SMOOTHING = 25, 50  # moving-average windows (steps): losses, differences to the reference
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}  # peak learning rate of contenders without their own


def traffic_formula(result: Mapping[str, Any]) -> float | None:
    """Training bytes per rank by ``lightning_dopt.traffic`` (scheduled anchor refreshes only), or ``None``."""
    try:
        return expected_traffic(Options(**result["options"]), result["params"], result["param_tensors"],
                                result["world_size"], result["steps"], buffer_numel=result["buffer_values"]).total
    except ValueError:
        return None


@dataclass(frozen=True)
class Study:
    """One benchmark. Contender settings: ``label``, ``optimizer`` (:class:`Classifier`), ``lr``, ``reference``, plot
    ``style``. ``sweep``: lrs tried per contender; ``inherit_lr``: contenders run at the lr picked for another."""

    name: str
    description: str
    contenders: dict[str, Contender]
    defaults: dict[str, Any]
    columns: list[Column]
    sweep: dict[str, tuple[float, ...]] = field(default_factory=dict)
    inherit_lr: dict[str, str] = field(default_factory=dict)
    formula: Callable[[Mapping[str, Any]], float | None] = traffic_formula
    prepare: Callable[[argparse.Namespace], None] = lambda args: None


def default_source() -> str:
    """``fashion_mnist`` when its IDX files are installed, else ``mnist5k``."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for directory in FASHION_MNIST_DIRS:
        if all((directory / n).is_file() or (directory / f"{n}.gz").is_file() for n in names):
            return "fashion_mnist"
    return "mnist5k"


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.lower() == "none" else kind(text)


def parse_args(study: Study) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=study.description)
    add, names = parser.add_argument, comma_list()
    add("--run", choices=tuple(study.contenders), help="child mode: train this one contender")
    add("--result", type=Path, help="child mode: where rank 0 writes its JSON result")
    add("--devices", type=int, default=4, help="CPU ranks (driver: unless --world-sizes)")
    add("--steps", type=_optional(int), help="optimizer steps (driver: unless --steps-per-world)")
    add("--epochs", type=_optional(int), help="epochs of --limit-train-batches batches instead of --steps")
    add("--limit-train-batches", type=_optional(lambda text: int(text) if text.isdigit() else float(text)),
        help="batches per epoch and rank (int) or fraction of an epoch (float)")
    add("--seed", type=int, default=0, help="child mode: seed of initialization, data order and round schedule")
    add("--lr", type=float, help="peak learning rate of every contender (default: the contender's)")
    add("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    add("--source", choices=SOURCES, default=default_source(), help="data (default: fashion_mnist if installed)")
    add("--model", choices=tuple(MODELS), default="mlp", help="vision recipe model")
    add("--batch-size", type=int, default=32, help="per rank, the same for every world size")
    add("--threads", type=_optional(int), default=1, help="torch threads per rank and OMP_NUM_THREADS (None: torch's)")
    add("--local-steps", type=int, default=1, help="H, optimizer steps between rounds")
    add("--topology", default="complete", help="topology of contenders without their own")
    add("--anchor-tolerance", type=_optional(float), default=0.5, help="with compression: see Options")
    add("--world-sizes", type=comma_list(int), help="driver: ranks per run, comma-separated (default: --devices)")
    add("--steps-per-world", type=comma_list(int), help="driver: optimizer steps for each of --world-sizes")
    add("--contenders", type=names, default=list(study.contenders), help="driver: comma-separated list")
    add("--extra-contenders", type=names, default=[], help="driver: contenders run at the first world size only")
    add("--seeds", type=comma_list(int), default=[0], help="driver: seeds; the first for every job")
    add("--noise-contenders", type=names, default=[], help="driver: contenders run with every seed (first world size)")
    add("--timeout", type=float, default=300.0, help="driver: seconds per child run")
    add("--results-dir", type=Path, help="driver: keep every run's result and log here (default: a temporary dir)")
    add("--plot", type=Path, help="driver: PNG of the loss curves")
    add("--json", type=Path, help="driver: write the results (harness JSON) here")
    parser.set_defaults(**study.defaults)
    args = parser.parse_args()
    study.prepare(args)
    args.world_sizes = args.world_sizes or [args.devices]
    args.steps_per_world = args.steps_per_world or [args.steps] * len(args.world_sizes)
    unknown = set(args.contenders + args.extra_contenders + args.noise_contenders) - set(study.contenders)
    if unknown or args.run and not args.result:
        parser.error(f"unknown contenders {sorted(unknown)} or --run without --result")
    if len(args.steps_per_world) != len(args.world_sizes):
        parser.error("--steps-per-world needs one value per --world-sizes entry")
    return args


class Classifier(ImageClassifier):
    """The recipe's classifier; ``"recipe"``: its own optimizer (cosine over the epochs); ``"sgd"``, the same SGD, and
    ``"adam"`` (per rank, no weight decay) anneal the learning rate to 0 over the run's steps."""

    def __init__(self, optimizer: str, model: str, lr: float, weight_decay: float) -> None:
        super().__init__(model=model, lr=lr, weight_decay=weight_decay)
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "recipe":
            return super().configure_optimizers()
        optimizer = (torch.optim.Adam(self.parameters(), lr=self.hparams.lr) if self.optimizer_name == "adam" else
                     torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                                     weight_decay=self.hparams.weight_decay))
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CurveRecorder(pl.Callback):
    """This rank's loss and gradient norm per step; at the end, the loss averaged over ranks, training time."""

    def __init__(self) -> None:
        self.local, self.grad_norms, self.mean_over_ranks = [], [], []
        self.train_seconds, self._start = float("nan"), 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        norms = [torch.linalg.vector_norm(p.grad) for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack(norms))))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.local.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds = time.perf_counter() - self._start
        gathered = trainer.strategy.all_gather(torch.tensor(self.local, dtype=torch.float64))
        self.mean_over_ranks = gathered.reshape(trainer.world_size, -1).mean(dim=0).tolist()


class WeightProbe:
    """AdaCons' weights per step (wrapping ``AdaConsCombiner._gathered_weights``): ``n·min α``, ``n·max α`` (1 =
    uniform) and whether some rank got weight 0 (the ``shift`` guard acted on a negative coefficient)."""

    def __init__(self) -> None:
        self.low, self.high, self.zero = [], [], []
        original = dopt_gradients.AdaConsCombiner._gathered_weights

        def recorded(combiner: Any, norms: Tensor, dots: Tensor) -> Tensor:
            weights = original(combiner, norms, dots)
            self.low.append(float(weights.min() * weights.shape[0]))
            self.high.append(float(weights.max() * weights.shape[0]))
            self.zero.append(bool((weights == 0).any()))
            return weights

        dopt_gradients.AdaConsCombiner._gathered_weights = recorded

    def summary(self) -> dict[str, float]:
        if not self.low:
            return {}
        return {"weight_min_mean": statistics.fmean(self.low), "weight_max_mean": statistics.fmean(self.high),
                "weight_min_min": min(self.low), "weight_max_max": max(self.high),
                "weight_zero_fraction": statistics.fmean(self.zero)}


def job_lr(contender: Contender, args: argparse.Namespace) -> float:
    """``--lr``, else the contender's ``lr``, else :data:`DEFAULT_LR` of its optimizer."""
    if args.lr is not None:
        return args.lr
    return contender.settings.get("lr") or DEFAULT_LR[contender.settings["optimizer"]]


def train(study: Study, args: argparse.Namespace) -> None:
    """Train ``--run``, test the final model; rank 0 writes losses, bytes, rounds, test metrics and model sizes."""
    contender, lr = study.contenders[args.run], job_lr(study.contenders[args.run], args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    options = {"local_steps": args.local_steps, "topology": args.topology, "anchor_tolerance": args.anchor_tolerance,
               **contender.options, "seed": args.seed}
    report, recorder, probe = CommReport(), CurveRecorder(), WeightProbe()
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, max_steps=args.steps or -1,
                         max_epochs=args.epochs or -1, limit_train_batches=args.limit_train_batches,
                         strategy=GossipLocalStrategy(**options, start_method="popen", process_group_backend="gloo"),
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[report, recorder], **QUIET)
    data = ImageClassificationData(source=args.source, batch_size=args.batch_size, seed=args.seed)
    model = Classifier(contender.settings["optimizer"], args.model, lr, args.weight_decay)
    trainer.fit(model, datamodule=data)
    steps = trainer.strategy.steps
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if trainer.is_global_zero:
        Path(args.result).write_text(json.dumps({
            "contender": contender.name, "seed": args.seed, "world_size": trainer.world_size, "steps": steps,
            "lr": lr, "options": options, "test_acc": float(metrics["test/acc"]),
            "test_loss": float(metrics["test/loss"]), "losses": recorder.mean_over_ranks,
            "grad_norm_median": statistics.median(recorder.grad_norms), "train_seconds": recorder.train_seconds,
            "rounds_per_rank": [row["rounds"] for row in report.rows],
            "bytes_by_purpose_per_rank": [row["by_purpose"] for row in report.rows],
            "train_samples": len(data.train_dataset), "test_samples": len(data.test_dataset),
            "params": sum(p.numel() for p in params), "param_tensors": len(params),
            "buffer_values": sum(b.numel() for b in buffers), "buffer_tensors": len(buffers), **probe.summary()}))


def summarize(study: Study, result: dict[str, Any], wall_seconds: float | None) -> Row:
    sent = statistics.fmean(sum(purposes.get(p, 0) for p in TRAINING_PURPOSES)
                            for purposes in result["bytes_by_purpose_per_rank"])
    steps, rounds, losses = result["steps"], statistics.fmean(result["rounds_per_rank"]), result["losses"]
    expected = study.formula(result)
    return {"label": study.contenders[result["contender"]].settings["label"], "ranks": result["world_size"], **result,
            "accuracy": 100 * result["test_acc"], "rounds": rounds, "wall_seconds": wall_seconds,
            "final_train_loss": statistics.fmean(losses[-max(10, len(losses) // 10):]),
            "diverged": not all(map(math.isfinite, [*losses, result["test_loss"]])), "bytes_per_rank": sent,
            "bytes_per_step": sent / steps, "bytes_per_round": sent / rounds if rounds else None,
            "formula_per_rank": expected, "formula_per_step": None if expected is None else expected / steps}


def reference_run(rows: list[Row], row: Row) -> Row | None:
    """The picked run of ``row``'s reference contender on the same ranks with the same seed."""
    return next((other for other in rows if other["picked"] and (other["contender"], other["ranks"], other["seed"])
                 == (row["reference"], row["ranks"], row["seed"])), None)


def compare(study: Study, rows: list[Row]) -> None:
    """Adds to every row its ``reference``, ``delta_accuracy`` (points) and ``bytes_ratio`` against its run."""
    for row in rows:
        row["reference"] = study.contenders[row["contender"]].settings["reference"]
        reference = reference_run(rows, row)
        row["delta_accuracy"] = None if reference is None else row["accuracy"] - reference["accuracy"]
        row["bytes_ratio"] = (row["bytes_per_rank"] / reference["bytes_per_rank"]
                              if reference and reference["bytes_per_rank"] else None)


def lr_grid(study: Study, name: str, args: argparse.Namespace, picked: dict[str, float]) -> tuple[float, ...]:
    """``--lr``, the lr picked for the contender ``name`` inherits from, its sweep, or its own."""
    if args.lr is None and study.inherit_lr.get(name) in picked:
        return (picked[study.inherit_lr[name]],)
    return study.sweep[name] if args.lr is None and name in study.sweep else (job_lr(study.contenders[name], args),)


def run_jobs(study: Study, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Every ``--contenders`` on every world size with the first seed (``--extra-contenders`` at the first size), then
    ``--noise-contenders`` with the other seeds, each at every lr of :func:`lr_grid`; per contender, ranks and seed the
    run with the lowest final training loss is ``picked``."""
    extra = [name for name in args.extra_contenders if name not in args.contenders]
    noise = [name for name in args.contenders if name in args.noise_contenders]
    plan = [(world, steps, args.seeds[0], args.contenders + extra * (index == 0))
            for index, (world, steps) in enumerate(zip(args.world_sizes, args.steps_per_world))]
    plan += [(args.world_sizes[0], args.steps_per_world[0], seed, noise) for seed in args.seeds[1:]]
    rows: list[Row] = []
    picked: dict[str, float] = {}
    for world, steps, seed, names in plan:
        for name in names:
            candidates = []
            for lr in lr_grid(study, name, args, picked):
                path = workdir / f"{name}_n{world}_seed{seed}_lr{lr:g}.json"
                print(f"running {path.stem} ...", flush=True)
                path.unlink(missing_ok=True)
                job = [f"--run={name}", f"--devices={world}", f"--steps={steps}", f"--seed={seed}", f"--lr={lr!r}"]
                child = run_child(child_command(*job, f"--result={path}"), path.with_suffix(".log"), args.timeout,
                                  args.threads)
                if (result := read_result(path, child)) is not None:
                    candidates.append(summarize(study, result, child.seconds))
            best = min(candidates, key=lambda r: math.inf if r["diverged"] else r["final_train_loss"], default=None)
            for row in candidates:
                row["picked"] = row is best
            picked |= {name: best["lr"]} if best else {}
            rows += candidates
    return rows


def main(study: Study) -> None:
    args = parse_args(study)
    if args.run:
        train(study, args)
        return
    results = new_results(study.name, vars(args))
    with tempfile.TemporaryDirectory(prefix=f"{study.name}_") as scratch:
        workdir = Path(args.results_dir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run_jobs(study, args, workdir)
    if not rows:
        raise SystemExit("no run produced a result")
    compare(study, rows)
    report({**results, "rows": rows}, study.columns, args.json)
    if args.plot:
        plot_curves(study, [row for row in rows if row["picked"]], args.plot)


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window // 2):i + window // 2 + 1]) for i in range(len(values))]


def plot_curves(study: Study, rows: list[Row], path: Path) -> None:
    """Per world size: the training loss (moving average), and minus the reference's. Thin: seeds after the first."""
    from matplotlib.ticker import FormatStrFormatter

    plt = pyplot()
    worlds, first_seed = sorted({row["ranks"] for row in rows}), min(row["seed"] for row in rows)
    colours = dict(zip(study.contenders, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, len(worlds), figsize=(6.4 * len(worlds), 9.0), squeeze=False, sharex="col")
    for (top, bottom), world in zip(zip(*axes), worlds):
        for row in (r for r in rows if r["ranks"] == world):
            first = row["seed"] == first_seed
            style = {"color": colours[row["contender"]], "linewidth": 1.5 if first else 0.8,
                     "linestyle": study.contenders[row["contender"]].settings.get("style", "-"),
                     "label": f"{row['label']} (lr {row['lr']:g}" + (")" if first else f", seed {row['seed']})")}
            top.plot(range(1, len(row["losses"]) + 1), moving_average(row["losses"], SMOOTHING), **style)
            reference = reference_run(rows, row)
            if reference is not None and reference is not row:
                gap = [a - b for a, b in zip(row["losses"], reference["losses"])]
                bottom.plot(range(1, len(gap) + 1), moving_average(gap, DIFFERENCE_SMOOTHING), **style)
        top.set(title=f"{world} ranks: training loss, {SMOOTHING}-step moving average", yscale="log")
        top.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        top.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set(title=f"minus the reference's loss (same ranks, seed), {DIFFERENCE_SMOOTHING}-step average",
                   xlabel="optimizer step")
        top.legend(fontsize=7)
        for axis in (top, bottom):
            axis.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, dpi=100)
