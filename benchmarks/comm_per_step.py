"""Bytes sent and wall time per optimizer step: Lightning ``ddp`` versus ``gossip_local``.

Every contender is a child run of this script (``--contender ... --result FILE``) training a ~10 M parameter MLP on
random data. Bytes per rank and step: ``ddp``, what DDP hands to all-reduce (counted by a comm hook) × ``2(n−1)/n``;
``gossip_local``, its training counters; formulas from ``lightning_dopt.traffic``. Time: rank 0's step durations after
``--skip`` steps. Setup and reading: ``docs/benchmarks.md``, "Bytes and time per optimizer step".
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations at runtime.
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from harness import QUIET, Column, child_command, load_average, new_results, read_result, report, run_child
from lightning_dopt import GossipLocalStrategy
from lightning_dopt.comm import ring_allreduce_bytes
from lightning_dopt.options import Options
from lightning_dopt.traffic import expected_traffic

LAYER_WIDTHS = (1024, 2048, 2048, 1024, 1024, 512, 10)  # 9,973,258 fp32 parameters
H_VALUES = (1, 4, 16)
CONTENDERS = [{"contender": "ddp"}] + [{"contender": "gossip_local", "local_steps": h, "topology": topology}
                                       for topology in ("random", "complete") for h in H_VALUES]  # ddp: the reference
COLUMNS = [Column("contender", "contender"), Column("local_steps", "H", "d"), Column("topology", "topology"),
           Column("bytes_per_step", "bytes/step/rank (MB)", ".3f", 1e6), Column("bytes_min", "min (MB)", ".3f", 1e6),
           Column("bytes_max", "max (MB)", ".3f", 1e6), Column("formula_per_step", "formula (MB)", ".3f", 1e6),
           Column("bytes_ratio", "ratio to DDP", ".3f"), Column("step_mean", "time/step mean (ms)", ".1f", 1e-3),
           Column("step_p10", "p10 (ms)", ".1f", 1e-3), Column("step_p90", "p90 (ms)", ".1f", 1e-3),
           Column("time_ratio", "time ratio to DDP", ".2f"),
           Column("comm_per_step", "in comm calls (ms/step)", ".1f", 1e-3), Column("load", "load", ".1f")]


class SyntheticMLP(pl.LightningModule):
    """An MLP (ReLU), cross-entropy, SGD (lr 0.01, momentum 0.9), sleeping ``compute`` s per step."""

    def __init__(self, widths: tuple[int, ...] = LAYER_WIDTHS, compute: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net, self.compute = nn.Sequential(*layers[:-1]), compute

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        time.sleep(self.compute)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def synthetic_loader(samples: int, batch_size: int, widths: tuple[int, ...] = LAYER_WIDTHS) -> DataLoader:
    """A fixed random data set (seed 0), the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, widths[0], generator=generator)
    labels = torch.randint(0, widths[-1], (samples,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False, drop_last=True)


class StepRecorder(pl.Callback):
    """The time at the end of every step and the cumulative ``comm_stats.seconds`` (``gossip_local``) or the bytes DDP
    hands to all-reduce (``ddp``; Lightning registers comm hooks only on CUDA); rank 0 writes the result."""

    def __init__(self, result_path: Path) -> None:
        self.result_path, self.ddp_payload_bytes, self.step_end_times, self.comm_seconds = result_path, 0, [], []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.strategy, GossipLocalStrategy):  # Lightning's DDPStrategy
            trainer.strategy.model.register_comm_hook(self, counting_allreduce_hook)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step_end_times.append(time.perf_counter())
        if isinstance(trainer.strategy, GossipLocalStrategy):
            self.comm_seconds.append(trainer.strategy.comm_stats.seconds)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gossip = isinstance(trainer.strategy, GossipLocalStrategy)
        stats = trainer.strategy.gather_comm_stats() if gossip else []  # collective: every rank takes part
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if trainer.global_rank == 0:
            self.result_path.write_text(json.dumps({
                "params": sum(p.numel() for p in params), "param_tensors": len(params),
                "world_size": trainer.world_size, "steps": trainer.global_step, "step_end_times": self.step_end_times,
                "comm_seconds": self.comm_seconds, "ddp_payload_bytes": self.ddp_payload_bytes,
                "training_bytes_sent_per_rank": [s.training_bytes_sent for s in stats]}))


