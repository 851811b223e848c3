"""The combination matrix: which settings to train, how each rank trains one, and what each rank measures.

Rows: a covering set of the supported settings of :data:`lightning_dopt.combinations.DIMENSIONS` in which every
supported pair of option values appears at least once (greedy all-pairs, seeded, so the same rows every run).
Each row trains for two epochs of four optimizer steps on every rank of a gloo world that already exists (the
ranks are plain processes started by ``tests/distributed/helpers.run_ranks``; Lightning sees them as launched
externally and runs one ``fit`` after another in them), with a checkpoint after the first epoch, then resumes from
that checkpoint. Each rank reports what it measured; ``test_combination_matrix.py`` asserts on the reports.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dopt import GossipLocalStrategy
from lightning_dopt.combinations import DIMENSIONS, Pair, Setting, completion, pair_support
from lightning_dopt.comm import ring_allreduce_bytes
from lightning_dopt.compress import make_codec
from lightning_dopt.replica import persistent_buffers
from lightning_dopt.topology import mixing_row

STEPS_PER_EPOCH = 4
EPOCHS = 2
BATCH = 4
FEATURES = 8
INIT_SCALE = 2.0 ** 16  # GradScaler's default: the first steps overflow and are skipped, differently per rank
ANCHOR_INTERVAL = 2    # compressed rows refresh their anchor within the few rounds they run


# ------------------------------------------------------------------------------------------------ the rows
def pairs_of(setting: Setting) -> set[Pair]:
    chosen = [(name, getattr(setting, name)) for name in DIMENSIONS]
    return set(itertools.combinations(chosen, 2))


def covering_rows(seed: int = 0, candidates: int = 40) -> list[Setting]:
    """Supported settings that together hold every supported value pair: repeatedly complete the first uncovered pair
    into ``candidates`` random supported settings and keep the one that covers the most uncovered pairs."""
    generator = random.Random(seed)
    uncovered = {pair for pair, rule in pair_support().items() if rule is None}
    rows: list[Setting] = []
    while uncovered:
        target = min(uncovered, key=repr)
        best: tuple[int, Setting] | None = None
        for _ in range(candidates):
            setting = completion(dict(target), order=lambda name: generator.sample(DIMENSIONS[name],
                                                                                   len(DIMENSIONS[name])))
            assert setting is not None
            gain = len(pairs_of(setting) & uncovered)
            if best is None or gain > best[0]:
                best = (gain, setting)
        assert best is not None
        rows.append(best[1])
        uncovered -= pairs_of(best[1])
    return rows


def refused_pairs() -> dict[Pair, Any]:
    """Every refused value pair, with its rule."""
    return {pair: rule for pair, rule in pair_support().items() if rule is not None}


def world_size_of(setting: Setting) -> int:
    return 4 if setting.topology == "torus" else 3  # torus needs a square world; 3 ranks make random gossip rest one


def strategy_options(setting: Setting) -> dict[str, Any]:
    """The strategy's keyword arguments for a row (state that only matters after some steps made visible early)."""
    options: dict[str, Any] = {name: getattr(setting, name) for name in
                               ("topology", "compression", "overlap", "scaling", "aggregation", "outer_optimizer",
                                "local_steps", "min_work", "warmup_steps")}
    options["anchor_interval"] = ANCHOR_INTERVAL
    if setting.scaling is not None:
        options["scaling_beta"] = 0.9
    if setting.aggregation == "adacons":
        options["adacons_momentum"] = 0.5
    return options


def trainer_options(setting: Setting) -> dict[str, Any]:
    options: dict[str, Any] = {"accumulate_grad_batches": setting.accumulate_grad_batches}
    if setting.precision == "16-mixed":  # the flag would turn into bf16 on a CPU: pass Lightning's plugin itself
        options["plugins"] = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))]
    else:
        options["precision"] = setting.precision
    return options


