"""The joint source/target subword vocabulary: a sentencepiece model (Kudo & Richardson, 2018)
learned on the training text of both languages, trained once and cached.

The cache key hashes the training files' bytes and every setting that changes the model, so a
different corpus, subset or vocabulary size never reuses a stale model. Files are written to a
temporary directory and renamed into place, so a reader never sees a half-written model.

    python -m slowmo_train.data.subword train.en train.de 8000 /path/to/spm-cache
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

from slowmo_train.data.vocab import BOS, EOS, PAD, UNK

log = logging.getLogger(__name__)

#: bump when the training recipe below changes, so old cached models are not reused
RECIPE_VERSION = 1


def hash_files(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def _train(paths: list[Path], vocab_size: int, out: Path) -> None:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line.rstrip("\n") for p in paths for line in open(p, encoding="utf-8") if line.strip()),
        model_writer=buffer,
        vocab_size=vocab_size,
        # small corpora (tests, smoke runs) cannot fill a large vocabulary: take what there is
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        # WMT16 has 4.5M pairs: a 2M-sentence random sample learns the same vocabulary much faster
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        num_threads=1,
        minloglevel=2,
    )
    out.write_bytes(buffer.getvalue())


def cached_model_dir(cache_dir: Path, train_files: list[Path], vocab_size: int) -> Path:
    key = hash_files(train_files, f"spm-v{RECIPE_VERSION}-vocab{vocab_size}")
    return cache_dir / "sentencepiece" / key


def train_or_load(train_files: list[Path], vocab_size: int, cache_dir: Path) -> Path:
    """Path of the cached ``spm.model`` for these files and settings, training it if absent.

    Call it on one process per node first (the others wait at a barrier, then call it too and
    find the model)."""
    folder = cached_model_dir(cache_dir, train_files, vocab_size)
    model = folder / "spm.model"
    if model.exists():
        return model
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        log.info("learning a %d-piece sentencepiece vocabulary on %s", vocab_size, ", ".join(map(str, train_files)))
        _train(train_files, vocab_size, tmp / "spm.model")
        try:
            os.replace(tmp, folder)
        except OSError:  # another node's process, sharing this cache, finished first
            if not model.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def load(model: str | os.PathLike) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model))


if __name__ == "__main__":
    src, tgt, size, cache = sys.argv[1:5]
    print(train_or_load([Path(src), Path(tgt)], int(size), Path(cache)))
