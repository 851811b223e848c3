"""SimulatedStrategy: N workers in one process, checked against real gloo ranks and against its own invariants."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lightning_dopt import GossipLocalStrategy, SimulatedStrategy
from lightning_dopt.replica import persistent_buffers
from lightning_models import ManualTwoOptimizerModel, RegressionModel, regression_data, state_snapshot

pytestmark = pytest.mark.timeout(240)


def fit(root: Path, strategy: Any, devices: int, steps: int = 20,
        make_model: Callable[[], L.LightningModule] = lambda: RegressionModel(batch_norm=True),
        ckpt_path: Path | None = None, **trainer_options: Any) -> tuple[L.Trainer, Any, dict[str, torch.Tensor]]:
    L.seed_everything(1)
    model = make_model()
    options = dict(default_root_dir=root, accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0)
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, state_snapshot(model)


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


@pytest.mark.parametrize("options", [
    {"local_steps": 2, "topology": "random"},
    {"local_steps": 2, "topology": "ring", "compression": "int8", "overlap": True},
], ids=["random-H2", "ring-int8-overlap"])
def test_four_simulated_workers_equal_four_gloo_ranks(tmp_path: Path, options: dict[str, Any]) -> None:
    _, _, real = fit(tmp_path / "real", GossipLocalStrategy(start_method="spawn", **options), devices=4)
    trainer, _, simulated = fit(tmp_path / "simulated", SimulatedStrategy(workers=4, **options), devices=1)
    _, _, alone = fit(tmp_path / "alone", "auto", devices=1)
    assert max_difference(simulated, real) <= 1e-5
    assert max_difference(simulated, alone) > 1e-3, "four workers on four shards must differ from one on all data"
    assert trainer.global_step == 20 and trainer.strategy.steps == 20


def test_warmup_covering_the_run_equals_ddp(tmp_path: Path) -> None:
    """Gradients averaged across simulated workers every step (without BatchNorm: DDP broadcasts rank 0's buffers
    where we average them)."""
    _, _, ddp = fit(tmp_path / "ddp", "ddp_spawn", devices=4, make_model=RegressionModel)
    _, _, simulated = fit(tmp_path / "simulated", SimulatedStrategy(workers=4, local_steps=4, warmup_steps=20),
                       devices=1, make_model=RegressionModel)
    assert max_difference(simulated, ddp) <= 1e-5


class ShardRecorder(RegressionModel):
    """Records which samples each simulated worker trains on (the batch carries the sample indices)."""

    def __init__(self) -> None:
        super().__init__(samples=48)
        self.seen: dict[int, list[int]] = {}

    def train_dataloader(self) -> DataLoader:
        data = regression_data(48)
        indexed = [(inputs, targets, torch.tensor(index)) for index, (inputs, targets) in enumerate(data)]
        return DataLoader(indexed, batch_size=4, shuffle=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets, indices = batch
        worker = self.trainer.strategy._current
        self.seen.setdefault(worker, []).extend(indices.tolist())
        return super().training_step((inputs, targets), batch_idx)


def test_each_worker_trains_on_its_own_shard_and_counts_bytes_like_a_rank(tmp_path: Path) -> None:
    trainer, model, _ = fit(tmp_path, SimulatedStrategy(workers=3, local_steps=2, topology="ring"), devices=1,
                            steps=4, make_model=ShardRecorder)
    assert sorted(model.seen) == [0, 1, 2]
    assert all(len(seen) == 16 for seen in model.seen.values())  # 48 samples / 3 workers, one epoch (4 steps × 4)
    assert sorted(index for seen in model.seen.values() for index in seen) == list(range(48))
    state_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + persistent_buffers(model)
                      if t.is_floating_point())
    for stats in trainer.strategy.gather_comm_stats():
        # a ring of 3 sends the state to both neighbours at each of the 2 rounds
        assert stats.rounds == 2 and stats.bytes_sent_by_purpose["round"] == 2 * 2 * state_bytes


def test_validation_runs_on_the_average_and_fit_ends_holding_it(tmp_path: Path) -> None:
    trainer, _, _ = fit(tmp_path, SimulatedStrategy(workers=4, local_steps=3, consensus_interval=3), devices=1,
                         steps=9, limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None)
    assert 0 < float(trainer.callback_metrics["dopt/consensus_distance"]) < 1
    assert "comm/bytes_sent" in trainer.callback_metrics
    assert trainer.strategy.comm_stats.bytes_sent_by_purpose["eval"] > 0
    assert trainer.strategy.comm_stats.bytes_sent_by_purpose["final"] > 0


@pytest.mark.parametrize("kwargs,trainer_options,message", [
    ({"workers": 0}, {}, "workers must be an integer >= 1"),
    ({"workers": 2, "min_work": 0.5}, {}, "refuses min_work=0.5"),
    ({"workers": 2, "scaling": "oasis"}, {}, "refuses scaling='oasis'"),
    ({"workers": 3, "topology": "torus"}, {}, "torus needs a square world size"),
    ({"workers": 2}, {"accumulate_grad_batches": 2}, "accumulate_grad_batches=1"),
    ({"workers": 2}, {"devices": 2}, "on one device"),
    ({"workers": 2}, {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]},
     "with a gradient scaler"),
])
def test_what_one_process_cannot_simulate_is_refused_before_training(tmp_path: Path, kwargs: dict[str, Any],
                                                                      trainer_options: dict[str, Any],
                                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        strategy = SimulatedStrategy(**kwargs)
        fit(tmp_path, strategy, **{"devices": 1, **trainer_options})


def test_manual_optimization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs automatic optimization"):
        fit(tmp_path, SimulatedStrategy(workers=2), devices=1, make_model=ManualTwoOptimizerModel)


def test_resume_from_a_checkpoint_continues_every_worker_exactly(tmp_path: Path) -> None:
    """Two epochs with a checkpoint after each; a fit resumed from the first one ends bitwise where the uninterrupted
    fit ended (every worker's replica, optimizer, random and round state travel in the checkpoint beside the
    average). 64 samples on 3 workers with batches of 4: 6 steps per epoch."""
    options = {"workers": 3, "local_steps": 2, "topology": "random", "compression": "int8"}

    def run(root: Path, ckpt_path: Path | None = None) -> tuple[L.Trainer, dict[str, torch.Tensor]]:
        L.seed_everything(1)
        model = RegressionModel(batch_norm=True)
        trainer = L.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=2,
                            strategy=SimulatedStrategy(**options), logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[ModelCheckpoint(dirpath=root, save_top_k=-1, save_on_train_epoch_end=True)])
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, state_snapshot(model)

    _, uninterrupted = run(tmp_path / "uninterrupted")
    checkpoint = tmp_path / "uninterrupted" / "epoch=0-step=6.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["lightning_dopt_simulation"]
    assert len(saved["workers"]) == 3 and saved["steps"] == 6 and saved["round"] == 3
    trainer, resumed = run(tmp_path / "resumed", checkpoint)
    assert trainer.strategy.steps == 12 and trainer.strategy.comm_stats.rounds == 6
    assert max_difference(resumed, uninterrupted) == 0.0
    fewer = SimulatedStrategy(**{**options, "workers": 2})
    with pytest.warns(UserWarning, match="simulation of 3 workers and is resumed with 2"):
        trainer, _, _ = fit(tmp_path / "fewer", fewer, devices=1, steps=8, ckpt_path=checkpoint)
    assert trainer.strategy.steps == 8 and trainer.strategy.engine.round == 4  # the schedule goes on from step 6


class RandomDraws(L.Callback):
    """Draws from the process's random stream at every batch, as a data pipeline or an augmentation would."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.draws.append(float(torch.rand(())))


def test_workers_random_streams_leave_the_process_stream_going_on(tmp_path: Path) -> None:
    draws = RandomDraws()
    fit(tmp_path, SimulatedStrategy(workers=3, local_steps=2), devices=1, steps=6, callbacks=[draws])
    assert len(draws.draws) == 6 and len(set(draws.draws)) == 6
