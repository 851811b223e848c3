"""A joint source/target sentencepiece tokenizer, trained offline on the training text and cached on disk.

The cache file name is a function of the training text and the training options only
(``sha256(options, lines)``), so the same data and vocabulary size always map to the same file and any change
to either trains a new one. Training is guarded by a file lock next to the cache entry and the model is written
atomically (temporary file + ``os.replace``), so several ranks (or several jobs sharing the directory) can ask
for the same tokenizer at once: one trains it, the others wait and load it.

Ids are fixed for every tokenizer: ``pad = 0``, ``unk = 1``, ``bos = 2``, ``eos = 3``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from filelock import FileLock

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")
CACHE_ENV = "LIGHTNING_DOPT_CACHE"
_FORMAT = "lightning_dopt.translation.spm/1"


def default_cache_dir() -> Path:
    """``$LIGHTNING_DOPT_CACHE/translation`` if set, else ``~/.cache/lightning_dopt/translation``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "lightning_dopt"
    return base / "translation"


def _require_sentencepiece():  # noqa: ANN202 (module object)
    try:
        import sentencepiece
    except ImportError as error:
        raise ImportError("the translation recipe's tokenizer needs sentencepiece: "
                          "pip install 'sentencepiece>=0.2'") from error
    return sentencepiece


def cache_key(lines: Iterable[str], vocab_size: int, model_type: str, character_coverage: float) -> str:
    """Hex digest identifying a tokenizer: the training options, then every training line."""
    digest = hashlib.sha256(f"{_FORMAT}|{vocab_size}|{model_type}|{character_coverage}".encode())
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:24]


class Tokenizer:
    """Encode text to ids (``… eos``; the decoder input adds ``bos`` in front) and decode ids back to text."""

    def __init__(self, model_path: str | Path) -> None:
        spm = _require_sentencepiece()
        self.path = Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        special = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if special != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{self.path} was not trained by this recipe: its special ids are not "
                             "pad=0, unk=1, bos=2, eos=3")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text followed by ``eos``."""
        return [ids + [EOS_ID] for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence, cut at the first ``eos`` and without ``pad``/``bos``."""
        texts = []
        for seq in ids:
            seq = list(seq)
            if EOS_ID in seq:
                seq = seq[: seq.index(EOS_ID)]
            texts.append(self._sp.decode([i for i in seq if i not in (PAD_ID, BOS_ID)]))
        return texts


def train_or_load(lines: Sequence[str], vocab_size: int, cache_dir: str | Path | None = None,
                  model_type: str = "unigram", character_coverage: float = 1.0, num_threads: int = 2) -> Tokenizer:
    """The cached tokenizer for ``lines`` and these options, training and caching it first if needed.

    Safe to call from several processes at once (file lock; atomic write)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown tokenizer model_type {model_type!r}; valid choices: {', '.join(MODEL_TYPES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"vocab_size must be an integer >= 8; got {vocab_size!r}")
    if not lines:
        raise ValueError("cannot train a tokenizer on no text")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = cache_key(lines, vocab_size, model_type, character_coverage)
    path = directory / f"spm-{model_type}-{vocab_size}-{key}.model"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            model = _train(lines, vocab_size, model_type, character_coverage, num_threads)
            atomic_write(path, model)
    return Tokenizer(path)


def _train(lines: Sequence[str], vocab_size: int, model_type: str, character_coverage: float,
           num_threads: int) -> bytes:
    spm = _require_sentencepiece()
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, num_threads=num_threads, pad_id=PAD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            minloglevel=2)
    except RuntimeError as error:
        raise ValueError(f"sentencepiece could not build a {vocab_size}-piece vocabulary from {len(lines)} lines "
                         f"({error}); choose a smaller vocab_size") from error
    return buffer.getvalue()


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a synced temporary file in the same directory renamed over it: a
    crash leaves the old file or none, never a partial one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


__all__ = ["BOS_ID", "CACHE_ENV", "EOS_ID", "MODEL_TYPES", "PAD_ID", "UNK_ID", "Tokenizer", "atomic_write", "cache_key",
           "default_cache_dir", "train_or_load"]
