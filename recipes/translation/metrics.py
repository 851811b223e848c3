"""Corpus BLEU and chrF (sacreBLEU) over the translations of every rank.

Each rank decodes its share of the held-out batches and keeps ``(index, hypothesis, reference)`` triples.
:func:`gather_translations` collects every rank's triples; :func:`merge_translations` keeps one triple per pair
index (Lightning's ``DistributedSampler`` repeats a few batches so that ranks get equal shares) in index order;
corpus scores are then computed once over the whole held-out set. That is exactly the single-process corpus
score: BLEU is not a mean of per-sentence or per-rank scores (its n-gram counts and lengths are summed before the
geometric mean and the brevity penalty).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch.distributed as dist

Translation = tuple[int, str, str]


def _sacrebleu():  # noqa: ANN202 (module object)
    try:
        import sacrebleu
    except ImportError as error:
        raise ImportError("the translation recipe's BLEU/chrF need sacrebleu: pip install 'sacrebleu>=2.3'") from error
    return sacrebleu


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacreBLEU corpus BLEU (13a tokenization) and chrF (character 6-grams, β = 2) of one reference per line."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    sacrebleu = _sacrebleu()
    return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
            "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score}


def merge_translations(shards: Iterable[Iterable[Translation]]) -> tuple[list[str], list[str]]:
    """(hypotheses, references) in pair-index order, one per index (the first seen wins)."""
    merged: dict[int, tuple[str, str]] = {}
    for shard in shards:
        for index, hypothesis, reference in shard:
            merged.setdefault(int(index), (hypothesis, reference))
    ordered = [merged[index] for index in sorted(merged)]
    return [h for h, _ in ordered], [r for _, r in ordered]


def gather_translations(local: list[Translation]) -> list[list[Translation]]:
    """Every rank's triples, in rank order (collective when a process group is running; else ``[local]``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    shards: list[list[Translation] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local)
    return [shard or [] for shard in shards]


__all__ = ["Translation", "corpus_scores", "gather_translations", "merge_translations"]
