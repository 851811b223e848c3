"""``TranslationModule``: training with label smoothing and a warm-up schedule; BLEU/chrF by decoding.

Validation and test decode every held-out batch with the model being evaluated (with ``lightning_dopt``'s
strategies that is the exact average of the replicas, swapped in by the strategy) and score the whole held-out
set with sacreBLEU once all ranks' translations are gathered (:mod:`recipes.translation.metrics`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from recipes.translation.decoding import beam_search, greedy_decode, max_output_length
from recipes.translation.metrics import Translation, corpus_scores, gather_translations, merge_translations
from recipes.translation.model import Seq2SeqTransformer, label_smoothed_nll
from recipes.translation.tokenizer import Tokenizer

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("inverse_sqrt", "linear", "constant")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based).

    * ``inverse_sqrt``: ``min(s / w, √(w / s))`` with ``s = step + 1``: linear warm-up, then ``1/√s`` decay;
    * ``linear``: linear warm-up to 1 over ``w`` steps, then linear decay to 0 at ``total_steps``;
    * ``constant``: linear warm-up, then 1.
    """
    s, w = step + 1, max(warmup_steps, 1)
    if s < w:
        return s / w
    if schedule == "inverse_sqrt":
        return math.sqrt(w / s)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(total_steps - w + 1, 1))
    return 1.0


class TranslationModule(LightningModule):
    """Encoder-decoder Transformer translating source ids to target ids.

    Args:
        vocab_size: size of the joint vocabulary (linked from ``data.vocab_size`` by the CLI).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, positions,
            max_positions, tie_embeddings: the model (:class:`~recipes.translation.model.Seq2SeqTransformer`).
        label_smoothing: ε of the training loss.
        optimizer: ``"adamw"`` (``betas``, ``eps``) or ``"sgd"`` (``momentum``; use it with ``scaling=...``).
        lr: peak learning rate; ``weight_decay`` as in the optimizer.
        schedule, warmup_steps: learning-rate multiplier per step (:func:`lr_factor`).
        val_beam_size, test_beam_size: 1 = greedy decoding, else beam search with ``length_penalty`` α.

    Logs ``train/loss`` (label-smoothed, per token), ``val/nll`` and ``test/nll`` (per target token),
    ``val/bleu``, ``val/chrf``, ``test/bleu``, ``test/chrf`` (sacreBLEU corpus scores over all ranks).
    """

    def __init__(
        self,
        vocab_size: int = 8000,
        d_model: int = 256,
        nhead: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        positions: str = "sinusoidal",
        max_positions: int = 512,
        tie_embeddings: bool = True,
        label_smoothing: float = 0.1,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        momentum: float = 0.9,
        schedule: str = "inverse_sqrt",
        warmup_steps: int = 1000,
        val_beam_size: int = 1,
        test_beam_size: int = 4,
        length_penalty: float = 0.6,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr!r}")
        for name, value, minimum in (("warmup_steps", warmup_steps, 0), ("val_beam_size", val_beam_size, 1),
                                     ("test_beam_size", test_beam_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
        self.save_hyperparameters()
        self.model = Seq2SeqTransformer(vocab_size, d_model, nhead, num_encoder_layers, num_decoder_layers,
                                        dim_feedforward, dropout, positions, max_positions, tie_embeddings)
        self.tokenizer: Tokenizer | None = None
        self._translations: list[Translation] = []

    def setup(self, stage: str) -> None:
        """Take the tokenizer from the datamodule (needed to turn decoded ids into text for BLEU)."""
        datamodule = self.trainer.datamodule
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError("TranslationModule needs a datamodule with a `tokenizer` (TranslationData)")
        if self.tokenizer.vocab_size != self.hparams.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} pieces but the model was built for "
                             f"vocab_size={self.hparams.vocab_size}; use the same vocab_size for data and model")

    # ------------------------------------------------------------------------------------------ train
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["src"], batch["tgt_in"])
        loss_sum, _, tokens = label_smoothed_nll(logits, batch["tgt_out"], self.hparams.label_smoothing)
        loss = loss_sum / tokens
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=int(tokens))
        return loss

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Any], stage: str, beam_size: int) -> None:
        src = batch["src"]
        _, nll_sum, tokens = label_smoothed_nll(self.model(src, batch["tgt_in"]), batch["tgt_out"], 0.0)
        self.log(f"{stage}/nll", nll_sum / tokens, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=int(tokens))
        limit = min(max_output_length(src), self.hparams.max_positions - 1)
        if beam_size == 1:
            output, _ = greedy_decode(self.model, src, limit)
        else:
            output, _ = beam_search(self.model, src, beam_size, limit, alpha=self.hparams.length_penalty)
        assert self.tokenizer is not None
        hypotheses = self.tokenizer.decode(output.tolist())
        self._translations.extend(zip(batch["index"].tolist(), hypotheses, batch["ref"]))

    def _score(self, stage: str) -> None:
        hypotheses, references = merge_translations(gather_translations(self._translations))
        self._translations = []
        if not hypotheses:
            return
        scores = corpus_scores(hypotheses, references)
        # Identical on every rank (computed from the gathered set): sync_dist only tells Lightning so.
        self.log_dict({f"{stage}/bleu": scores["bleu"], f"{stage}/chrf": scores["chrf"]}, sync_dist=True,
                      prog_bar=True)
        if not self.trainer.sanity_checking:
            rank_zero_info(f"{stage}: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f} on {len(hypotheses)} "
                           f"sentences (step {self.trainer.global_step})")

    def on_validation_epoch_start(self) -> None:
        self._translations = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.hparams.val_beam_size)

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_start(self) -> None:
        self._translations = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.hparams.test_beam_size)

    def on_test_epoch_end(self) -> None:
        self._score("test")

    # ------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                          weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                        weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if hp.schedule == "linear" else 0
        factor = partial(lr_factor, schedule=hp.schedule, warmup_steps=hp.warmup_steps, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["OPTIMIZERS", "SCHEDULES", "TranslationModule", "lr_factor"]
