"""Is the ImageNet input pipeline fast enough for ResNet-50? Images/s of the data pipeline per loader
worker process against the model's own training rate, on this machine.

    python scripts/bench_imagenet_pipeline.py                         # the shared 600-image sample
    python scripts/bench_imagenet_pipeline.py --root /data/imagenet --workers 0,1,2,4 --json out.json

A  pipeline: ``slowmo_train.data.imagenet.ImageNetStream`` exactly as the task builds it (one rank):
   read + PIL decode + RGB conversion + random resized crop + flip in ``--workers`` DataLoader worker
   processes, collation, then normalisation in this process. Timed over ``--batches`` batches after
   the first (worker start-up excluded), across epochs if the split is short. Reported per worker
   process: the rate one worker sustains.
B  model: ResNet-50 (``--width``) forward + backward + Nesterov SGD step on synthetic input of the
   same size, with ``--threads`` intra-op threads (a training process's share of the cores), after
   one warm-up step.

The loader is not the bottleneck when ``workers x per-worker rate`` exceeds the model's rate; the
script prints how many workers a training process needs (``data.workers``). Both sides compete for
the same cores, so on a small machine run it while nothing else is busy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from slowmo_train.data.imagenet import ImageNetStream
from slowmo_train.models.resnet import resnet50

REPO = Path(__file__).resolve().parents[1]


def pipeline_rate(root: str, image_size: int, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of the training stream with ``workers`` loader processes."""
    stream = ImageNetStream(
        root,
        image_size=image_size,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        workers=workers,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
    )
    epoch, seen, start = 0, -1, None
    while seen < batches:
        for _ in stream.train_batches(epoch):
            seen += 1
            if seen == 0:
                start = time.perf_counter()  # after the first batch: worker start-up is not throughput
            if seen == batches:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - start)


def model_rate(image_size: int, batch_size: int, width: float, steps: int, threads: int) -> float:
    """Images/s of ResNet-50 training steps on synthetic input."""
    torch.set_num_threads(threads)
    model = resnet50(num_classes=1000, width=width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 1000, (batch_size,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator and kernel selection
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        default=str(REPO.parent / "shared" / "data" / "imagenet_sample"),
        help="ImageFolder root with train/ and val/",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch (the paper's per-GPU 32)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts to time")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per worker count")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-50 channel width multiplier")
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the training process")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    figures: dict = {"image_size": args.image_size, "loader": {}, "threads": args.threads, "width": args.width}
    print(f"pipeline: {args.root}, {args.image_size}px crops, batch {args.batch_size}, {args.batches} batches timed")
    for workers in (int(w) for w in args.workers.split(",")):
        rate = pipeline_rate(args.root, args.image_size, args.batch_size, workers, args.batches)
        per_worker = rate / max(workers, 1)
        figures["loader"][workers] = {"images_per_s": rate, "images_per_s_per_worker": per_worker}
        where = "in the training process" if workers == 0 else f"{workers} worker process(es)"
        print(f"  data.workers={workers}: {rate:8.1f} images/s ({where}; {per_worker:.1f} per worker)")

    rate = model_rate(args.image_size, args.model_batch, args.width, args.model_steps, args.threads)
    figures["model_images_per_s"] = rate
    print(
        f"model: ResNet-50 width {args.width:g}, forward+backward+SGD, batch {args.model_batch}, "
        f"{args.threads} thread(s): {rate:.1f} images/s"
    )

    per_worker = (
        max(v["images_per_s_per_worker"] for k, v in figures["loader"].items() if k > 0)
        if any(k > 0 for k in figures["loader"])
        else figures["loader"][0]["images_per_s"]
    )
    needed = max(1, math.ceil(rate / per_worker))
    figures.update(per_worker_images_per_s=per_worker, workers_needed=needed, headroom=per_worker / rate)
    print(
        f"one loader worker feeds {per_worker / rate:.1f}x the model's rate: data.workers={needed} keeps a "
        f"training process fed ({'the loader is not the bottleneck' if per_worker >= rate else 'add workers'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
