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


def write_image_folder_imagenet(root: Path, per_class: int = 6, classes: int = 3, size: int = 48) -> Path:
    """An ImageNet-shaped tree (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of tiny JPEGs, some grayscale."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(c * 80 + rng.integers(0, 60, size=(size, size + 8 * i % 17, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels)
                if i % 3 == 2:
                    img = img.convert("L")  # ImageNet has grayscale JPEGs
                img.save(d / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


_EN = ["a", "man", "woman", "dog", "cat", "red", "blue", "ball", "runs", "sits", "on", "the", "street", "grass",
       "plays", "with", "two", "children", "big", "small"]
_DE = ["ein", "mann", "frau", "hund", "katze", "roter", "blauer", "ball", "rennt", "sitzt", "auf", "der", "strasse",
       "wiese", "spielt", "mit", "zwei", "kinder", "grosser", "kleiner"]


def write_parallel_text(root: Path, n_train: int = 300, n_valid: int = 40, n_test: int = 40) -> Path:
    """Multi30k-shaped raw parallel text: train/valid/test .en and .de, one sentence a line, a
    word-for-word toy language pair (so a model can learn something in a few steps)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        en_lines, de_lines = [], []
        for _ in range(n):
            words = rng.integers(0, len(_EN), size=int(rng.integers(3, 9)))
            en_lines.append(" ".join(_EN[w] for w in words).capitalize() + " .")
            de_lines.append(" ".join(_DE[w] for w in words).capitalize() + " .")
        (root / f"{split}.en").write_text("\n".join(en_lines) + "\n")
        (root / f"{split}.de").write_text("\n".join(de_lines) + "\n")
    return root


@pytest.fixture
def imagenet_folder(tmp_path) -> Path:
    return write_image_folder_imagenet(tmp_path / "imagenet")


@pytest.fixture
def parallel_text(tmp_path) -> Path:
    return write_parallel_text(tmp_path / "multi30k")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process tests use one intra-op thread: the multi-process tests' workers share the same few
    cores, and oversubscribed thread pools make small ops hundreds of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
