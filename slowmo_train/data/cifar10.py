"""CIFAR-10 as in-memory uint8 tensors, read from either layout users have:

- the torchvision format (``cifar-10-batches-py/`` under ``root``, what ``download=True`` fetches);
- an ImageFolder tree ``root/train/<class>/*`` and ``root/test/<class>/*`` (image files).

Images are small (60,000 x 3 x 32 x 32 bytes = 184 MB), so they are decoded once and kept in memory;
decoding an ImageFolder tree takes ~10 s, so the decoded tensors are cached on disk
(``data.cache_dir``) and later runs load them in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slowmo_train.data.download import extract_tar, fetch_file
from slowmo_train.data.errors import DatasetError  # re-exported: callers import it from here too

log = logging.getLogger(__name__)

TORCHVISION_FOLDER = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


#: the publisher's archive of the torchvision (python pickle) format; a mirror can be named with the
#: environment variable SLOWMO_TRAIN_CIFAR10_URL (and its MD5 with SLOWMO_TRAIN_CIFAR10_MD5)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


@dataclass
class ImageTensors:
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.numel()


def detect_layout(root: str | os.PathLike) -> str:
    """'torchvision' or 'imagefolder'; raises DatasetError naming what was expected."""
    root = Path(root)
    if (root / TORCHVISION_FOLDER / "data_batch_1").exists() or (root / "data_batch_1").exists():
        return "torchvision"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder"
    raise DatasetError(
        f"data.root={str(root)!r} holds no CIFAR-10: expected {TORCHVISION_FOLDER}/ (torchvision format) "
        "or train/<class>/ and test/<class>/ image folders. Point data.root at such a copy, "
        "or set data.download=auto to fetch it there (needs internet)."
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DatasetError(f"cannot read CIFAR-10 batch file {path}: {err}; re-download or replace it") from err
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}


def _load_torchvision(root: Path, train: bool, download: bool) -> ImageTensors:
    """Read the python-pickle batches (data_batch_1..5, test_batch, batches.meta)."""
    folder = root if (root / "data_batch_1").exists() else root / TORCHVISION_FOLDER
    if download and not (folder / "data_batch_1").exists():
        download_cifar10(root)
        folder = root / TORCHVISION_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        blob = _unpickle(folder / name)
        images.append(np.asarray(blob["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(blob["labels"])
    meta = folder / "batches.meta"
    classes = list(_unpickle(meta)["label_names"]) if meta.exists() else [str(i) for i in range(10)]
    return ImageTensors(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64), classes)


def download_cifar10(root: Path) -> None:
    """Fetch the torchvision-format archive into ``root`` and unpack it (``cifar-10-batches-py/``)."""
    url = os.environ.get("SLOWMO_TRAIN_CIFAR10_URL", CIFAR10_URL)
    md5 = os.environ.get("SLOWMO_TRAIN_CIFAR10_MD5", CIFAR10_MD5 if url == CIFAR10_URL else None)
    archive = fetch_file(url, root / "cifar-10-python.tar.gz", md5=md5, what="CIFAR-10")
    extract_tar(archive, root)
    archive.unlink()
    if not (root / TORCHVISION_FOLDER / "data_batch_1").exists():
        raise DatasetError(f"the archive from {url} holds no {TORCHVISION_FOLDER}/data_batch_1; check the mirror")


def _list_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    files = []
    for label, name in enumerate(classes):
        for entry in sorted(os.scandir(split_dir / name), key=lambda e: e.name):
            if entry.name.lower().endswith(IMAGE_SUFFIXES):
                files.append((Path(entry.path), label))
    if not files:
        raise DatasetError(f"{split_dir} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return classes, files


def _decode_image_folder(classes: list[str], files: list[tuple[Path, int]]) -> ImageTensors:
    from PIL import Image

    first = np.asarray(Image.open(files[0][0]).convert("RGB"))
    images = np.empty((len(files), *first.shape), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except OSError as err:
            raise DatasetError(f"cannot decode image {path}: {err}; remove or replace the file") from err
        if array.shape != first.shape:
            raise DatasetError(
                f"{path} is {array.shape[1]}x{array.shape[0]}, expected "
                f"{first.shape[1]}x{first.shape[0]} like the others"
            )
        images[i] = array
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageTensors(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, classes)


def _cache_path(cache_dir: Path, split_dir: Path, files: list[tuple[Path, int]]) -> Path:
    last = files[-1][0].stat()
    key = f"{split_dir.resolve()}|{len(files)}|{last.st_size}|{last.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"cifar10-{split_dir.name}-{digest}.pt"


def _load_image_folder(root: Path, split: str, cache_dir: Path | None) -> ImageTensors:
    split_dir = root / split
    classes, files = _list_image_folder(split_dir)
    cache = _cache_path(cache_dir, split_dir, files) if cache_dir is not None else None
    if cache is not None and cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            return ImageTensors(blob["images"], blob["labels"], list(blob["classes"]))
        except Exception as err:  # a corrupt cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s (%s); decoding again", cache, err)
    log.info("decoding %d images from %s (cached for later runs)", len(files), split_dir)
    data = _decode_image_folder(classes, files)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": data.images, "labels": data.labels, "classes": data.classes}, tmp)
        os.replace(tmp, cache)  # atomic: concurrent readers never see a partial file
    return data


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slowmo-train"


def load_cifar10(root: str, train: bool, download: bool = False, cache_dir: str | None = None) -> ImageTensors:
    """Load one split of CIFAR-10 from ``root`` (either layout) as uint8 tensors."""
    path = Path(root).expanduser()
    if download and not path.exists():
        path.mkdir(parents=True, exist_ok=True)
    try:
        layout = detect_layout(path)
    except DatasetError:
        if not download:
            raise
        layout = "torchvision"
    if layout == "torchvision":
        return _load_torchvision(path, train, download)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return _load_image_folder(path, "train" if train else "test", cache)
