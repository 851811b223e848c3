"""What every recipe's command line shares: the LightningCLI subclass, W&B set-up and hyperparameter logging.

* :class:`DoptCLI`: ``LightningCLI`` with the strategy names registered (``import lightning_dopt`` happens here,
  before any parsing), W&B offline unless ``WANDB_MODE`` says otherwise, a CSV/TensorBoard fallback when wandb
  is not installed, configuration errors reported as one clear parser error before any work starts,
  :class:`LogStrategyOptions` always on, and ``fit`` followed by ``test`` of the trained model (on
  ``GossipLocalStrategy`` the exact average of the replicas) unless ``--test_after_fit=false``.
* :func:`use_offline_wandb`, :func:`wandb_available`, :func:`replace_wandb_logger`: the pieces, usable alone.
"""

from __future__ import annotations

import datetime
import importlib.util
import inspect
import os
import time
from dataclasses import fields, is_dataclass
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

import lightning_dopt  # noqa: F401 (registers gossip_local, local_sgd, adacons, ... before the CLI parses)
from lightning_dopt.callbacks import replicas
from lightning_dopt.compress import Codec

__all__ = ["WANDB_LOGGERS", "DoptCLI", "LogStrategyOptions", "plain_value", "replace_wandb_logger", "strategy_options",
           "use_offline_wandb", "wandb_available"]

#: Class paths under which a config names Lightning's W&B logger.
WANDB_LOGGERS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger",
                 "WandbLogger")

# Strategy constructor arguments that are runtime plumbing (devices, plugins), not hyperparameters.
_PLUMBING = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"}


def use_offline_wandb() -> str:
    """Set ``WANDB_MODE=offline`` unless the user set ``WANDB_MODE``; return the mode in effect.

    Offline runs need no account; upload them later with ``wandb sync <save_dir>/wandb/offline-run-*``.
    """
    return os.environ.setdefault("WANDB_MODE", "offline")


def wandb_available() -> bool:
    """Whether the ``wandb`` package is installed (without importing it)."""
    return importlib.util.find_spec("wandb") is not None


def _fallback_logger(init_args: Namespace | None) -> tuple[Namespace, str]:
    """The logger that replaces a W&B logger: TensorBoard when it is installed, else CSV, same save directory."""
    args = init_args or Namespace()
    save_dir = args.get("save_dir") or "."
    name = args.get("project") or "lightning_logs"
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        class_path = "lightning.pytorch.loggers.TensorBoardLogger"
    else:
        class_path = "lightning.pytorch.loggers.CSVLogger"
    return Namespace(class_path=class_path, init_args=Namespace(save_dir=save_dir, name=name)), class_path


def replace_wandb_logger(logger: Any, available: bool) -> tuple[Any, str | None]:
    """Return ``(logger config, message)``: W&B logger entries of a parsed ``trainer.logger`` value swapped for a
    TensorBoard (or CSV) logger writing to the same ``save_dir`` when wandb is not ``available``.

    ``logger`` is what jsonargparse parsed (a bool, None, a ``class_path`` namespace or a list of them); it is
    returned unchanged, with ``message=None``, when nothing had to change.
    """
    if available or logger is None or isinstance(logger, bool):
        return logger, None
    entries = logger if isinstance(logger, list) else [logger]
    replaced: list[Any] = []
    message = None
    for entry in entries:
        if isinstance(entry, Namespace) and entry.get("class_path") in WANDB_LOGGERS:
            entry, class_path = _fallback_logger(entry.get("init_args"))
            message = (f"wandb is not installed (pip install wandb, or pip install 'lightning-dopt[wandb]'): "
                       f"logging with {class_path.rsplit('.', 1)[-1]} to {entry.init_args.save_dir}/"
                       f"{entry.init_args.name} instead")
        replaced.append(entry)
    return (replaced if isinstance(logger, list) else replaced[0]), message


