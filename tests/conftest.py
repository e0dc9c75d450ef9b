"""Shared fixtures: tiny CIFAR-format datasets written by the tests, a world-size-1 process group."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    # class-dependent colour so a model can learn something in a few steps
    base = (labels[:, None, None, None] * 25).astype(np.int32)
    images = np.clip(base + rng.integers(0, 40, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return images, labels


def write_torchvision_cifar(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """The python-pickle layout torchvision's CIFAR10 reads (cifar-10-batches-py/)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train, train_labels = _images(n_train, 0)
    per = n_train // 5
    for i in range(5):
        chunk = slice(i * per, (i + 1) * per)
        blob = {"data": train[chunk].transpose(0, 3, 1, 2).reshape(per, -1), "labels": train_labels[chunk].tolist()}
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(blob, f)
    test, test_labels = _images(n_test, 1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test.transpose(0, 3, 1, 2).reshape(n_test, -1), "labels": test_labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return root


def write_image_folder_cifar(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """The ImageFolder layout: root/train/<class>/*.png, root/test/<class>/*.png."""
    from PIL import Image

    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = _images(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def torchvision_cifar(tmp_path) -> Path:
    return write_torchvision_cifar(tmp_path / "tv")


@pytest.fixture
def folder_cifar(tmp_path) -> Path:
    return write_image_folder_cifar(tmp_path / "folder")


@pytest.fixture
def single_process_group():
    """A gloo process group of one rank, for code that calls collectives."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    yield
    dist.destroy_process_group()
