"""Small LightningModules and a recording callback for the integration tests (importable by spawned ranks)."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(samples: int = 64, features: int = 16, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    targets = inputs @ torch.randn(features, 1, generator=generator) / features**0.5 + 0.1 * torch.randn(samples, 1,
                                                                                          generator=generator)
    return TensorDataset(inputs, targets)


class RegressionModel(L.LightningModule):
    """MLP regression with SGD + momentum; ``batch_norm`` adds BatchNorm float buffers."""

    def __init__(self, batch_norm: bool = False, lr: float = 0.02, momentum: float = 0.9, batch_size: int = 4,
                 samples: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(16, 32)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(32))
        layers += [nn.ReLU(), nn.Linear(32, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self(inputs), targets)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", nn.functional.mse_loss(self(inputs), targets), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(self.hparams.samples), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(16, seed=1), batch_size=8)


class ManualTwoOptimizerModel(RegressionModel):
    """Manual optimization with one optimizer per layer, both stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        first, second = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.Adam(self.net[2].parameters())]


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class Recorder(L.Callback):
    """Saves each rank's module state at chosen moments to ``<out_dir>/<event>-rank<r>.pt``.

    ``local``: at on_validation_start (callbacks run before the strategy swaps the average in);
    ``eval``: at on_validation_epoch_start (the model being evaluated);
    ``after_eval``: at the first training batch after a validation;
    ``train_end``: at on_train_end (before the strategy's final average);
    ``stats``: the strategy's step and communication counters at on_train_end.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self._validated = False

    def _save(self, trainer: L.Trainer, event: str, payload: Any) -> None:
        if trainer.sanity_checking:
            return
        torch.save(payload, os.path.join(self.out_dir, f"{event}-rank{trainer.global_rank}.pt"))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "local", state_snapshot(pl_module))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "eval", state_snapshot(pl_module))
        self._validated = not trainer.sanity_checking

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._validated:
            self._save(trainer, "after_eval", state_snapshot(pl_module))
            self._validated = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "train_end", state_snapshot(pl_module))
        strategy = trainer.strategy
        self._save(trainer, "stats", {"steps": getattr(strategy, "steps", None),
                                      "comm": strategy.comm_stats.state_dict() if hasattr(strategy, "comm_stats")
                                      else None, "global_step": trainer.global_step})


def load_ranks(out_dir: str, event: str, world_size: int) -> list[Any]:
    return [torch.load(os.path.join(out_dir, f"{event}-rank{rank}.pt"), weights_only=False)
            for rank in range(world_size)]


class ScheduledModel(RegressionModel):
    """RegressionModel with a step-wise LR scheduler."""

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class UnshuffledSGDModel(RegressionModel):
    """Plain SGD (no momentum) where rank ``r`` of ``n`` reads samples ``r, r + n, r + 2n, ...`` in order (train with
    ``use_distributed_sampler=False``), so a test can recompute each rank's batches by hand."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr, momentum=0.0)

    def train_dataloader(self) -> DataLoader:
        shard = torch.utils.data.Subset(regression_data(self.hparams.samples),
                                        range(self.global_rank, self.hparams.samples, self.trainer.world_size))
        return DataLoader(shard, batch_size=self.hparams.batch_size, shuffle=False)


class PreconditionerRecorder(L.Callback):
    """Saves each rank's frozen preconditioner diagonal at the end of training to ``<out_dir>/diag-rank<r>.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        diagonals = [[d.clone() for d in preconditioner.diagonal()]
                     for _, preconditioner in trainer.strategy.engine.preconditioners]
        torch.save(diagonals, os.path.join(self.out_dir, f"diag-rank{trainer.global_rank}.pt"))


class NaNInjector(L.Callback):
    """Sets the first parameter of rank ``rank`` to NaN after optimizer step ``step`` (a diverged replica)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


class SleepyRegressionModel(RegressionModel):
    """RegressionModel whose ``training_step`` also sleeps ``step_sleep`` seconds (emulated compute) and counts its
    calls, so a rank's skipped steps can be told from its trained ones."""

    def __init__(self, step_sleep: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_sleep = step_sleep
        self.training_calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_calls += 1
        time.sleep(self.step_sleep)
        return super().training_step(batch, batch_idx)


class PartialWorkRecorder(L.Callback):
    """Saves each rank's step counts to ``<out_dir>/partial-rank<r>.pt`` at the end of fit: the strategy's steps and
    skipped steps, ``global_step``, the module's ``training_step`` calls and the batches whose output was marked
    ``dopt_skipped``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.marked_skipped = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.marked_skipped += bool(isinstance(outputs, dict) and outputs.get("dopt_skipped"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        torch.save({"steps": strategy.steps, "skipped": strategy.skipped_steps, "global_step": trainer.global_step,
                    "training_calls": pl_module.training_calls, "marked_skipped": self.marked_skipped,
                    "rounds": strategy.comm_stats.rounds},
                   os.path.join(self.out_dir, f"partial-rank{trainer.global_rank}.pt"))


class SyncLoggingModel(SleepyRegressionModel):
    """Logs its loss with ``sync_dist=True`` on every step: a collective inside ``training_step``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, sync_dist=True)
        return loss


class NonFiniteStepModel(RegressionModel):
    """RegressionModel whose loss is Inf on optimizer step ``bad_step`` on every rank (an fp16 overflow): a gradient
    scaler must skip that step."""

    def __init__(self, bad_step: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.bad_step else loss


class PrecisionRecorder(L.Callback):
    """Saves each rank's gradient-scaler scale, preconditioner step counts and final state to
    ``<out_dir>/precision-rank<r>.pt`` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        strategy = trainer.strategy
        torch.save({"scale": None if scaler is None else scaler.get_scale(),
                    "accumulated": [p.steps for _, p in strategy.engine.preconditioners],
                    "state": state_snapshot(pl_module)},
                   os.path.join(self.out_dir, f"precision-rank{trainer.global_rank}.pt"))
