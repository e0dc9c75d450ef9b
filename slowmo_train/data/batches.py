"""Batches straight from in-memory uint8 image tensors, sharded over ranks.

Training: every epoch a permutation shared by all ranks (seeded by ``seed + epoch``, as
DistributedSampler does) is cut into ``world_size`` disjoint shards; the tail that does not fill a
batch on every rank is dropped so that all ranks take the same number of steps. Augmentation (random
crop after 4-pixel zero padding, horizontal flip) runs batched on tensors, so no loader processes are
needed and CPU cores stay with the training workers.

On a GPU the uint8 batch (a quarter of the float bytes) is copied through pinned memory without
blocking (:func:`to_device`) and normalised on the device, in channels-last layout when the model
uses it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from slowmo_train.data.cifar10 import ImageTensors


def _normalise(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float().div_(255.0) - mean) / std


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``. On CUDA through pinned memory with an asynchronous copy, which
    overlaps the compute already queued (PyTorch's caching host allocator keeps the pinned block
    until the copy has completed); on the CPU the tensor itself."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DeviceNormaliser:
    """uint8 images -> normalised float on the device (optionally channels-last)."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        self.device = device
        self.mean = torch.tensor(mean).view(1, -1, 1, 1).to(device)
        self.std = torch.tensor(std).view(1, -1, 1, 1).to(device)
        self.channels_last = channels_last

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = _normalise(to_device(images_uint8, self.device), self.mean, self.std)
        # otherwise the layout is left as the augmentation made it (its strides decide the
        # convolution kernels, hence the last bits of every result)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``H x W`` crops of the zero-padded batch and random horizontal flips (uint8 in/out)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # b x h x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # b x 1 x w
    batch = torch.arange(b)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # b x h x w x c
    crops = crops.permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class TrainBatches:
    """Shuffled, augmented, rank-sharded training batches of a fixed per-worker size."""

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        mean,
        std,
        device: torch.device,
        padding: int = 4,
        channels_last: bool = False,
    ):
        per_rank = len(data) // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the {per_rank} training images each of the "
                f"{world_size} workers gets; lower train.batch_size"
            )
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        self.seed, self.device, self.padding = seed, device, padding
        self.normalise = DeviceNormaliser(mean, std, device, channels_last)
        self.steps_per_epoch = per_rank // batch_size

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch``, skipping its first ``skip`` batches (to resume mid-epoch)."""
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch))
        shard = order[self.rank : self.world_size * (len(self.data) // self.world_size) : self.world_size]
        augment_rng = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + epoch * 7_919 + self.rank)
        for step in range(self.steps_per_epoch):
            idx = shard[step * self.batch_size : (step + 1) * self.batch_size]
            images = random_crop_flip(self.data.images[idx], self.padding, augment_rng)
            if step < skip:
                continue  # keep the random stream aligned with an uninterrupted epoch
            yield self.normalise(images), to_device(self.data.labels[idx], self.device)


def eval_batches(
    data: ImageTensors,
    batch_size: int,
    rank: int,
    world_size: int,
    mean,
    std,
    device: torch.device,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share (every ``world_size``-th image) of an evaluation split, unaugmented."""
    idx_all = torch.arange(rank, len(data), world_size)
    normalise = DeviceNormaliser(mean, std, device, channels_last)
    for start in range(0, idx_all.numel(), batch_size):
        idx = idx_all[start : start + batch_size]
        yield normalise(data.images[idx]), to_device(data.labels[idx], device)
