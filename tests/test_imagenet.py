"""The ImageNet task: RGB conversion and transform shapes, the Inception crop, the rank-sharded
resumable sampler, exact resume independent of loader workers, the ResNet-50 builder, and 2-process
runs through the CLI.

    .venv/bin/python -m pytest -q tests/test_imagenet.py            # add -m slow for the real sample
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from slowmo_train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from slowmo_train.data.errors import DatasetError
from slowmo_train.data.imagenet import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceNormalise,
    EvalTransform,
    ImageNetStream,
    TrainTransform,
    list_split,
    load_rgb,
    random_resized_crop_box,
)
from slowmo_train.data.samplers import SampleKey, ShardedBatchSampler, sample_rng
from slowmo_train.models import build_model
from slowmo_train.optim import build_optimizer
from slowmo_train.scripting import launch_env, read_metrics
from slowmo_train.tasks import TASKS, TaskArgs, WorkerInfo

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_sample"
CLASSES = ["n01", "n02", "n03"]


def _jpeg(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=80)


def write_tree(root: Path, n_train: int = 8, n_val: int = 3) -> Path:
    """A tiny ImageNet-layout tree of JPEGs in RGB, grayscale and CMYK, of mixed sizes."""
    modes, sizes = ["RGB", "L", "CMYK"], [(40, 30), (30, 50), (36, 36)]
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                _jpeg(root / split / name / f"{name}_{i:03d}.JPEG", modes[i % 3], sizes[(i + c) % 3], seed=i * 7 + c)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "imagenet")


# --- decoding and transforms ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_transforms_give_rgb_crops_of_image_size(tmp_path, mode):
    path = tmp_path / f"x_{mode}.JPEG"
    _jpeg(path, mode, (50, 30), seed=1)
    with Image.open(path) as raw:
        assert raw.mode == mode  # the file really is grayscale / CMYK
    img = load_rgb(str(path))
    assert img.mode == "RGB"
    for size in (32, 24):
        train = TrainTransform(size)(img, random.Random(0))
        val = EvalTransform(size)(img)
        assert train.shape == val.shape == (3, size, size)
        assert train.dtype == val.dtype == torch.uint8


def test_eval_transform_resizes_shorter_side_then_center_crops():
    # A horizontal ramp: the center crop keeps the middle columns.
    ramp = np.tile(np.linspace(0, 255, 448).astype(np.uint8), (224, 1))
    img = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224)
    # shorter side 224 -> 256 (scale 8/7), width 512; the central 224 columns span 144..368 of 512
    expected_left = 144 / 512 * 255
    assert abs(float(out[0, 0, 0]) - expected_left) < 3


def test_random_resized_crop_box_stays_inside_and_respects_ranges():
    rng = random.Random(3)
    for width, height in [(500, 375), (224, 224), (100, 800), (800, 60)]:
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
    # a normal image: crops cover 8%-100% of the area with aspect ratio within [3/4, 4/3] (+ rounding)
    for _ in range(500):
        _, _, w, h = random_resized_crop_box(500, 375, rng)
        assert 0.08 * 500 * 375 * 0.95 <= w * h <= 500 * 375
        assert CROP_RATIO[0] * 0.95 <= w / h <= CROP_RATIO[1] * 1.05
    # the same generator state gives the same box (augmentation is reproducible per sample)
    box = random_resized_crop_box(500, 375, sample_rng(0, 1, 7))
    assert box == random_resized_crop_box(500, 375, sample_rng(0, 1, 7))
    assert box != random_resized_crop_box(500, 375, sample_rng(0, 2, 7))


def test_device_normalise_matches_torchvision_normalize_and_sets_channels_last():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x, y = DeviceNormalise(torch.device("cpu"), channels_last=True)((images, torch.tensor([1, 2])))
    expected = torchvision.transforms.functional.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(x, expected)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.tolist() == [1, 2]


# --- listing and data checks ------------------------------------------------------------------------
def test_list_split_numbers_classes_like_image_folder(tree):
    files = list_split(tree / "train")
    reference = torchvision.datasets.ImageFolder(str(tree / "train"))
    assert files.classes == reference.classes
    assert [(files.path(i), int(files.labels[i])) for i in range(len(files))] == [
        (str(Path(p)), label) for p, label in reference.samples
    ]


def test_val_class_missing_from_train_is_a_clear_error(tree):
    _jpeg(tree / "val" / "n99" / "x.JPEG", "RGB", (20, 20), seed=0)
    with pytest.raises(DatasetError, match="n99"):
        list_split(tree / "val", classes=list_split(tree / "train").classes)


def test_missing_layout_says_imagenet_is_never_downloaded(tmp_path):
    (tmp_path / "train").mkdir()
    for download in ("auto", "true", "false"):
        with pytest.raises(DatasetError) as err:
            TASKS["imagenet"].check_data(DataConfig(root=str(tmp_path), download=download))
        message = str(err.value)
        assert "val/" in message and "never downloaded" in message and "train/<wnid>" in message
        assert "\n" not in message


def test_data_check_accepts_a_tree(tree):
    TASKS["imagenet"].check_data(DataConfig(root=str(tree)))


def test_train_size_counts_file_names_before_workers_start(tree, tmp_path):
    train_size = TASKS["imagenet"].train_size
    assert train_size(DataConfig(root=str(tree))) == 24
    assert train_size(DataConfig(root=str(tree), train_subset=10)) == 10
    assert train_size(DataConfig(root=str(tmp_path / "none"))) is None


# --- sampler ----------------------------------------------------------------------------------------
def _epoch(sampler: ShardedBatchSampler, epoch: int, skip: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, skip)
    return [[k.index for k in batch] for batch in sampler]


def test_sampler_shards_disjoint_equal_and_reseeded_per_epoch():
    n, world, batch = 103, 4, 5
    samplers = [ShardedBatchSampler(n, batch, r, world, seed=11) for r in range(world)]
    assert {s.steps_per_epoch for s in samplers} == {(n // world) // batch}
    for epoch in (0, 1):
        shards = [_epoch(s, epoch) for s in samplers]
        assert all(len(b) == batch for shard in shards for b in shard)
        flat = [i for shard in shards for b in shard for i in b]
        assert len(flat) == len(set(flat)) == world * samplers[0].steps_per_epoch * batch
        assert all(0 <= i < n for i in flat)
    assert _epoch(samplers[0], 0) != _epoch(samplers[0], 1)  # reshuffled each epoch
    assert _epoch(samplers[0], 3) == _epoch(ShardedBatchSampler(n, batch, 0, world, seed=11), 3)
    assert _epoch(samplers[0], 3) != _epoch(ShardedBatchSampler(n, batch, 0, world, seed=12), 3)
    samplers[0].set_epoch(5, 2)
    keys = next(iter(samplers[0]))
    assert all(isinstance(k, SampleKey) and k.epoch == 5 for k in keys)


def test_sampler_skip_is_the_suffix_of_the_epoch():
    sampler = ShardedBatchSampler(64, 4, 1, 2, seed=0)
    full = _epoch(sampler, 2)
    for skip in (0, 1, 5, sampler.steps_per_epoch):
        assert _epoch(sampler, 2, skip) == full[skip:]
        assert len(sampler) == sampler.steps_per_epoch - skip
    with pytest.raises(ValueError, match="skip"):
        sampler.set_epoch(0, sampler.steps_per_epoch + 1)


def test_sampler_rejects_a_batch_larger_than_a_shard():
    with pytest.raises(ValueError, match="train.batch_size=20"):
        ShardedBatchSampler(30, 20, 0, 2, seed=0)


# --- the stream: exact resume, independent of loader workers ------------------------------------------
def _stream(root: Path, workers: int, rank: int = 0, world: int = 2) -> ImageNetStream:
    return ImageNetStream(
        str(root),
        image_size=16,
        batch_size=3,
        eval_batch_size=4,
        workers=workers,
        seed=5,
        rank=rank,
        world_size=world,
        device=torch.device("cpu"),
    )


def _collect(stream: ImageNetStream, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in stream.train_batches(epoch, skip)]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_mid_epoch_is_exact_and_independent_of_loader_workers(tree):
    inline = _stream(tree, workers=0)
    assert inline.steps_per_epoch == (24 // 2) // 3
    full = _collect(inline, epoch=1)
    _assert_same(_collect(inline, epoch=1, skip=2), full[2:])
    assert not torch.equal(full[0][0], _collect(inline, epoch=2)[0][0])  # new crops, new order
    pooled = _stream(tree, workers=2)  # samples decoded by whichever worker is free
    _assert_same(_collect(pooled, epoch=1), full)
    _assert_same(_collect(pooled, epoch=1, skip=3), full[3:])
    _assert_same(_collect(pooled, epoch=1), full)  # persistent workers serve a new pass


def test_validation_is_split_over_ranks_without_overlap(tree):
    labels = []
    for rank in range(2):
        labels += [int(v) for _, y in _stream(tree, workers=0, rank=rank).val_batches() for v in y]
    assert sorted(labels) == sorted(int(v) for v in list_split(tree / "val").labels)


def test_train_subset_keeps_a_fixed_shuffle(tree):
    files = list_split(tree / "train")
    a, b = files.subset(10, seed=1), files.subset(10, seed=1)
    assert len(a) == 10 and list(a.paths) == list(b.paths)
    assert list(a.paths) != list(files.subset(10, seed=2).paths)
    assert files.subset(None, seed=1) is files


# --- model --------------------------------------------------------------------------------------------
def test_resnet50_matches_torchvision_layout_and_zero_inits_residual_gammas():
    model = build_model(ModelConfig(arch="resnet50"), "imagenet", num_classes=1000)
    reference = torchvision.models.resnet50()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    last_bns = [m.bn3 for m in model.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(last_bns) == 16 and all(not bn.weight.detach().any() for bn in last_bns)
    assert bool((model.bn1.weight.detach() == 1).all())  # other gammas start at 1


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_narrow_resnets_classify_small_images(arch):
    model = build_model(ModelConfig(arch=arch, width=0.125), "imagenet", num_classes=7)
    assert model.conv1.out_channels == 8
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_arch_lists_the_imagenet_architectures():
    with pytest.raises(ValueError, match="resnet50, resnet18"):
        build_model(ModelConfig(arch="resnet101"), "imagenet", num_classes=10)


def test_no_decay_bn_bias_groups():
    model = build_model(ModelConfig(arch="resnet18", width=0.125), "imagenet", num_classes=5)
    decayed, exempt = build_optimizer(OptimConfig(no_decay_bn_bias=True), model, 0.1).param_groups
    assert decayed["weight_decay"] == 1e-4 and exempt["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    assert len(build_optimizer(OptimConfig(), model, 0.1).param_groups) == 1


# --- the task -----------------------------------------------------------------------------------------
def test_task_trains_and_evaluates_in_one_process(tree, single_process_group):
    args = TaskArgs(
        model=ModelConfig(arch="resnet18", width=0.125, channels_last=True),
        data=DataConfig(root=str(tree), workers=0, image_size=32),
        eval=EvalConfig(),
        batch_size=4,
        eval_batch_size=5,
        seed=0,
        worker=WorkerInfo(0, 1, 0, torch.device("cpu")),
    )
    task = TASKS["imagenet"](args)
    assert task.steps_per_epoch == 24 // 4 and task.train_size == 24 and task.metric.split == "val"
    assert task.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    for batch in task.train_batches(0, 3):
        assert batch[0].is_contiguous(memory_format=torch.channels_last)
        loss, units = task.loss(task.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert units == 4 and loss.ndim == 0
    result = task.evaluate(task.model, True)
    assert {"top1", "top5", "loss"} <= set(result)
    assert 0 <= result["top1"] <= result["top5"] == 100.0  # 3 classes: top-5 always hits


# --- 2 processes through the CLI --------------------------------------------------------------------
SMOKE = [
    "task=imagenet",
    "model.width=0.125",
    "data.image_size=32",
    "train.batch_size=4",
    "train.max_steps=4",
    "train.log_every=2",
    "train.eval_batch_size=8",
    "train.progress=log",
    "launcher.nproc_per_node=2",
    "launcher.threads_per_worker=1",
]


def _cli(args: list[str], cwd: Path, timeout: float = 300) -> dict:
    env = launch_env()
    run_dir = cwd / "run"
    result = subprocess.run(
        [sys.executable, "-m", "slowmo_train", *args, f"output_dir={run_dir}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = read_metrics(run_dir)
    return {
        "train": [e for e in events if e["event"] == "train"],
        "eval": [e for e in events if e["event"] == "eval"],
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "log": result.stdout + result.stderr,
    }


@pytest.mark.multiproc
def test_two_workers_sgp_slowmo_with_loader_processes(tree, tmp_path):
    out = _cli(
        [*SMOKE, "algorithm=sgp", "slowmo.enabled=true", "slowmo.tau=2", "data.workers=1", f"data.root={tree}"],
        tmp_path,
    )
    assert [e["step"] for e in out["train"]] == [2, 4]
    assert all(e["samples_per_s"] > 0 and np.isfinite(e["loss"]) for e in out["train"])
    final = out["eval"][-1]
    assert final["split"] == "val" and 0 <= final["top1"] <= final["top5"] <= 100
    assert out["summary"]["metric"] == "top1" and out["summary"]["steps"] == 4


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("precision,algorithm", [("bf16", "allreduce"), ("fp16", "sgp")])
def test_two_workers_mixed_precision_channels_last(tree, tmp_path, precision, algorithm):
    out = _cli(
        [
            *SMOKE,
            f"algorithm={algorithm}",
            "slowmo.enabled=true",
            "slowmo.tau=2",
            f"train.precision={precision}",
            "model.channels_last=true",
            "optim.no_decay_bn_bias=true",
            "data.workers=0",
            f"data.root={tree}",
        ],
        tmp_path,
    )
    assert out["summary"]["steps"] == 4 and "top5" in out["eval"][-1]
    assert all(np.isfinite(e["loss"]) for e in out["train"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the shared ImageNet sample is not present")
def test_real_sample_sgp_slowmo_two_loader_workers(tmp_path):
    """SGP + SlowMo on ImageNet at smoke size, on the 600 real images with two loader workers."""
    out = _cli(
        [
            "task=imagenet",
            "algorithm=sgp",
            "slowmo.enabled=true",
            "model.width=0.125",
            "data.image_size=64",
            "data.workers=2",
            "train.batch_size=8",
            "train.max_steps=12",
            "train.log_every=4",
            "train.eval_batch_size=50",
            "train.progress=log",
            "launcher.nproc_per_node=2",
            "launcher.threads_per_worker=1",
            f"data.root={SAMPLE}",
        ],
        tmp_path,
        timeout=600,
    )
    assert out["summary"]["steps"] == 12
    assert 0 <= out["eval"][-1]["top1"] <= out["eval"][-1]["top5"] <= 100


@pytest.mark.multiproc
@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_one_mid_epoch(tree, tmp_path):
    """Stop after step 5 (2 batches into the second 3-step epoch), resume to step 9: every logged loss
    and the final evaluation match an uninterrupted run, with a loader worker process on."""
    common = [
        *SMOKE,
        "algorithm=local_sgd",
        "data.workers=1",
        "train.log_every=1",
        "train.eval_every_epochs=100",
        f"data.root={tree}",
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _cli([*common, "train.max_steps=9"], tmp_path / "a")
    _cli([*common, "train.max_steps=5"], tmp_path / "b")
    resumed = _cli([*common, "train.max_steps=9", "resume=auto"], tmp_path / "b")
    whole_losses = [(e["step"], e["loss"]) for e in whole["train"]]
    resumed_losses = [(e["step"], e["loss"]) for e in resumed["train"]]
    assert whole_losses[5:] == resumed_losses[-4:]
    assert whole["eval"][-1]["loss"] == resumed["eval"][-1]["loss"]


@pytest.mark.slow
def test_pipeline_benchmark_reports_both_rates(tree, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_imagenet_pipeline.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--root",
            str(tree),
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "0,1",
            "--batches",
            "3",
            "--width",
            "0.125",
            "--model-batch",
            "2",
            "--model-steps",
            "1",
            "--json",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["model_images_per_s"] > 0 and figures["workers_needed"] >= 1
    assert all(v["images_per_s"] > 0 for v in figures["loader"].values())
