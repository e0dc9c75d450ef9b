"""Shared fixtures: tiny datasets of the real layouts, a world-size-1 process group.

The dataset writers live in slowmo_train/data/synthetic.py (scripts/gpu_check.py uses them too);
they are re-exported here because many tests import them from tests.conftest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from slowmo_train.data.synthetic import (  # noqa: F401
    _DE,
    _EN,
    CLASSES,
    _images,
    write_image_folder_cifar,
    write_image_folder_imagenet,
    write_parallel_text,
    write_torchvision_cifar,
)


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
