"""Tiny synthetic datasets in the real layouts, for smoke checks where no real data is at hand.

    from slowmo_train.data.synthetic import write_image_folder_cifar, write_image_folder_imagenet
    write_image_folder_cifar(tmp / "cifar10")          # train/<class>/*.png, test/<class>/*.png
    write_image_folder_imagenet(tmp / "imagenet")      # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    write_parallel_text(tmp / "multi30k")              # {train,valid,test}.{en,de}

Each writer produces a few hundred examples laid out exactly as the task reads the real dataset
(CIFAR-10 in torchvision's pickle format or as ImageFolders, an ImageNet tree of JPEGs including
grayscale ones, Multi30k-style raw parallel text), with a signal a model can pick up in a few steps
(class-dependent colours, a word-for-word toy language pair). They are deterministic (fixed seeds).
The tests (tests/conftest.py) and ``scripts/gpu_check.py`` use them; no download is involved.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

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
    folder = Path(root) / "cifar-10-batches-py"
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
    return Path(root)


def write_image_folder_cifar(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """The ImageFolder layout: root/train/<class>/*.png, root/test/<class>/*.png."""
    from PIL import Image

    root = Path(root)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = _images(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def write_image_folder_imagenet(root: Path, per_class: int = 6, classes: int = 3, size: int = 48) -> Path:
    """An ImageNet-shaped tree (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of tiny JPEGs, some grayscale."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(0, 60, size=(size, size + 8 * i % 17, 3))
                pixels = np.clip(c * 80 + noise, 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels)
                if i % 3 == 2:
                    img = img.convert("L")  # ImageNet has grayscale JPEGs
                img.save(d / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


_EN = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "ball",
    "runs",
    "sits",
    "on",
    "the",
    "street",
    "grass",
    "plays",
    "with",
    "two",
    "children",
    "big",
    "small",
]
_DE = [
    "ein",
    "mann",
    "frau",
    "hund",
    "katze",
    "roter",
    "blauer",
    "ball",
    "rennt",
    "sitzt",
    "auf",
    "der",
    "strasse",
    "wiese",
    "spielt",
    "mit",
    "zwei",
    "kinder",
    "grosser",
    "kleiner",
]


def write_parallel_text(root: Path, n_train: int = 300, n_valid: int = 40, n_test: int = 40) -> Path:
    """Multi30k-shaped raw parallel text: train/valid/test .en and .de, one sentence a line, a
    word-for-word toy language pair (so a model can learn something in a few steps). Its ~40 words
    suit a vocabulary of about 60 pieces (``data.vocab_size=60``)."""
    root = Path(root)
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
