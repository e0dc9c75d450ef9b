"""CIFAR-10 loading in both layouts, the disk cache, augmentation and rank sharding."""

from __future__ import annotations

import pytest
import torch

from slowmo_train.data.batches import TrainBatches, eval_batches, random_crop_flip
from slowmo_train.data.cifar10 import DatasetError, detect_layout, load_cifar10


def test_both_layouts_load_the_same_shapes(torchvision_cifar, folder_cifar, tmp_path):
    assert detect_layout(torchvision_cifar) == "torchvision"
    assert detect_layout(folder_cifar) == "imagefolder"
    tv = load_cifar10(str(torchvision_cifar), train=True)
    fo = load_cifar10(str(folder_cifar), train=True, cache_dir=str(tmp_path / "cache"))
    assert tv.images.shape == fo.images.shape == (200, 3, 32, 32)
    assert tv.images.dtype == fo.images.dtype == torch.uint8
    assert tv.classes == fo.classes and len(tv.classes) == 10
    assert torch.equal(torch.bincount(tv.labels), torch.bincount(fo.labels))
    # PNG is lossless: the folder copy holds the same pixels as the pickle copy, per class
    assert torch.equal(tv.images[tv.labels == 3].sort(0).values, fo.images[fo.labels == 3].sort(0).values)


def test_image_folder_cache_is_reused_and_corrupt_cache_rebuilt(folder_cifar, tmp_path):
    cache = tmp_path / "cache"
    first = load_cifar10(str(folder_cifar), train=False, cache_dir=str(cache))
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    files[0].write_bytes(b"not a tensor file")
    again = load_cifar10(str(folder_cifar), train=False, cache_dir=str(cache))
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_missing_or_empty_root_has_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="holds no CIFAR-10.*data.download=auto"):
        detect_layout(tmp_path)


def test_crop_flip_keeps_shape_and_content():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, 4, g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    zero_pad = random_crop_flip(images, 0, torch.Generator().manual_seed(0))
    flipped = (zero_pad != images).flatten(1).any(1)
    assert torch.equal(zero_pad[flipped], images[flipped].flip(3))


def test_ranks_get_disjoint_shards_and_equal_step_counts(folder_cifar, tmp_path):
    data = load_cifar10(str(folder_cifar), train=True, cache_dir=str(tmp_path / "c"))
    seen = []
    for rank in range(3):
        batches = TrainBatches(data, 16, rank, 3, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"))
        assert batches.steps_per_epoch == 200 // 3 // 16
        ys = torch.cat([y for _, y in batches.epoch(0)])
        seen.append(ys.numel())
    assert len(set(seen)) == 1
    cpu = torch.device("cpu")
    total = sum(x.shape[0] for r in range(3) for x, _ in eval_batches(data, 7, r, 3, (0.5,) * 3, (0.5,) * 3, cpu))
    assert total == len(data)


def test_resuming_mid_epoch_gives_the_same_batches(folder_cifar, tmp_path):
    data = load_cifar10(str(folder_cifar), train=True, cache_dir=str(tmp_path / "c"))
    batches = TrainBatches(data, 16, 0, 2, seed=3, mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"))
    full = list(batches.epoch(1))
    resumed = list(batches.epoch(1, skip=2))
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))