def counting_allreduce_hook(state: StepRecorder, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's default all-reduce hook (mean over the world), counting each bucket's bytes first."""
    state.ddp_payload_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def run_contender(args: argparse.Namespace) -> None:
    pl.seed_everything(0, verbose=False)
    strategy = (DDPStrategy(start_method="popen", process_group_backend="gloo") if args.contender == "ddp" else
                GossipLocalStrategy(local_steps=args.local_steps, topology=args.topology, start_method="popen",
                                    process_group_backend="gloo"))
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, **QUIET,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[StepRecorder(Path(args.result))])
    trainer.fit(SyntheticMLP(), synthetic_loader(args.steps * args.batch_size * args.devices, args.batch_size))


def summarize(contender: dict[str, Any], result: dict[str, Any], skip: int) -> dict[str, Any]:
    """Bytes per rank and step and their formula; rank 0's step durations after ``skip`` steps."""
    steps, world, params = result["steps"], result["world_size"], result["params"]
    if contender["contender"] == "ddp":
        per_rank = [ring_allreduce_bytes(result["ddp_payload_bytes"], world) / steps]
        formula = ring_allreduce_bytes(4 * params, world)
    else:
        per_rank = [sent / steps for sent in result["training_bytes_sent_per_rank"]]
        options = Options(local_steps=contender["local_steps"], topology=contender["topology"])
        formula = expected_traffic(options, params, result["param_tensors"], world, steps).total / steps
    times, comm = result["step_end_times"], result["comm_seconds"]
    durations = sorted(end - start for start, end in zip(times[skip - 1:-1], times[skip:]))
    return {**contender, "world_size": world, "steps": steps, "params": params, "formula_per_step": formula,
            "bytes_per_step": statistics.fmean(per_rank), "bytes_min": min(per_rank), "bytes_max": max(per_rank),
            "step_mean": statistics.fmean(durations), "step_p10": durations[round(0.1 * (len(durations) - 1))],
            "step_p90": durations[round(0.9 * (len(durations) - 1))], "load": load_average(),
            "comm_per_step": (comm[-1] - comm[skip - 1]) / len(durations) if comm else None}


def run_driver(args: argparse.Namespace) -> None:
    """Every contender in a child; the table, ``--json``."""
    results = new_results("comm_per_step", vars(args))
    with tempfile.TemporaryDirectory(prefix="comm_per_step_") as workdir:
        for contender in CONTENDERS:
            options = [f"--{key.replace('_', '-')}={value}" for key, value in contender.items()]
            print(f"running {' '.join(options)} ...", flush=True)
            path = Path(workdir, "_".join(map(str, contender.values())) + ".json")
            child = run_child(child_command(*options, f"--result={path}"), path.with_suffix(".log"), args.timeout)
            if (result := read_result(path, child)) is not None:
                results["rows"].append(summarize(contender, result, args.skip))
    rows = results["rows"]
    if not rows or rows[0]["contender"] != "ddp":
        sys.exit("the ddp reference produced no result: nothing to compare with")
    for row in rows:
        row["bytes_ratio"], row["time_ratio"] = (row["bytes_per_step"] / rows[0]["bytes_per_step"],
                                                 row["step_mean"] / rows[0]["step_mean"])
    report(results, COLUMNS, args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", choices=("ddp", "gossip_local"), help="child mode: run one contender")
    parser.add_argument("--local-steps", type=int, default=1, help="H, for gossip_local")
    parser.add_argument("--topology", default="random", help="for gossip_local")
    parser.add_argument("--result", help="child mode: where rank 0 writes its JSON result")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per contender (a multiple of 16)")
    parser.add_argument("--skip", type=int, default=16, help="first steps left out of the time per step")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--devices", type=int, default=4, help="CPU ranks")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per contender subprocess")
    parser.add_argument("--json", type=Path, help="write the results (harness JSON) here")
    args = parser.parse_args()
    if args.steps % max(H_VALUES) or not 0 < args.skip < args.steps or args.contender and not args.result:
        parser.error(f"--steps must be a multiple of {max(H_VALUES)}, 0 < --skip < --steps; --contender needs --result")
    if args.contender:
        run_contender(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