# ----------------------------------------------------------------------------------------------- the model
class MatrixModel(L.LightningModule):
    """Linear → BatchNorm → ReLU → Linear regression, SGD with momentum; ``manual`` steps the optimizer itself."""

    def __init__(self, manual: bool = False, world_size: int = 3, accumulate: int = 1, lr: float = 0.05) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.samples = world_size * STEPS_PER_EPOCH * accumulate * BATCH

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs).float(), targets)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(self.samples, FEATURES, generator=generator)
        targets = inputs @ torch.randn(FEATURES, 1, generator=generator) + 0.1 * torch.randn(self.samples, 1,
                                                                                              generator=generator)
        return DataLoader(TensorDataset(inputs, targets), batch_size=BATCH, shuffle=True)


def flat_state(module: nn.Module) -> torch.Tensor:
    """Every floating-point parameter and persistent buffer, as one fp64 vector."""
    tensors = [p for p in module.parameters()] + [b for b in persistent_buffers(module) if b.is_floating_point()]
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


# -------------------------------------------------------------------------------------- what a rank observes
class Observer(L.Callback):
    """Records, on one rank: the kind of every round (from the strategy's own decision), the largest change of the
    ranks' mean over a round (checked with two extra all-reduces around each round, where the docs promise an exact
    mean), the replica before the final average, and the gradient scaler's scale at the end of warm-up (kept in
    checkpoints, so a resumed fit knows it) and at the end."""

    def __init__(self, check_mean: bool, warmup_steps: int = 0) -> None:
        self.check_mean = check_mean
        self.warmup_steps = warmup_steps
        self.rounds: list[tuple[int, bool]] = []
        self.mean_change = 0.0
        self.mean_checks = 0
        self.local: torch.Tensor | None = None
        self.scale: float | None = None
        self.warmup_scale = INIT_SCALE

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_scale": self.warmup_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup_scale = state["warmup_scale"]

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and trainer.global_step == self.warmup_steps and self.warmup_steps > 0:
            self.warmup_scale = float(scaler.get_scale())  # steps the scaler skipped so far were warm-up steps

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        sync = strategy.engine.sync
        mix = sync.mix_buffers_

        def logged_mix(work: Any, round_index: int, comm: Any, refresh: bool = False) -> None:
            self.rounds.append((round_index, sync.is_refresh(round_index, refresh)))
            mix(work, round_index, comm, refresh)

        sync.mix_buffers_ = logged_mix
        if not self.check_mean:
            return
        owner, name = (strategy.engine.overlapped, "finish") if strategy.engine.overlapped is not None \
            else (sync, "gossip_round")
        applied = getattr(owner, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            before = self._mean(pl_module)
            result = applied(*args, **kwargs)
            change = (self._mean(pl_module) - before).abs().max().item()
            scale = before.abs().max().item()
            self.mean_change = max(self.mean_change, change / max(scale, 1e-12))
            self.mean_checks += 1
            return result

        setattr(owner, name, watched)

    @staticmethod
    def _mean(module: nn.Module) -> torch.Tensor:
        state = flat_state(module)
        dist.all_reduce(state)
        return state / dist.get_world_size()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # callbacks run before the strategy's final average: this is the rank's own replica
        trainer.strategy.finish_rounds()
        self.local = flat_state(pl_module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale = None if scaler is None else float(scaler.get_scale())


def mean_is_exact(setting: Setting) -> bool:
    """Whether the docs promise that a round keeps the ranks' mean (up to float rounding): uncompressed rounds of
    the topology's mixing matrix (compressed ones keep it in expectation; outer optimizers and AdaCons move it)."""
    return setting.compression is None and setting.outer_optimizer is None and setting.aggregation == "mean"


def fit(setting: Setting, world_size: int, root: str, resume_from: str | None = None) -> dict[str, Any]:
    """One fit of ``EPOCHS`` epochs (from ``resume_from`` when given) on this rank; what it observed."""
    L.seed_everything(7, verbose=False)
    # scaled steps are about lr · g / D ≈ lr per coordinate, and rmsprop's early D is too small (no bias correction)
    lr = 0.002 if setting.scaling is not None else 0.05
    model = MatrixModel(not setting.automatic_optimization, world_size, setting.accumulate_grad_batches, lr)
    strategy = GossipLocalStrategy(start_method="popen", **strategy_options(setting))
    observer = Observer(check_mean=mean_is_exact(setting), warmup_steps=setting.warmup_steps)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), every_n_epochs=1, save_top_k=-1,
                                 save_on_train_epoch_end=True, filename="{epoch}")
    trainer = L.Trainer(default_root_dir=root, accelerator="cpu", devices=world_size, num_nodes=1, strategy=strategy,
                        max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[observer, checkpoint],
                        **trainer_options(setting))
    started = time.perf_counter()
    trainer.fit(model, ckpt_path=resume_from)
    final = flat_state(model)
    finals = [torch.empty_like(final) for _ in range(world_size)]
    dist.all_gather(finals, final)
    stats = strategy.comm_stats
    return {"seconds": time.perf_counter() - started, "steps": strategy.steps, "global_step": trainer.global_step,
            "rounds": observer.rounds, "mean_change": observer.mean_change, "mean_checks": observer.mean_checks,
            "local": observer.local,
            "final_equal": all(torch.equal(other, final) for other in finals),
            "finite": bool(torch.isfinite(final).all()) and bool(torch.isfinite(observer.local).all()),
            "scale": observer.scale, "skipped": all_skipped(strategy.skipped_steps),
            "sent": dict(stats.bytes_sent_by_purpose),
            "expected": expected_bytes(setting, model, world_size, dist.get_rank(), observer.rounds,
                                       observer.scale, strategy.steps, observer.warmup_scale)}


