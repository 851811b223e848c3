"""Shared by the image-classification benchmark drivers (``adacons_curves``, ``scaling_curves``,
``quantized_accuracy``): the installed data source, a contender-list argument, the classifier with a per-step
cosine learning rate, the loss-curve recorder, and one child run in its own process group.

Each driver runs every contender as a child process (``python <driver> --run <name> ... --result <json>``);
Lightning's popen launcher re-runs that command line for ranks ``1 … n-1`` and rank 0 writes the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # ``recipes`` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO_ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from recipes.vision.data import FASHION_MNIST_DIRS  # noqa: E402
from recipes.vision.module import ImageClassifier  # noqa: E402

_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK")
"""Removed from a child's environment, so that its popen launcher starts its own ranks on a fresh port."""


def default_source() -> str:
    """``fashion_mnist`` when its IDX files are installed (see ``FASHION_MNIST_DIRS``), else ``mnist5k``."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for directory in FASHION_MNIST_DIRS:
        if all((directory / n).is_file() or (directory / f"{n}.gz").is_file() for n in names):
            return "fashion_mnist"
    return "mnist5k"


def contender_list(valid: Collection[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma-separated, non-empty list of names from ``valid``."""

    def parse(value: str) -> list[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown contender(s) {unknown}; valid: {', '.join(valid)}")
        return names

    return parse


class Classifier(ImageClassifier):
    """The recipe's classifier with a choice of optimizer and a per-step cosine learning rate.

    ``optimizer="sgd"``: ``torch.optim.SGD`` with the recipe's momentum (0.9) and ``weight_decay``; ``"adam"``:
    ``torch.optim.Adam`` (default betas, no weight decay), state local to the rank. Both anneal the learning rate
    to 0 over ``trainer.estimated_stepping_batches`` steps.
    """

    def __init__(self, optimizer: str, model: str, lr: float, weight_decay: float = 5e-4) -> None:
        super().__init__(model=model, lr=lr, weight_decay=weight_decay)
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                                        weight_decay=self.hparams.weight_decay)
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CurveRecorder(pl.Callback):
    """Keeps this rank's loss at every step; at the end of training, gathers all ranks' (one collective)."""

    def __init__(self) -> None:
        self.local: list[float] = []
        self.mean_over_ranks: list[float] = []
        self.train_seconds = float("nan")
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.local.append(float(loss))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds = time.perf_counter() - self._start
        gathered = trainer.strategy.all_gather(torch.tensor(self.local, dtype=torch.float64))
        self.mean_over_ranks = gathered.reshape(trainer.world_size, -1).mean(dim=0).tolist()


def run_child(command: list[str], tag: str, result_path: Path, workdir: Path, timeout: float,
              omp_threads: int | None = 1) -> tuple[dict[str, Any] | None, float]:
    """Run ``command`` (which writes ``result_path``) in its own process group, killed whole after ``timeout``
    seconds, with its output in ``<workdir>/<tag>.log`` and ``OMP_NUM_THREADS=omp_threads`` (``None``: inherited).

    Returns the JSON result (``None`` after printing the log's tail when there is none) and the wall time."""
    log_path = workdir / f"{tag}.log"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   cwd=REPO_ROOT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.perf_counter() - started
    if not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        print(f"FAILED: {tag} produced no result (exit code {process.returncode}, {seconds:.0f} s); "
              f"log tail:\n{tail}", flush=True)
        return None, seconds
    return json.loads(result_path.read_text()), seconds
