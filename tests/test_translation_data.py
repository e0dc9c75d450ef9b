"""Translation data: token batching, the sentencepiece cache (trained once across ranks), the
Multi30k fetch from a local stand-in, and the offline error.

    .venv/bin/python -m pytest -q tests/test_translation_data.py
"""

from __future__ import annotations

import functools
import gzip
import http.server
import threading

import numpy as np
import pytest
import torch

from slowmo_train.config import DataConfig
from slowmo_train.data import subword
from slowmo_train.data.cifar10 import DatasetError
from slowmo_train.data.token_batches import TokenBatches, collate, pack
from slowmo_train.data.translation import (
    MULTI30K_FILES,
    MULTI30K_URL_ENV,
    EncodedSide,
    ParallelCorpus,
    encode_or_load,
    ensure_text,
    training_indices,
)
from slowmo_train.data.vocab import BOS, EOS, PAD
from slowmo_train.tasks.wmt16 import check_wmt16_data
from tests.distributed_helpers import run_distributed
from tests.helpers import write_corpus


def random_corpus(n: int = 200, seed: int = 0) -> ParallelCorpus:
    rng = np.random.default_rng(seed)
    side = lambda: EncodedSide.from_lists([list(rng.integers(4, 50, size=rng.integers(1, 30))) for _ in range(n)])  # noqa: E731
    return ParallelCorpus(side(), side())


def test_pack_respects_the_token_budget_and_gives_every_rank_a_sentence():
    rng = np.random.default_rng(0)
    src = np.sort(rng.integers(2, 40, 300))
    tgt = rng.integers(2, 40, 300)
    for world in (1, 3):
        batches = pack(src, tgt, 200, world)
        covered = np.concatenate(batches)
        assert (covered == np.arange(len(covered))).all() and len(src) - len(covered) < world
        for b in batches:
            per_rank = -(-len(b) // world)
            assert len(b) >= world and (per_rank * (src[b].max() + tgt[b].max()) <= 200 or per_rank == 1)


def test_token_batches_shard_evenly_deterministically_and_skip():
    corpus = random_corpus()
    idx = np.arange(len(corpus))
    ranks = [TokenBatches(corpus, idx, 256, r, 3, seed=7, device=torch.device("cpu")) for r in range(3)]
    assert len({b.steps_per_epoch for b in ranks}) == 1 and ranks[0].steps_per_epoch > 3
    epoch = [list(b.epoch(2)) for b in ranks]
    assert all(len(e) == ranks[0].steps_per_epoch for e in epoch)
    for step in range(ranks[0].steps_per_epoch):
        shards = [e[step] for e in epoch]
        assert all(s["src"].numel() + s["tgt"].numel() <= 256 or s["src"].shape[0] == 1 for s in shards)
    # every pair of the batches is seen exactly once per epoch, across the ranks
    seen = sorted(int(x) for b in ranks[0].batches for x in b)
    assert len(seen) == len(set(seen)) == ranks[0].pairs
    # same seed + epoch -> same batches; another epoch -> another order; skip drops the first batches
    again = list(TokenBatches(corpus, idx, 256, 1, 3, seed=7, device=torch.device("cpu")).epoch(2))
    assert all(torch.equal(a["src"], b["src"]) for a, b in zip(again, epoch[1]))
    other = list(ranks[1].epoch(3))
    assert [b["src"].tolist() for b in other] != [b["src"].tolist() for b in epoch[1]]
    tail = list(ranks[1].epoch(2, skip=3))
    assert len(tail) == len(epoch[1]) - 3 and all(torch.equal(a["tgt"], b["tgt"]) for a, b in zip(tail, epoch[1][3:]))


def test_collate_builds_decoder_input_and_targets():
    corpus = ParallelCorpus(EncodedSide.from_lists([[5, 6], [7]]), EncodedSide.from_lists([[8, 9, 10], [11]]))
    batch = collate(corpus, np.array([0, 1]), torch.device("cpu"))
    assert batch["src"].tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    assert batch["prev"].tolist() == [[BOS, 8, 9, 10], [BOS, 11, PAD, PAD]]
    assert batch["tgt"].tolist() == [[8, 9, 10, EOS], [11, EOS, PAD, PAD]]
    assert batch["ntokens"] == 6


def test_training_indices_subset_and_length_filter():
    corpus = random_corpus(100)
    every = training_indices(corpus, None, 1000, seed=0)
    assert every.tolist() == list(range(100))
    sub = training_indices(corpus, 30, 1000, seed=0)
    assert len(sub) == 30 and sub.tolist() == training_indices(corpus, 30, 1000, seed=0).tolist()
    short = training_indices(corpus, None, 11, seed=0)
    assert 0 < len(short) < 100
    assert (corpus.src.lengths[short] + 1 <= 11).all() and (corpus.tgt.lengths[short] + 1 <= 11).all()


def test_sentencepiece_is_cached_and_tolerates_a_vocabulary_larger_than_the_data(tmp_path):
    root = write_corpus(tmp_path / "text")
    files = [root / "train.en", root / "train.de"]
    model = subword.train_or_load(files, 8000, tmp_path / "cache")  # far more than the toy text holds
    sp = subword.load(model)
    assert 16 < sp.get_piece_size() < 8000
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD, 1, BOS, EOS)
    line = (root / "train.en").read_text(encoding="utf-8").splitlines()[0]
    assert sp.decode(sp.encode(line)) == line
    stamp = model.stat().st_mtime_ns
    assert subword.train_or_load(files, 8000, tmp_path / "cache") == model and model.stat().st_mtime_ns == stamp
    assert subword.train_or_load(files, 100, tmp_path / "cache") != model  # the settings are in the key
    corpus = encode_or_load(sp, model.parent, root / "valid.en", root / "valid.de")
    cached = encode_or_load(sp, model.parent, root / "valid.en", root / "valid.de")
    assert len(corpus) == 8 and np.array_equal(corpus.tgt.tokens, cached.tgt.tokens)