def all_skipped(skipped: int) -> int:
    """The steps every rank skipped for partial work, summed (one all-reduce)."""
    total = torch.tensor([float(skipped)])
    dist.all_reduce(total)
    return int(total.item())


def run_rows(rank: int, world_size: int, rows: list[dict[str, Any]], root: str) -> list[dict[str, Any]]:
    """Rank entry point (``run_ranks``): every row, uninterrupted then resumed from its first-epoch checkpoint."""
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1"})
    torch.set_num_threads(1)
    reports = []
    for index, fields in enumerate(rows):
        setting = Setting(**fields)
        row_root = os.path.join(root, f"row{index}")
        try:
            first = fit(setting, world_size, os.path.join(row_root, "uninterrupted"))
            checkpoint = os.path.join(row_root, "uninterrupted", "checkpoints", "epoch=0.ckpt")
            resumed = fit(setting, world_size, os.path.join(row_root, "resumed"), resume_from=checkpoint)
        except Exception as error:  # the other ranks end too: their next collective fails or times out
            raise RuntimeError(f"row {index} ({setting}) failed: {type(error).__name__}: {error}") from error
        reports.append({"uninterrupted": first, "resumed": resumed})
    return reports


# ---------------------------------------------------------------------------------------------- the oracle
def expected_bytes(setting: Setting, model: nn.Module, world_size: int, rank: int, rounds: list[tuple[int, bool]],
                   scale: float | None, steps: int, warmup_scale: float = INIT_SCALE) -> dict[str, int]:
    """What this rank sends for ``warmup``, ``aggregate`` and ``round`` in a fit of ``steps`` steps, from the
    module's sizes and the round kinds the strategy chose (an independent count of the strategy's messages)."""
    n = world_size
    params = [p for p in model.parameters() if p.requires_grad]
    param_numel = sum(p.numel() for p in params)
    buffer_numel = sum(b.numel() for b in persistent_buffers(model) if b.is_floating_point())
    replica = param_numel + buffer_numel  # every tensor fp32: one flat group
    statistics = param_numel + 1 if setting.scaling is not None else 0  # v, and the bias-correction weight w
    expected = {"warmup": 0, "aggregate": 0, "round": 0}
    warmup_steps = min(setting.warmup_steps, steps)
    synchronous = setting.aggregation == "adacons" and setting.local_steps == 1
    expected["warmup"] = warmup_steps * (ring_allreduce_bytes(4 * (param_numel + len(params)), n)
                                         + ring_allreduce_bytes(4 * buffer_numel, n))
    if synchronous:
        combined = steps - warmup_steps
        # steps the scaler skipped after warm-up (each halves its scale): AdaCons skips its second all-reduce there
        skipped = round(math.log2(warmup_scale / scale)) if scale is not None else 0
        full = (ring_allreduce_bytes(4 * len(params), n) + 2 * ring_allreduce_bytes(4 * param_numel, n)
                + ring_allreduce_bytes(4 * n, n))
        short = ring_allreduce_bytes(4 * len(params), n) + ring_allreduce_bytes(4 * param_numel, n)
        expected["aggregate"] = (combined - skipped) * full + skipped * short \
            + combined * ring_allreduce_bytes(4 * buffer_numel, n)
        return expected
    if setting.outer_optimizer is not None and setting.compression is not None and setting.topology != "complete":
        codec = make_codec(setting.compression)  # encoded anchors (or their compressed mean) and pseudo-gradients
        for round_index, refresh in rounds:
            peers = len(mixing_row(setting.topology, rank, n, round_index, 0).send_to)
            anchors = average_round_bytes(codec, replica, rank, n) if refresh else peers * codec.payload_bytes(replica)
            expected["round"] += anchors + peers * codec.payload_bytes(replica)
        return expected
    if setting.outer_optimizer is not None and setting.topology != "complete":  # parameters, anchor, buffers
        expected["round"] = sum(len(mixing_row(setting.topology, rank, n, index, 0).send_to)
                                * 4 * (2 * param_numel + buffer_numel)
                                for index in range((steps - warmup_steps) // setting.local_steps))
        return expected
    if setting.outer_optimizer is not None and setting.compression is not None:  # compressed exact means (complete)
        rounds_run = (steps - warmup_steps) // setting.local_steps
        expected["round"] = rounds_run * average_round_bytes(make_codec(setting.compression), replica, rank, n)
        return expected
    if setting.outer_optimizer is not None or setting.aggregation == "adacons":
        per_round = ring_allreduce_bytes(4 * param_numel, n) + ring_allreduce_bytes(4 * buffer_numel, n)
        if setting.aggregation == "adacons":
            per_round += ring_allreduce_bytes(4 * param_numel, n) + ring_allreduce_bytes(4 * n, n)
        if statistics:
            per_round += ring_allreduce_bytes(4 * statistics, n)
        expected["round"] = per_round * ((steps - warmup_steps) // setting.local_steps)
        return expected
    codec = make_codec(setting.compression)
    for round_index, refresh in rounds:
        if codec is None and setting.topology == "complete":
            expected["round"] += ring_allreduce_bytes(4 * (replica + statistics), n)
        elif codec is not None and refresh:
            expected["round"] += average_round_bytes(codec, replica, rank, n)
            if statistics:
                expected["round"] += average_round_bytes(make_codec("bf16"), statistics, rank, n)
        else:
            row = mixing_row(setting.topology, rank, n, round_index, 0)
            if codec is None:
                message = 4 * (replica + statistics)
            elif row.send_to or row.recv_from:
                message = codec.payload_bytes(replica) + 2 * statistics
            else:
                message = 0
            expected["round"] += len(row.send_to) * message
    return expected


def average_round_bytes(codec: Any, numel: int, rank: int, n: int) -> int:
    """A compressed reduce-scatter (each peer's block-aligned chunk, encoded) then all-gather (the own chunk's
    encoded mean, to every peer)."""
    align = getattr(codec, "block_size", 1)
    per_rank = -(-(-(-numel // align)) // n)
    chunks = [(min(k * per_rank * align, numel), min((k + 1) * per_rank * align, numel)) for k in range(n)]

    def payload(size: int) -> int:
        return codec.payload_bytes(size) if size else 0

    scatter = sum(payload(stop - start) for peer, (start, stop) in enumerate(chunks) if peer != rank)
    start, stop = chunks[rank]
    return scatter + (n - 1) * payload(stop - start)

