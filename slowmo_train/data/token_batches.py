"""Token-based batching with length bucketing, sharded so every rank takes the same number of steps.

As in fairseq (Ott et al., 2019): sentence pairs are ordered by length (ties broken by a seeded
shuffle) and cut greedily into *global* batches of similar lengths; each global batch is then dealt
round-robin to the ranks, so every rank gets one shard of every global batch and all ranks take the
same number of steps (their collectives stay aligned). A global batch of ``n`` pairs whose longest
source and target have ``S`` and ``T`` tokens costs at most ``ceil(n / world) * (S + T)`` padded
tokens on the busiest rank, which is kept within ``max_tokens`` (a batch always holds at least one
pair per rank, even when that pair alone is longer). The batches are fixed for the run; each epoch visits them in a new
order drawn from ``seed + epoch`` (so ``steps_per_epoch`` is constant and a resumed run that skips
the first ``skip`` batches sees exactly what an uninterrupted one saw). Pairs left over at the end
that cannot give every rank a sentence are dropped (fewer than ``world`` pairs).

    python -c "from slowmo_train.data.token_batches import pack; print(pack([3, 5, 9], [4, 4, 8], 40, 1))"
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from slowmo_train.data.batches import to_device
from slowmo_train.data.translation import ParallelCorpus
from slowmo_train.data.vocab import BOS, EOS, PAD


def pack(src_len, tgt_len, max_tokens: int, world_size: int) -> list[np.ndarray]:
    """Greedy global batches over pairs already in bucket order: positions 0..n-1 of ``src_len``.
    Lengths include the end-of-sentence token. Returns arrays of positions."""
    batches, start, long_src, long_tgt, n = [], 0, 0, 0, len(src_len)
    for i in range(n):
        size = i - start + 1
        s, t = max(long_src, int(src_len[i])), max(long_tgt, int(tgt_len[i]))
        if size > world_size and -(-size // world_size) * (s + t) > max_tokens:
            batches.append(np.arange(start, i))
            start, s, t = i, int(src_len[i]), int(tgt_len[i])
        long_src, long_tgt = s, t
    if n - start >= world_size:
        batches.append(np.arange(start, n))
    return batches


def collate(corpus: ParallelCorpus, pairs: np.ndarray, device: torch.device) -> dict:
    """Right-padded tensors: ``src`` (tokens + EOS), ``prev`` (BOS + target tokens, the decoder input)
    and ``tgt`` (target tokens + EOS); ``ntokens`` = target tokens (the loss's unit)."""
    srcs = [corpus.src[i] for i in pairs]
    tgts = [corpus.tgt[i] for i in pairs]
    b = len(pairs)
    src = np.full((b, max(len(s) for s in srcs) + 1), PAD, dtype=np.int64)
    prev = np.full((b, max(len(t) for t in tgts) + 1), PAD, dtype=np.int64)
    tgt = np.full_like(prev, PAD)
    for j, (s, t) in enumerate(zip(srcs, tgts)):
        src[j, : len(s)], src[j, len(s)] = s, EOS
        prev[j, 0], prev[j, 1 : len(t) + 1] = BOS, t
        tgt[j, : len(t)], tgt[j, len(t)] = t, EOS
    ntokens = sum(len(t) + 1 for t in tgts)
    # ntokens stays a host number: the loss's unit count, read without touching the device
    return {
        "src": to_device(torch.from_numpy(src), device),
        "prev": to_device(torch.from_numpy(prev), device),
        "tgt": to_device(torch.from_numpy(tgt), device),
        "ntokens": ntokens,
    }


class TokenBatches:
    """This rank's training batches; ``epoch(e, skip)`` is the Task's ``train_batches``."""

    def __init__(
        self,
        corpus: ParallelCorpus,
        indices: np.ndarray,
        max_tokens: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ):
        self.corpus, self.rank, self.world_size, self.seed, self.device = corpus, rank, world_size, seed, device
        src_len = corpus.src.lengths[indices] + 1
        tgt_len = corpus.tgt.lengths[indices] + 1
        # bucket order: by target then source length; the seeded shuffle breaks ties
        shuffled = np.random.default_rng(seed).permutation(len(indices))
        order = shuffled[np.lexsort((src_len[shuffled], tgt_len[shuffled]))]
        self.batches = [indices[order[b]] for b in pack(src_len[order], tgt_len[order], max_tokens, world_size)]
        self.steps_per_epoch = len(self.batches)
        self.pairs = sum(len(b) for b in self.batches)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no training batch: {len(indices)} sentence pairs cannot give each of "
                f"{world_size} workers one; use more data (data.train_subset)"
            )

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.steps_per_epoch)
        for b in order[skip:]:
            yield collate(self.corpus, self.batches[b][self.rank :: self.world_size], self.device)


def eval_batches(
    corpus: ParallelCorpus, positions: np.ndarray, max_tokens: int, device: torch.device
) -> Iterator[tuple[np.ndarray, dict]]:
    """Length-sorted batches of the pairs ``positions`` (one rank's share of a split)."""
    src_len = corpus.src.lengths[positions] + 1
    tgt_len = corpus.tgt.lengths[positions] + 1
    order = np.lexsort((tgt_len, src_len))
    for b in pack(src_len[order], tgt_len[order], max_tokens, 1):
        pairs = positions[order[b]]
        yield pairs, collate(corpus, pairs, device)
