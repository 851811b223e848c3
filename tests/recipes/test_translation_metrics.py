"""Translation recipe, metrics: BLEU/chrF gathered over ranks equal the single-process corpus scores."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

from recipes.translation.metrics import merge_translations

ROOT = Path(__file__).resolve().parents[2]
needs_sacrebleu = pytest.mark.skipif(importlib.util.find_spec("sacrebleu") is None,
                                     reason="sacrebleu not installed (pip install sacrebleu)")

REFERENCES = ["le chat est sur le tapis", "il pleut depuis trois jours", "nous irons à la mer demain matin",
              "la maison blanche au bout du chemin", "un enfant lisait sous le grand arbre", "le pain est chaud",
              "les oiseaux chantent avant l'aube", "elle a fermé la porte sans bruit"]
HYPOTHESES = ["le chat est sur un tapis", "il pleut depuis deux jours", "nous allons à la mer demain",
              "la maison blanche au bout de la route", "un enfant lit sous le grand arbre", "le pain est froid",
              "des oiseaux chantent avant l'aube", "elle ferma la porte sans bruit"]


def _shards(world_size: int, seed: int) -> list[list[tuple[int, str, str]]]:
    """Triples split over ranks the way Lightning's padded DistributedSampler does: interleaved, the first items
    repeated to equalize the shares, then shuffled within each rank."""
    indices = list(range(len(REFERENCES)))
    padded = indices + indices[: (-len(indices)) % world_size]
    shards = [[(i, HYPOTHESES[i], REFERENCES[i]) for i in padded[rank::world_size]] for rank in range(world_size)]
    for shard in shards:
        random.Random(seed).shuffle(shard)
    return shards


def test_merge_keeps_one_translation_per_index_in_order() -> None:
    hypotheses, references = merge_translations(_shards(3, seed=0))
    assert hypotheses == HYPOTHESES and references == REFERENCES


@needs_sacrebleu
@pytest.mark.parametrize("world_size", [2, 3])
def test_merged_scores_equal_corpus_scores_and_differ_from_per_rank_means(world_size: int) -> None:
    from recipes.translation.metrics import corpus_scores

    corpus = corpus_scores(HYPOTHESES, REFERENCES)
    shards = _shards(world_size, seed=1)
    assert corpus_scores(*merge_translations(shards)) == corpus
    per_rank = [corpus_scores(*merge_translations([shard]))["bleu"] for shard in shards]
    assert abs(sum(per_rank) / world_size - corpus["bleu"]) > 0.1  # why per-rank BLEU must not be averaged
    with pytest.raises(ValueError, match="3 hypotheses for 2 references"):
        corpus_scores(["a", "b", "c"], ["a", "b"])


_RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from recipes.translation.metrics import corpus_scores, gather_translations, merge_translations
dist.init_process_group("gloo")
shard = json.loads(sys.argv[1])[dist.get_rank()]
scores = corpus_scores(*merge_translations(gather_translations([tuple(t) for t in shard])))
print(json.dumps(scores))
dist.destroy_process_group()
"""


@needs_sacrebleu
def test_gather_over_two_gloo_ranks_gives_the_corpus_scores() -> None:
    from recipes.translation.metrics import corpus_scores

    port = free_port()
    shards = json.dumps(_shards(2, seed=2))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, shards], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    expected = corpus_scores(HYPOTHESES, REFERENCES)
    for stdout, _ in outputs:
        assert json.loads(stdout.strip().splitlines()[-1]) == pytest.approx(expected)
