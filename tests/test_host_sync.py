"""No host synchronisation in a training step: on a GPU, ``.item()``, ``float(t)``, ``.cpu()``,
``.tolist()`` or ``bool(t)`` on a device tensor makes the host wait for the device and empties the
queue of work that overlaps communication. Counted here on the CPU, where the same calls happen.

    .venv/bin/python -m pytest -q tests/test_host_sync.py

Every algorithm, with and without SlowMo (exact, streamed, sharded), runs real steps through the
Trainer on 2 gloo ranks; every host read made inside ``Trainer.train_step`` (the hooks, the loss,
the backward pass) is counted, except inside ``optimizer.step`` (torch's optimizers keep their own
step counters on the host). Reads at log points, evaluation and checkpoints are allowed and not
counted. ``train.precision=fp16`` (the scaler's skip check) and ``train.nonfinite=skip`` (the
agreement on a non-finite step) add one read per step by design and are not part of this test.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_image_folder_cifar
from tests.distributed_helpers import run_distributed

pytestmark = pytest.mark.multiproc

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
SLOWMO = {"enabled": True, "tau": 2, "beta": 0.5}
CONFIGS = {
    "allreduce": {"algorithm": {"name": "allreduce"}},
    "allreduce_slowmo": {"algorithm": {"name": "allreduce"}, "slowmo": SLOWMO},
    "local_sgd_slowmo_streamed": {
        "algorithm": {"name": "local_sgd", "period": 2},
        "slowmo": {**SLOWMO, "tau": 4, "fragments": 2, "overlap_steps": 1, "outer_dtype": "bfloat16"},
    },
    "sgp_slowmo_sharded": {"algorithm": {"name": "sgp", "consensus_every": 1}, "slowmo": {**SLOWMO, "sharded": True}},
    "osgp_bf16": {"algorithm": {"name": "osgp", "synch_freq": 1, "consensus_every": 2}, "train": {"precision": "bf16"}},
    "osgp_slowmo_sharded_streamed": {
        "algorithm": {"name": "osgp", "synch_freq": 1},
        "slowmo": {**SLOWMO, "tau": 4, "sharded": True, "fragments": 2, "overlap_steps": 2},
    },
    # the control: nonfinite=skip reads one finiteness flag per step by design, so the counter must see it
    "skip_mode_control": {"algorithm": {"name": "local_sgd", "period": 2}, "train": {"nonfinite": "skip"}},
}
STEPS = 6


def _count_reads(rank: int, world: int, data_root: str, root: str) -> dict:
    from pathlib import Path

    from omegaconf import OmegaConf

    from slowmo_train.config import JobConfig, to_job_config
    from slowmo_train.dist import DistEnv
    from slowmo_train.trainer import Trainer

    counter = {"on": False, "reads": []}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            if counter["on"]:
                counter["reads"].append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    out = {}
    try:
        for label, overrides in CONFIGS.items():
            base = OmegaConf.merge(
                OmegaConf.structured(JobConfig),
                {
                    "model": {"width": 0.125},
                    "data": {"root": data_root},
                    "train": {
                        "batch_size": 8,
                        "epochs": 2,
                        "max_steps": STEPS,
                        "log_every": STEPS,
                        "eval_every_epochs": 100,
                        "eval_batch_size": 50,
                        "progress": "none",
                    },
                    "checkpoint": {"every_minutes": 0, "at_end": False},
                    "output_dir": f"{root}/{label}",
                },
                overrides,
            )
            run_dir = Path(root) / label
            run_dir.mkdir(parents=True, exist_ok=True)
            trainer = Trainer(
                to_job_config(base), DistEnv(rank, world, rank, world, True), torch.device("cpu"), run_dir
            )
            step_fn, opt_step = trainer.train_step, trainer.optimizer.step

            def optimizer_step(*args, opt_step=opt_step, **kwargs):
                was, counter["on"] = counter["on"], False
                try:
                    return opt_step(*args, **kwargs)
                finally:
                    counter["on"] = was

            def train_step(*args, step_fn=step_fn, **kwargs):
                counter["on"] = True
                try:
                    return step_fn(*args, **kwargs)
                finally:
                    counter["on"] = False

            trainer.optimizer.step = optimizer_step
            trainer.train_step = train_step
            counter["reads"] = []
            summary = trainer.run()
            out[label] = {"steps": summary["steps"], "reads": list(counter["reads"])}
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return out


def test_no_host_reads_inside_a_training_step(tmp_path):
    data = write_image_folder_cifar(tmp_path / "cifar", n_train=64, n_test=20)
    for rank, result in enumerate(run_distributed(_count_reads, 2, args=(str(data), str(tmp_path / "runs")))):
        for label, r in result.items():
            assert r["steps"] == STEPS, (rank, label)
            if label == "skip_mode_control":
                assert len(r["reads"]) >= STEPS, f"the counter missed the skip mode's per-step read: {r['reads']}"
            else:
                assert r["reads"] == [], f"rank {rank}, {label}: host reads in {STEPS} steps: {r['reads']}"
