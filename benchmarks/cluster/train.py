"""One rank of the emulated-cluster benchmark (started by ``bench.py`` in its namespace, one process per emulated GPU):
trains an MLP on Fashion-MNIST with one contender strategy; :class:`Recorder` writes what it measured during training
(evaluations excluded) to ``<result-dir>/rank<k>.json``.
"""

# No ``from __future__ import annotations``: DDP checks comm hooks' annotations at runtime.
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lightning_dopt import GossipLocalStrategy, GroupMaxCodec, TopKCodec  # noqa: E402
from lightning_dopt.options import NOLOCO_OUTER, PRESETS  # noqa: E402
from recipes.vision.data import load_idx_dataset  # noqa: E402

DOPT_TRAINING_PURPOSES = ("round", "warmup", "aggregate", "control")
CONTENDERS = ("ddp", "ddp_powersgd", "ddp_fp16", "ddp_bf16", "post_local_sgd", "local_sgd", "gossip_local",
              "gossip_local_int8", "gossip_local_int8_overlap", "gossip_local_int4", "gossip_local_int8_h8",
              "gossip_local_int8_node", "gossip_local_int8_node_overlap", "gossip_local_int8_h2_overlap",
              "gossip_local_topk_h1", "gossip_local_topk_h2", "sparse_local_sgd", "sparse_diloco", "sparse_diloco_h2",
              "sparse_diloco_m09", "sparse_local_sgd_k256", "sparse_local_sgd_k256_h2",
              "sparse_local_sgd_k256_h2_overlap", "sparse_local_sgd_k256_b8_h2",
              "sparse_local_sgd_k256_h1", "sparse_local_sgd_k384_h2", "sparse_local_sgd_k128_m384_h1",
              "sparse_local_sgd_k128_m384_h2", "sparse_local_sgd_k128_m384_h3", "sparse_local_sgd_g16_m8_h2",
              "sparse_local_sgd_g16_m4_h2", "sparse_local_sgd_g32_m8_h2", "sparse_local_sgd_g32_m4_h2", "noloco",
              "noloco_int8", "adacons", "no_sync")
SPARSE_PRESET = PRESETS["sparse_local_sgd"][0]
# the preset's TopK codecs: until the morning of 2026-12-06 (k = 256), then until GroupMaxCodec (k = 128, mean_k = 384)
SPARSE_K256 = {**SPARSE_PRESET, "compression": TopKCodec(k=256, bits=4)}
SPARSE_K128_M384 = {**SPARSE_PRESET, "compression": TopKCodec(k=128, bits=4, mean_k=384)}
# GossipLocalStrategy options of the contenders with rounds, over local_steps and warmup (_h<k>: H = k whatever they say)
DOPT_CONTENDERS = {"local_sgd": {"topology": "complete"}, "gossip_local": {},
                   "gossip_local_int8": {"compression": "int8"},
                   "gossip_local_int8_overlap": {"compression": "int8", "overlap": True},
                   "gossip_local_int4": {"compression": "int4"},
                   "gossip_local_int8_h8": {"compression": "int8", "local_steps": 8},
                   "gossip_local_int8_node": {"compression": "int8", "hierarchy": "node"},
                   "gossip_local_int8_node_overlap": {"compression": "int8", "hierarchy": "node", "overlap": True},
                   "gossip_local_int8_h2_overlap": {"compression": "int8", "local_steps": 2, "overlap": True},
                   # TopKCodec's defaults: 64 of every 4,096 values, 2-bit values (0.0071 of fp32), error feedback
                   "gossip_local_topk_h1": {"compression": TopKCodec(), "local_steps": 1},
                   "gossip_local_topk_h2": {"compression": TopKCodec(), "local_steps": 2},
                   # the TopK-compressed mean pseudo-gradient: applied as it is (Local SGD), or by an outer
                   # Nesterov SGD (lr 0.5, momentum 0.5; _m09: DiLoCo's lr 0.7, momentum 0.9)
                   "sparse_local_sgd": {"topology": "complete", "compression": TopKCodec()},
                   "sparse_local_sgd_k256": {"topology": "complete", "compression": TopKCodec(k=256, bits=4)},
                   # the preset sparse_local_sgd (group max of every 16 values of the ranks' chunks, of every 8 of
                   # the means, 4 bits, H = 2) and other groups (bytes: g16_m4 = k128_m384, 1.45x the preset's;
                   # g32_m8 0.84x; g32_m4 1.29x); the preset's TopK codec until then (128 of 4,096 values of the
                   # ranks' chunks, 384 of the means, 4 bits) at H = 1, 2, 3; the preset before (k = 256 for both)
                   # and variants of it: overlap, 8-bit values (1.25x its bytes), H = 1, 384 of every 4,096 values
                   "sparse_local_sgd_g16_m8_h2": SPARSE_PRESET,
                   "sparse_local_sgd_g16_m4_h2": {**SPARSE_PRESET, "compression": GroupMaxCodec(16, 4, mean_group=4)},
                   "sparse_local_sgd_g32_m8_h2": {**SPARSE_PRESET, "compression": GroupMaxCodec(32, 4, mean_group=8)},
                   "sparse_local_sgd_g32_m4_h2": {**SPARSE_PRESET, "compression": GroupMaxCodec(32, 4, mean_group=4)},
                   "sparse_local_sgd_k128_m384_h2": SPARSE_K128_M384,
                   "sparse_local_sgd_k128_m384_h1": {**SPARSE_K128_M384, "local_steps": 1},
                   "sparse_local_sgd_k128_m384_h3": {**SPARSE_K128_M384, "local_steps": 3},
                   "sparse_local_sgd_k256_h2": SPARSE_K256,
                   "sparse_local_sgd_k256_h2_overlap": {**SPARSE_K256, "overlap": True},
                   "sparse_local_sgd_k256_b8_h2": {**SPARSE_K256, "compression": TopKCodec(k=256, bits=8)},
                   "sparse_local_sgd_k256_h1": {**SPARSE_K256, "local_steps": 1},
                   "sparse_local_sgd_k384_h2": {**SPARSE_K256, "compression": TopKCodec(k=384, bits=4)},
                   # the registered presets: an outer Nesterov SGD per rank over random gossip, exact or int8 messages
                   "noloco": PRESETS["noloco"][0], "noloco_int8": PRESETS["noloco_int8"][0],
                   "sparse_diloco": {"topology": "complete", "compression": TopKCodec(),
                                     "outer_optimizer": NOLOCO_OUTER},
                   "sparse_diloco_h2": {"topology": "complete", "compression": TopKCodec(), "local_steps": 2,
                                        "outer_optimizer": NOLOCO_OUTER},
                   "sparse_diloco_m09": {"topology": "complete", "compression": TopKCodec(),
                                         "outer_optimizer": "diloco"}}
