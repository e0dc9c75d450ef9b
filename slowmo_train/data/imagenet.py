"""ImageNet as a stream: an ImageFolder tree decoded with PIL in DataLoader worker processes.

    stream = ImageNetStream("/data/imagenet", image_size=224, batch_size=32, eval_batch_size=250,
                            workers=4, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    for images, labels in stream.train_batches(epoch=0, skip=0): ...   # normalised, on the device

ILSVRC-2012 (1.28M training images, 140 GB) does not fit in memory, so unlike CIFAR-10 nothing is
preloaded: each sample is read and decoded when a batch asks for it, in ``data.workers`` worker
processes (0 = in the training process). ImageNet holds grayscale and CMYK JPEGs, so every image is
converted to RGB after decoding.

Augmentation is the standard one (Szegedy et al., CVPR 2015; He et al., CVPR 2016; Goyal et al.,
2017): training takes a random crop of 8%-100% of the area with aspect ratio in [3/4, 4/3], resized
to ``image_size``, flipped horizontally with probability 1/2; validation resizes the shorter side to
``image_size * 256 / 224`` and takes the central ``image_size`` square. Each sample's random draws
come from its own generator seeded by (seed, epoch, index) (data/samplers.py), so a batch is the
same whichever worker decoded it and whether or not the epoch was resumed midway.

Workers return uint8 tensors (4x fewer bytes through shared memory and the host-to-device copy than
float32); the conversion to float and the normalisation with the ImageNet mean and standard deviation
happen on the training device, batched.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from slowmo_train.data.errors import DatasetError
from slowmo_train.data.samplers import SampleKey, ShardedBatchSampler, sample_rng

# Per-channel statistics of the ImageNet training set (RGB, in [0, 1]), as torchvision uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
#: Inception-style crop ranges: fraction of the image area and aspect ratio (width / height)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: Loader workers are forked: a process that was itself started with "spawn" (the built-in launcher's
#: workers) would otherwise spawn its loader workers too, re-importing the training program in each
#: one (measured: 18-28 s per loader start on a 2-core machine, against 0.1 s forked). Forking is also
#: what torchrun-started processes do by default on Linux.
LOADER_CONTEXT = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def check_layout(root: str | os.PathLike) -> None:
    """Raise DatasetError, in one line saying what to do, unless ``root`` has train/ and val/."""
    missing = [split for split in ("train", "val") if not (Path(root).expanduser() / split).is_dir()]
    if missing:
        raise DatasetError(
            f"data.root={str(root)!r} holds no ImageNet ({' and '.join(s + '/' for s in missing)} missing): "
            "ImageNet is never downloaded (its terms of use require an account at image-net.org). Point "
            "data.root at a folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ILSVRC-2012 with the "
            "validation images sorted into class folders)."
        )


@dataclass
class FileList:
    """One split's images: paths relative to ``root`` and labels as numpy arrays, not Python lists,
    because DataLoader workers forked from the training process would touch (and so copy) the
    reference count of every list entry; 1.28M paths are ~45 MB this way."""

    root: str
    paths: np.ndarray  # bytes, relative to root
    labels: np.ndarray  # int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def subset(self, n: int | None, seed: int) -> FileList:
        """``n`` images chosen by a fixed shuffle (in file order), or everything when n is None."""
        if n is None or n >= len(self):
            return self
        keep = np.sort(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].numpy())
        return FileList(self.root, self.paths[keep], self.labels[keep], self.classes)


def list_split(split_dir: str | os.PathLike, classes: list[str] | None = None) -> FileList:
    """The images of ``split_dir/<class>/``; labels index ``classes`` (default: the sorted class
    folders, as torchvision's ImageFolder numbers them)."""
    split_dir = Path(split_dir)
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not folders:
        raise DatasetError(f"{split_dir} has no class folders; expected {split_dir}/<wnid>/<image>.JPEG")
    classes = folders if classes is None else classes
    index = {name: i for i, name in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DatasetError(
            f"{split_dir} has class folders the training split lacks ({', '.join(unknown[:5])}); "
            "train/ and val/ must use the same class names"
        )
    paths, labels = [], []
    for name in folders:
        for entry in sorted(os.scandir(split_dir / name), key=lambda e: e.name):
            if entry.name.lower().endswith(IMAGE_SUFFIXES):
                paths.append(f"{name}/{entry.name}")
                labels.append(index[name])
    if not paths:
        raise DatasetError(f"{split_dir} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return FileList(str(split_dir), np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64), classes)


def count_images(split_dir: str | os.PathLike, limit: int | None = None) -> int:
    """Image files in ``split_dir/<class>/``, counted by name only and stopping at ``limit``."""
    n = 0
    for folder in os.scandir(split_dir):
        if folder.is_dir():
            n += sum(1 for e in os.scandir(folder.path) if e.name.lower().endswith(IMAGE_SUFFIXES))
            if limit is not None and n >= limit:
                return limit
    return n


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB (grayscale and CMYK JPEGs included)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise DatasetError(f"cannot decode image {path}: {err}; remove or replace the file") from err


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of an Inception-style random crop (Szegedy et al., 2015):
    area fraction uniform in ``scale``, log aspect ratio uniform in ``ratio``; after 10 misses, the
    largest centred crop whose aspect ratio lies in ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """Random resized crop to ``size`` x ``size`` and a random horizontal flip; uint8 CHW out."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
        img = TF.resized_crop(
            img, top, left, h, w, [self.size, self.size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img)


class EvalTransform:
    """Shorter side to ``size * 256 / 224`` (256 at 224), then the central ``size`` square."""

    def __init__(self, size: int):
        self.size, self.resize = size, round(size * 256 / 224)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = TF.resize(img, self.resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(TF.center_crop(img, [self.size, self.size]))


class ImageFolderStream(Dataset):
    """Decodes and transforms one image per key. Training keys are :class:`SampleKey` (the sample's
    augmentation is seeded by ``(seed, epoch, index)``); evaluation keys are plain indices."""

    def __init__(self, files: FileList, transform, seed: int = 0):
        self.files, self.transform, self.seed = files, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if isinstance(key, SampleKey):
            index, rng = key.index, sample_rng(self.seed, key.epoch, key.index)
        else:
            index, rng = int(key), None
        return self.transform(load_rgb(self.files.path(index)), rng), int(self.files.labels[index])


class DeviceNormalise:
    """uint8 (B, 3, H, W) batch -> normalised float32 on the device (channels-last if asked)."""

    def __init__(self, device: torch.device, channels_last: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.device, self.channels_last = device, channels_last
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply and one subtract
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (torch.tensor(mean).view(1, -1, 1, 1) / std_t).to(device)

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # float() below keeps the layout
        x = x.float().mul_(self.scale).sub_(self.shift)
        return x, labels.to(self.device, non_blocking=True)


class ImageNetStream:
    """One rank's training and validation batches of an ImageFolder tree ``root/{train,val}``.

    The training loader keeps its worker processes between epochs (``persistent_workers``: a new
    epoch only changes the sampler, which lives in this process); one pass runs at a time, and
    starting a new pass abandons the previous one. The validation loader starts its workers per
    evaluation, so they do not hold memory during training. Memory is pinned only for CUDA."""

    def __init__(
        self,
        root: str,
        image_size: int,
        batch_size: int,
        eval_batch_size: int,
        workers: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        train_subset: int | None = None,
        channels_last: bool = False,
    ):
        check_layout(root)
        root_path = Path(root).expanduser()
        train = list_split(root_path / "train").subset(train_subset, seed)
        val = list_split(root_path / "val", classes=train.classes)
        self.classes, self.train_size, self.val_size = train.classes, len(train), len(val)
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.eval_batch_size = eval_batch_size
        self.to_device = DeviceNormalise(device, channels_last)
        self.pin = device.type == "cuda"
        self._context = LOADER_CONTEXT if workers > 0 else None
        self.sampler = ShardedBatchSampler(len(train), batch_size, rank, world_size, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.val_set = ImageFolderStream(val, EvalTransform(image_size))
        self.train_loader = DataLoader(
            ImageFolderStream(train, TrainTransform(image_size), seed),
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.pin,
            persistent_workers=workers > 0,
            multiprocessing_context=self._context,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_batches(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch`` after its first ``skip`` (which are never decoded)."""
        self.sampler.set_epoch(epoch, skip)
        for batch in self.train_loader:
            yield self.to_device(batch)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share (every ``world_size``-th image) of the validation split."""
        share = list(range(self.rank, self.val_size, self.world_size))
        loader = DataLoader(
            self.val_set,
            batch_size=self.eval_batch_size,
            sampler=share,
            num_workers=self.workers,
            pin_memory=self.pin,
            multiprocessing_context=self._context,
        )
        for batch in loader:
            yield self.to_device(batch)
