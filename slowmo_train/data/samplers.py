"""Rank-sharded, per-epoch reseeded, resumable batch sampling for streaming (map-style) datasets.

    sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world_size, seed)
    sampler.set_epoch(epoch, skip=0)
    loader = DataLoader(dataset, batch_sampler=sampler, ...)   # dataset[SampleKey(index, epoch)]

Every epoch all ranks draw the same permutation (seeded by ``seed + epoch``, as torch's
DistributedSampler does) and rank ``r`` of ``n`` takes every ``n``-th index starting at ``r``; the
tail that does not fill a whole batch on every rank is dropped, so all ranks take the same number
of steps and their collectives stay aligned. Resuming at batch ``skip`` starts the index stream
there: nothing before it is decoded.

The keys carry the epoch so that a dataset can seed each sample's augmentation from
``(seed, epoch, index)`` (:func:`sample_rng`): the random crop of an image then does not depend on
which loader worker decoded it, nor on whether the epoch was interrupted and resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import NamedTuple

import torch


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: which sample, and in which epoch (for its augmentation)."""

    index: int
    epoch: int


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A random stream owned by one sample of one epoch. String seeds are hashed with SHA-512 by
    ``random.Random``, so the stream is the same in every process (unlike ``hash()``)."""
    return random.Random(f"{seed}:{epoch}:{index}")


def epoch_shard(n: int, rank: int, world_size: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's indices of ``epoch``: a strided share of a permutation common to all ranks,
    ``n // world_size`` long on every rank."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[rank : world_size * (n // world_size) : world_size]


class ShardedBatchSampler:
    """Batches of :class:`SampleKey` for one rank; ``set_epoch(epoch, skip)`` before each pass.

    The DataLoader iterates the sampler in the training process and sends the keys to its worker
    processes, so ``set_epoch`` takes effect on the next ``iter(loader)`` even with persistent
    workers."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        per_rank = n // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the {per_rank} training images each of the "
                f"{world_size} workers gets; lower train.batch_size (or raise data.train_subset)"
            )
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.steps_per_epoch = per_rank // batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.steps_per_epoch:
            raise ValueError(f"cannot skip {skip} batches of an epoch of {self.steps_per_epoch}")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[SampleKey]]:
        shard = epoch_shard(self.n, self.rank, self.world_size, self.seed, self.epoch).tolist()
        b = self.batch_size
        for step in range(self.skip, self.steps_per_epoch):
            yield [SampleKey(i, self.epoch) for i in shard[step * b : (step + 1) * b]]