POWERSGD_BUCKET_MB = 256
TORCH_HOOKS = {"ddp_powersgd", "ddp_fp16", "ddp_bf16", "post_local_sgd"}


class MLPClassifier(pl.LightningModule):
    """784 → hidden → hidden → 10 MLP (ReLU), cross-entropy, SGD with momentum and a per-step cosine schedule;
    validation: the accuracy of the model as it is then (the correct counts of the ranks' test shards summed)."""

    def __init__(self, hidden: int, lr: float, momentum: float, total_steps: int, compute_sleep: float = 0.0,
                 sleep_samples: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 10))
        self.lr, self.momentum, self.total_steps = lr, momentum, total_steps
        self.compute_sleep, self.sleep_samples = compute_sleep, sleep_samples
        self.last_accuracy: float | None = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The batch's loss; with ``compute_sleep`` > 0 (accelerator emulation), that of its first ``sleep_samples``
        examples after ``compute_sleep`` seconds of idle CPU, as a GPU host's while the device computes."""
        inputs, labels = batch
        if self.compute_sleep > 0:
            inputs, labels = inputs[:self.sleep_samples], labels[:self.sleep_samples]
            time.sleep(self.compute_sleep)
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros(2, dtype=torch.float64)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self._correct += torch.tensor([(self.net(inputs).argmax(1) == labels).sum().item(), len(labels)],
                                      dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._correct.clone(), reduce_op="sum")
        self.last_accuracy = float(100.0 * total[0] / total[1])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        cosine = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def fashion_mnist(test_limit: Optional[int]) -> tuple[TensorDataset, TensorDataset]:
    """The training and (the first ``test_limit``) test images, normalized with the training mean/std."""
    x_train, y_train = load_idx_dataset(None, train=True)
    x_test, y_test = load_idx_dataset(None, train=False)
    if test_limit:
        x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    train = x_train.float().div_(255.0)
    mean, std = train.mean(), train.std()
    train.sub_(mean).div_(std)
    test = x_test.float().div_(255.0).sub_(mean).div_(std)
    return TensorDataset(train, y_train), TensorDataset(test, y_test)


