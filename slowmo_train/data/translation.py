"""Parallel text for translation: raw files, the Multi30k download, and subword-encoded corpora.

Layout at ``data.root`` (how WMT16 and Multi30k are distributed, one sentence a line,
line-aligned): ``train.{src}``, ``train.{tgt}``, ``valid.*``, ``test.*``. Multi30k (Elliott et al.,
2016) is fetched there when missing and ``data.download`` allows it: the published gzip files of
github.com/multi30k/dataset (``data/task1/raw``), whose base URL ``SLOWMO_TRAIN_MULTI30K_URL``
overrides (tests point it at a local stand-in).

Encoded corpora are kept as flat int32 token arrays plus offsets (4.5M WMT16 pairs fit in a few
hundred MB) and cached next to the sentencepiece model, keyed by the text files' bytes.

    python -m slowmo_train.data.translation /path/to/multi30k    # fetches Multi30k if missing
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slowmo_train.data.cifar10 import DatasetError
from slowmo_train.data.subword import hash_files

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_URL_ENV = "SLOWMO_TRAIN_MULTI30K_URL"
#: our split name -> the file stem Multi30k publishes (test2016 is the SlowMo-era test set)
MULTI30K_FILES = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


class TranslationDataError(DatasetError):
    """The text at data.root cannot be used; the message says why and what to do."""


def split_files(root: str | os.PathLike, split: str, src: str, tgt: str) -> tuple[Path, Path]:
    root = Path(root).expanduser()
    return root / f"{split}.{src}", root / f"{split}.{tgt}"


def missing_files(root: str | os.PathLike, src: str, tgt: str) -> list[Path]:
    return [p for split in SPLITS for p in split_files(root, split, src, tgt) if not p.is_file()]


def _offline_message(root, missing: list[Path], why: str) -> str:
    return (
        f"data.root={str(root)!r} lacks {', '.join(p.name for p in missing)} ({why}). Point data.root at a "
        "folder holding line-aligned train/valid/test text (e.g. ../shared/data/translation/multi30k), "
        "or set data.download=auto to fetch Multi30k there when online"
    )


def download_multi30k(root: str | os.PathLike, src: str, tgt: str) -> None:
    """Fetch Multi30k's raw gzip files into ``root`` as ``{split}.{lang}`` (written atomically)."""
    base = os.environ.get(MULTI30K_URL_ENV, MULTI30K_URL).rstrip("/")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for split, stem in MULTI30K_FILES.items():
        for lang in (src, tgt):
            out = root / f"{split}.{lang}"
            if out.is_file():
                continue
            url = f"{base}/{stem}.{lang}.gz"
            log.info("downloading %s", url)
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=root)
            try:
                with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
                    with gzip.GzipFile(fileobj=r) as z:
                        shutil.copyfileobj(z, f)
                os.replace(tmp, out)
            except (OSError, EOFError) as err:
                raise TranslationDataError(
                    f"cannot fetch {url}: {err}. "
                    + _offline_message(root, missing_files(root, src, tgt), "download failed")
                ) from err
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)


def ensure_text(root: str | os.PathLike, src: str, tgt: str, mode: str) -> None:
    """Make sure the raw text is at ``root``: fetch Multi30k if missing and ``mode`` allows it."""
    missing = missing_files(root, src, tgt)
    if not missing:
        return
    if mode == "false":
        raise TranslationDataError(_offline_message(root, missing, "data.download=false"))
    if {src, tgt} != {"en", "de"}:
        raise TranslationDataError(
            _offline_message(root, missing, f"only Multi30k en/de is downloadable, not {src}-{tgt}")
        )
    download_multi30k(root, src, tgt)


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@dataclass
class EncodedSide:
    """Sentences of one language as one flat token array: sentence i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len = sentences + 1

    @classmethod
    def from_lists(cls, seqs: list[list[int]]) -> EncodedSide:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class ParallelCorpus:
    src: EncodedSide
    tgt: EncodedSide

    def __len__(self) -> int:
        return len(self.src)


def _encode_lines(sp, lines: list[str], chunk: int = 100_000) -> EncodedSide:
    # chunks keep Python's per-int overhead bounded (WMT16: 4.5M sentences a side)
    parts = [EncodedSide.from_lists(sp.encode(lines[i : i + chunk])) for i in range(0, len(lines), chunk)]
    if not parts:
        return EncodedSide(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
    shifts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
    offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + shift for p, shift in zip(parts, shifts)])
    return EncodedSide(np.concatenate([p.tokens for p in parts]), offsets)


def encode_split(sp, src_path: Path, tgt_path: Path) -> ParallelCorpus:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise TranslationDataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
            "the two sides of a split must be line-aligned"
        )
    return ParallelCorpus(_encode_lines(sp, src), _encode_lines(sp, tgt))


def encoded_cache_path(model_dir: Path, src_path: Path, tgt_path: Path) -> Path:
    return model_dir / f"encoded-{hash_files([src_path, tgt_path])}.pt"


def encode_or_load(sp, model_dir: Path, src_path: Path, tgt_path: Path) -> ParallelCorpus:
    """The split encoded with the model in ``model_dir``; cached there (atomically) after the first call."""
    cache = encoded_cache_path(model_dir, src_path, tgt_path)
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
        return ParallelCorpus(
            *(EncodedSide(blob[f"{side}_tokens"].numpy(), blob[f"{side}_offsets"].numpy()) for side in ("src", "tgt"))
        )
    corpus = encode_split(sp, src_path, tgt_path)
    fd, tmp = tempfile.mkstemp(prefix=".encoded-", dir=model_dir)
    with os.fdopen(fd, "wb") as f:
        torch.save(
            {
                f"{side}_{part}": torch.from_numpy(getattr(getattr(corpus, side), part))
                for side in ("src", "tgt")
                for part in ("tokens", "offsets")
            },
            f,
        )
    os.replace(tmp, cache)
    return corpus


def training_indices(corpus: ParallelCorpus, subset: int | None, max_positions: int, seed: int) -> np.ndarray:
    """Pairs used for training: the first ``subset`` after a fixed shuffle (all if None), without pairs
    longer than ``max_positions`` tokens (end-of-sentence included) on either side."""
    order = np.random.default_rng(seed).permutation(len(corpus))
    if subset is not None:
        order = order[:subset]
    keep = (corpus.src.lengths[order] + 1 <= max_positions) & (corpus.tgt.lengths[order] + 1 <= max_positions)
    return np.sort(order[keep])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ensure_text(sys.argv[1], "en", "de", "auto")
    print("ok:", ", ".join(str(p) for s in SPLITS for p in split_files(sys.argv[1], s, "en", "de")))