def plain_value(value: Any) -> Any:
    """A value a logger or JSON can store: numbers, strings, bools and None as they are, timedeltas in seconds, lists
    element-wise, a codec by its repr with its settings (``TopKCodec(block_size=4096, k=256, bits=4)``), anything
    else (a factory) by its name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, Codec):
        return repr(value)
    return getattr(value, "__qualname__", None) or type(value).__name__


def strategy_options(strategy: Any) -> dict[str, Any]:
    """The strategy's constructor options as currently set, e.g. ``local_steps``, ``topology``, ``compression``,
    ``process_group_backend``, ``timeout`` (seconds), plus ``class``: works for any Lightning strategy whose
    options are kept as attributes of the same name (or with a leading underscore), or as fields of a dataclass
    ``strategy.options`` (lightning_dopt's strategies)."""
    options: dict[str, Any] = {"class": f"{type(strategy).__module__}.{type(strategy).__qualname__}"}
    held = vars(strategy).get("options")
    attributes = {**vars(strategy), **({field.name: getattr(held, field.name) for field in fields(held)}
                                       if is_dataclass(held) else {})}
    for name in inspect.signature(type(strategy).__init__).parameters:
        if name in ("self", "args", "kwargs") or name in _PLUMBING:
            continue
        for attribute in (name, f"_{name}"):
            if hasattr(type(strategy), attribute) and isinstance(getattr(type(strategy), attribute), property):
                continue
            if attribute in attributes:
                options[name] = plain_value(attributes[attribute])
                break
    return options


class LogStrategyOptions(Callback):
    """Log the strategy's options and the trainer's distributed settings as hyperparameters, once per stage.

    Logged under ``strategy`` (see :func:`strategy_options`) and ``trainer`` (``world_size``, ``num_nodes``,
    ``devices_per_node``, ``accelerator``, ``precision``, ``max_epochs``, ``max_steps``,
    ``accumulate_grad_batches``, ``gradient_clip_val``), next to the model's and data module's own
    hyperparameters that Lightning logs. Runs in ``setup``, after the process group exists.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        trainer_options = {
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes, "devices_per_node": trainer.num_devices,
            "accelerator": type(trainer.accelerator).__name__, "precision": trainer.precision,
            "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": plain_value(trainer.gradient_clip_val),
        }
        for logger in trainer.loggers:
            logger.log_hyperparams({"strategy": strategy_options(trainer.strategy), "trainer": trainer_options})


class DoptCLI(LightningCLI):
    """``LightningCLI`` for the recipes (see the module docstring).

    ``python -m recipes.<name> fit --config base.yaml --config override.yaml`` trains, then tests the trained model
    (``--test_after_fit=false`` skips the test); ``test --ckpt_path FILE`` tests a checkpoint (its main file holds
    the average of the replicas). Recipes override :meth:`summary` to print their headline result.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        use_offline_wandb()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        callbacks = defaults.get("callbacks", [])
        defaults["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), LogStrategyOptions()]
        kwargs["trainer_defaults"] = defaults
        self.fit_seconds: float | None = None
        self._fit_started = 0.0
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit only: test the trained model (the average of the replicas) after fitting")

    def _subcommand_config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        logger, message = replace_wandb_logger(config.trainer.get("logger"), wandb_available())
        if message is not None:
            config.trainer.logger = logger
            rank_zero_warn(message)

    def instantiate_classes(self) -> None:
        """Instantiate data, model and trainer; a bad value is reported as a parser error (exit code 2)."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
            # jsonargparse appends a dump of the whole offending value to union-type errors: keep the reasons only
            reasons = str(error).split("\nGiven value type:")[0]
            self._parser(self.subcommand).error(f"{type(error).__name__}: {reasons}")

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        if not self._subcommand_config().get("test_after_fit", True) or self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        rank_zero_info(self.summary(results[0] if results else {}))

    def model_label(self) -> str:
        """``Averaged model (n replicas)`` when the tested model is the average of the replicas, else ``Model``."""
        count = replicas(self.trainer)
        return f"Averaged model ({count} replicas)" if count > 1 else "Model"

    def summary(self, metrics: dict[str, float]) -> str:
        """The line printed after ``fit`` + ``test``: the test metrics and the training time."""
        shown = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        return (f"Test of the trained model: {shown} (fit: {self.fit_seconds:.0f} s on {self.trainer.world_size} "
                f"processes, strategy {type(self.trainer.strategy).__name__})")