def build_strategy(name: str, args: argparse.Namespace) -> Strategy | str:
    """The contender's strategy. DDP-based ones get their comm hook as Lightning's documented
    ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` arguments; Lightning registers them only on CUDA, so on
    CPU :class:`RegisterCommHook` registers the same state and hook on the DDP-wrapped model."""
    gloo = {"process_group_backend": "gloo"}
    if name == "ddp":
        return DDPStrategy(**gloo)
    if name == "ddp_powersgd":
        # One DDP bucket (bucket_cap_mb above the model's size): with several buckets on gloo, powerSGD_hook issues
        # its second and third all-reduces from future callbacks whose order differs between ranks, and gloo aborts
        # on the mismatched collectives ("Received data size doesn't match expected size").
        # start_powerSGD_iter=2: the smallest value torch accepts with error feedback / warm start.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                            start_powerSGD_iter=2, min_compression_rate=2, use_error_feedback=True,
                                            warm_start=True)
        return DDPStrategy(ddp_comm_state=state, ddp_comm_hook=powerSGD_hook.powerSGD_hook,
                           bucket_cap_mb=POWERSGD_BUCKET_MB, **gloo)
    if name == "ddp_fp16":
        return DDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook, **gloo)
    if name == "ddp_bf16":
        hook = default_hooks.bf16_compress_hook if torch.cuda.is_available() else bf16_compress_hook_on_cpu
        return DDPStrategy(ddp_comm_hook=hook, **gloo)
    if name == "post_local_sgd":
        # One process per node: the "intra-node" subgroup is each rank alone, so post_local_gradient_allreduce=False
        # (no gradient communication after start_localSGD_iter) is exactly the subgroup all-reduce; with the default
        # True and subgroup=None the hook calls dist.new_subgroups(), which sizes groups by the CUDA device count.
        state = post_localSGD_hook.PostLocalSGDState(process_group=None, subgroup=None,
                                                     start_localSGD_iter=args.warmup,
                                                     post_local_gradient_allreduce=False)
        return DDPStrategy(ddp_comm_state=state, ddp_comm_hook=post_localSGD_hook.post_localSGD_hook,
                           model_averaging_period=args.local_steps, **gloo)
    if name == "adacons":
        return "adacons"  # the registered name: AdaCons gradient combination every step (local_steps=1)
    if name == "no_sync":  # reference: local training only (a round never comes), the compute floor of a step
        return GossipLocalStrategy(local_steps=10**9, **gloo)
    return GossipLocalStrategy(**{"local_steps": args.local_steps, "warmup_steps": args.warmup, **gloo,
                                  **DOPT_CONTENDERS[name]})


def bf16_compress_hook_on_cpu(process_group: dist.ProcessGroup,
                              bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's ``bf16_compress_hook``, unchanged, under another name: ``DistributedDataParallel.register_comm_hook``
    refuses a hook *named* ``bf16_compress_hook`` unless CUDA 11+ with NCCL 2.10+ (or XPU/XCCL) is present, although
    the hook only casts to bf16, all-reduces and casts back, which gloo does on CPU."""
    return default_hooks.bf16_compress_hook(process_group, bucket)


class RegisterCommHook(pl.Callback):
    """Registers the strategy's ``ddp_comm_hook`` on the DDP model where Lightning did not (on CPU)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        hook = getattr(strategy, "_ddp_comm_hook", None)
        if hook is None or strategy.root_device.type == "cuda":
            return
        assert isinstance(strategy.model, DistributedDataParallel)
        strategy.model.register_comm_hook(getattr(strategy, "_ddp_comm_state", None), hook)


class AllReduceCounter:
    """Adds up the payload handed to ``torch.distributed.all_reduce`` (by torch's hooks) while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.payload_bytes = 0
        self._original = dist.all_reduce

        def counting_all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.payload_bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce  # type: ignore[assignment]


class AverageForEvaluation(pl.Callback):
    """Post-local SGD: evaluate the exact average (an all-reduce), then restore each rank's replica."""

    def __init__(self) -> None:
        self._saved: list[Tensor] = []

    @torch.no_grad()
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.parameters())
        self._saved = [p.detach().clone() for p in params]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.all_reduce(flat)
        for p, mean in zip(params, (flat / trainer.world_size).split([p.numel() for p in params])):
            p.copy_(mean.view_as(p))

    @torch.no_grad()
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p, saved in zip(pl_module.parameters(), self._saved):
            p.copy_(saved)
        self._saved = []