def _prepare_counting(rank, world_size, root, cache, log):
    from slowmo_train.data import subword as sw
    from slowmo_train.tasks.base import WorkerInfo
    from slowmo_train.tasks.wmt16 import prepare_data

    real = sw._train

    def counting(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        return real(*args, **kwargs)

    sw._train = counting
    cfg = DataConfig(root=root, cache_dir=cache, vocab_size=200, download="false")
    model, splits = prepare_data(cfg, WorkerInfo(rank, world_size, rank, torch.device("cpu")))
    return str(model), len(splits["train"])


@pytest.mark.multiproc
def test_sentencepiece_is_trained_once_when_ranks_start_together(tmp_path):
    root = write_corpus(tmp_path / "text")
    log = tmp_path / "trained.log"
    out = run_distributed(_prepare_counting, 3, args=(str(root), str(tmp_path / "cache"), str(log)), timeout=120)
    assert len({m for m, _ in out}) == 1 and all(n == 60 for _, n in out)
    assert log.read_text().split() == ["0"]


def test_multi30k_is_fetched_from_a_local_stand_in(tmp_path, monkeypatch):
    source = write_corpus(tmp_path / "published")
    served = tmp_path / "served"
    served.mkdir()
    for split, stem in MULTI30K_FILES.items():
        for lang in ("en", "de"):
            (served / f"{stem}.{lang}.gz").write_bytes(gzip.compress((source / f"{split}.{lang}").read_bytes()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(MULTI30K_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/")
        target = tmp_path / "data"
        ensure_text(target, "en", "de", "auto")
    finally:
        server.shutdown()
    for split in MULTI30K_FILES:
        for lang in ("en", "de"):
            assert (target / f"{split}.{lang}").read_bytes() == (source / f"{split}.{lang}").read_bytes()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_offline_or_no_download_errors_name_data_root(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    with pytest.raises(DatasetError, match=r"data.root=.*empty.*lacks train.en.*data.download=false"):
        check_wmt16_data(DataConfig(root=str(empty), download="false"))
    monkeypatch.setenv(MULTI30K_URL_ENV, (tmp_path / "nowhere").as_uri())
    with pytest.raises(DatasetError, match=r"cannot fetch file://.*Point data.root at"):
        ensure_text(empty, "en", "de", "auto")
    check_wmt16_data(DataConfig(root=str(write_corpus(tmp_path / "ok")), download="false"))


def test_chunked_encoding_equals_one_piece(tmp_path):
    from slowmo_train.data.translation import _encode_lines

    root = write_corpus(tmp_path / "text")
    sp = subword.load(subword.train_or_load([root / "train.en", root / "train.de"], 100, tmp_path / "cache"))
    lines = (root / "train.en").read_text(encoding="utf-8").splitlines()
    whole, chunked = _encode_lines(sp, lines), _encode_lines(sp, lines, chunk=7)
    assert np.array_equal(whole.tokens, chunked.tokens) and np.array_equal(whole.offsets, chunked.offsets)
    assert [chunked[i].tolist() for i in range(len(lines))] == sp.encode(lines)
    assert len(_encode_lines(sp, [])) == 0