class Recorder(pl.Callback):
    """Training clock, evaluations, bytes (counted and on the wire) and time in communication calls."""

    def __init__(self, name: str, result_path: Path, counter: AllReduceCounter | None, interface: str) -> None:
        self.name, self.result_path, self.counter = name, result_path, counter
        self.tx_path = Path(f"/sys/class/net/{interface}/statistics/tx_bytes")
        self.clock: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.excluded, self.eval_tx, self._start, self._tx_start = 0.0, 0, 0.0, 0
        self._eval_started: tuple[float, int] | None = None
        self.excluded_comm_seconds = self._comm_at_eval_start = 0.0  # excluded: the start broadcast and evaluations

    def _tx(self) -> int:
        return int(self.tx_path.read_text()) if self.tx_path.exists() else 0

    def _settled_tx(self, limit: float = 3.0) -> int:
        """The tx counter once it stops moving (data a finished collective left in the socket buffer and the tbf
        queue is still training traffic), waiting at most ``limit`` seconds; called inside evaluation windows only."""
        deadline, last = time.perf_counter() + limit, self._tx()
        while time.perf_counter() < deadline:
            time.sleep(0.03)
            if (now := self._tx()) == last:
                return now
            last = now
        return last

    @staticmethod
    def _comm_seconds(trainer: pl.Trainer) -> float:
        stats = getattr(trainer.strategy, "comm_stats", None)
        return float(stats.seconds) if stats is not None else 0.0

    def _counted(self, trainer: pl.Trainer) -> float:
        if self.counter is not None:
            return self.counter.payload_bytes
        stats = getattr(trainer.strategy, "comm_stats", None)
        return float(sum(stats.bytes_sent_by_purpose.get(p, 0) for p in DOPT_TRAINING_PURPOSES)) if stats else 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._tx_start = time.perf_counter(), self._tx()
        self.excluded_comm_seconds = self._comm_seconds(trainer)  # the start broadcast, before training

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.counter is not None:
            self.counter.active = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.counter is not None:
            self.counter.active = False
        self.clock.append(time.perf_counter() - self._start - self.excluded)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # overlap=True: the strategy first waits for the round in flight; that wait is training time (it would
        # otherwise happen at the next round), so do it here, before the evaluation clock starts.
        if callable(finish_rounds := getattr(trainer.strategy, "finish_rounds", None)):
            finish_rounds()
        started, self._comm_at_eval_start = time.perf_counter(), self._comm_seconds(trainer)
        self._eval_started = (started, self._settled_tx())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._eval_started is None:
            return
        (started, tx), self._eval_started = self._eval_started, None
        self.excluded += (seconds := time.perf_counter() - started)
        self.eval_tx += self._tx() - tx
        self.excluded_comm_seconds += self._comm_seconds(trainer) - self._comm_at_eval_start
        self.evals.append({"step": trainer.global_step, "clock": self.clock[-1] if self.clock else 0.0,
                           "accuracy": pl_module.last_accuracy, "eval_seconds": seconds,
                           "counted_bytes": self._counted(trainer), "wire_tx_bytes": self._tx() - self._tx_start
                           - self.eval_tx})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        environment = trainer.strategy.cluster_environment
        result = {
            "contender": self.name, "global_rank": trainer.global_rank, "world_size": trainer.world_size,
            "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes,
            "cluster_environment": type(environment).__name__,
            "creates_processes_externally": bool(environment and environment.creates_processes_externally),
            "strategy": type(trainer.strategy).__name__, "backend": dist.get_backend(),
            "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "params": sum(p.numel() for p in pl_module.parameters()), "steps": trainer.global_step,
            "clock": self.clock, "evals": self.evals, "counted_bytes": self._counted(trainer),
            "counted_kind": "allreduce_payload" if self.counter is not None else (
                "comm_stats_sent" if hasattr(trainer.strategy, "comm_stats") else "none"),
            "wire_tx_bytes": self._tx() - self._tx_start - self.eval_tx, "wire_tx_eval_bytes": self.eval_tx,
            "torch_threads": torch.get_num_threads(),
            "comm_seconds": self._comm_seconds(trainer) - self.excluded_comm_seconds
            if hasattr(trainer.strategy, "comm_stats") else None,
            "comm_seconds_exclude_start": True,
        }
        self.result_path.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--result-dir", required=True)
    parser.add_argument("--config", type=json.loads, required=True, help="bench.py's configuration, as JSON")
    cli = parser.parse_args()
    args = argparse.Namespace(**cli.config)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    pl.seed_everything(args.seed, verbose=False)
    train, test = fashion_mnist(args.test_limit or None)
    counter = AllReduceCounter() if cli.contender in TORCH_HOOKS else None
    callbacks = [Recorder(cli.contender, Path(cli.result_dir) / f"rank{rank}.json", counter,
                          os.environ.get("GLOO_SOCKET_IFNAME", "lo")),
                 *([AverageForEvaluation()] if cli.contender == "post_local_sgd" else []), RegisterCommHook()]
    per_node = getattr(args, "ranks_per_node", 1)  # one process per emulated GPU, numbered node by node
    trainer = pl.Trainer(
        accelerator="cpu", devices=per_node, num_nodes=world_size // per_node,
        strategy=build_strategy(cli.contender, args),
        max_steps=args.steps, max_epochs=-1, val_check_interval=args.eval_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, deterministic=False)
    assert trainer.global_rank == rank and trainer.world_size == world_size, (
        f"Lightning read rank {trainer.global_rank}/{trainer.world_size} from the environment, expected "
        f"{rank}/{world_size}")
    model = MLPClassifier(args.hidden, args.lr, args.momentum, args.steps, args.compute_sleep)
    trainer.fit(model, train_dataloaders=DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True),
                val_dataloaders=DataLoader(test, batch_size=1000))


if __name__ == "__main__":
    main()
