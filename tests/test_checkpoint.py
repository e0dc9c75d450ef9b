"""Checkpoint files on one process: atomic writes, manifests, choosing what to resume, and every way
a checkpoint can be unusable (each a one-line CheckpointError naming the file).

    .venv/bin/python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from slowmo_train import checkpoint as ck
from slowmo_train.faults import FaultInjector
from slowmo_train.metrics import truncate_jsonl

CONFIG = {
    "model": {"arch": "resnet18", "width": 0.25},
    "train": {"max_steps": 10, "log_every": 5, "epochs": 3},
    "seed": 0,
    "launcher": {"nproc_per_node": 1},
}


def _state(step: int, rank: int = 0) -> dict:
    return {"format": ck.FORMAT, "step": step, "rank": rank, "model": {"w": torch.full((3,), float(step))}}


def _save(run_dir, step: int, keep: int = 5, faults=None):
    saver = ck.Checkpointer(run_dir, keep=keep, rank=0, world_size=1, faults=faults)
    return saver.save(step, _state(step), CONFIG)


def test_save_writes_rank_file_and_manifest_last(tmp_path):
    path = _save(tmp_path, 4)
    assert path == ck.step_dir(tmp_path, 4)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 1 and manifest["config"] == CONFIG
    entry = manifest["files"]["0"]
    assert entry["bytes"] == (path / "rank0.pt").stat().st_size and len(entry["sha256"]) == 64
    _, state = ck.load_rank_state(path, 0)
    assert torch.equal(state["model"]["w"], torch.full((3,), 4.0))
    assert not [p for p in path.iterdir() if ".tmp" in p.name], "temporary files left behind"


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ck.list_step_dirs(ck.checkpoint_root(tmp_path))] == [8, 6]


def test_auto_skips_incomplete_newest_with_a_warning(tmp_path):
    _save(tmp_path, 3)
    newest = _save(tmp_path, 6)
    (newest / ck.MANIFEST).unlink()  # as if the job died before rank 0 wrote the manifest
    path, warnings = ck.resolve_resume("auto", tmp_path)
    assert path == ck.step_dir(tmp_path, 3)
    assert len(warnings) == 1 and "step_00000006" in warnings[0] and "manifest.json is missing" in warnings[0]


def test_auto_without_checkpoints_starts_fresh(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) == (None, [])
    assert ck.resolve_resume("none", tmp_path) == (None, [])


def test_resume_path_accepts_checkpoint_or_run_dir(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 5)
    assert ck.resolve_resume(str(ck.step_dir(tmp_path, 2)), None)[0] == ck.step_dir(tmp_path, 2)
    assert ck.resolve_resume(str(tmp_path), None)[0] == ck.step_dir(tmp_path, 5)
    with pytest.raises(ck.CheckpointError, match="not a checkpoint"):
        ck.resolve_resume(str(tmp_path / "nothing"), None)


def test_truncated_rank_file_is_refused(tmp_path):
    path = _save(tmp_path, 4)
    rank_file = path / "rank0.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    with pytest.raises(ck.CheckpointError, match=r"rank0\.pt \(rank 0\) is truncated") as err:
        ck.load_rank_state(path, 0)
    assert "\n" not in str(err.value)
    # resume=auto treats it as incomplete and falls back to nothing (no older checkpoint)
    assert ck.resolve_resume("auto", tmp_path)[0] is None


def test_corrupt_rank_file_fails_its_checksum(tmp_path):
    path = _save(tmp_path, 4)
    rank_file = path / "rank0.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    rank_file.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=r"rank0\.pt is corrupt: its SHA-256 does not match"):
        ck.load_rank_state(path, 0)


def test_garbage_with_matching_checksum_is_refused_without_traceback(tmp_path):
    path = _save(tmp_path, 4)
    rank_file = path / "rank0.pt"
    rank_file.write_bytes(b"not a zip file at all")
    manifest = json.loads((path / ck.MANIFEST).read_text())
    import hashlib

    digest = hashlib.sha256(rank_file.read_bytes()).hexdigest()
    manifest["files"]["0"].update(bytes=rank_file.stat().st_size, sha256=digest)
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match=r"rank0\.pt cannot be loaded"):
        ck.load_rank_state(path, 0)


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    """weights_only loading refuses pickled objects (a file crafted to run code)."""
    path = _save(tmp_path, 4)
    ck.write_atomic(path / "rank0.pt", lambda f: torch.save({"format": 1, "evil": _Evil()}, f))
    manifest = json.loads((path / ck.MANIFEST).read_text())
    import hashlib

    data = (path / "rank0.pt").read_bytes()
    manifest["files"]["0"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match="cannot be loaded"):
        ck.load_rank_state(path, 0)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_missing_rank_file(tmp_path):
    path = _save(tmp_path, 4)
    (path / "rank0.pt").unlink()
    with pytest.raises(ck.CheckpointError, match=r"rank0\.pt \(rank 0\) is missing"):
        ck.check_complete(path)


def test_world_size_mismatch(tmp_path):
    path = _save(tmp_path, 4)
    manifest = ck.check_complete(path)
    with pytest.raises(ck.CheckpointError, match="written by 1 workers, this run has 2"):
        ck.check_compatible(manifest, CONFIG, 2, path)


def test_frozen_and_mutable_keys(tmp_path):
    path = _save(tmp_path, 4)
    manifest = ck.check_complete(path)
    # run length, logging and launcher settings may change
    ok = json.loads(json.dumps(CONFIG))
    ok["train"].update(max_steps=20, log_every=1)
    ok["launcher"]["nproc_per_node"] = 1
    ck.check_compatible(manifest, ok, 1, path)
    for key, value in (("model", {"arch": "resnet18", "width": 0.5}), ("seed", 1)):
        bad = {**CONFIG, key: value}
        with pytest.raises(ck.CheckpointError, match=f"written with {key}"):
            ck.check_compatible(manifest, bad, 1, path)
    bad = json.loads(json.dumps(CONFIG))
    bad["train"]["epochs"] = 4  # the lr schedule follows train.epochs
    with pytest.raises(ck.CheckpointError, match=r"train\.epochs=3, this run has train\.epochs=4"):
        ck.check_compatible(manifest, bad, 1, path)


def test_model_shape_mismatch_names_the_entry(tmp_path):
    model = torch.nn.Linear(3, 2)
    saved = torch.nn.Linear(3, 4).state_dict()
    shapes = r"model entry weight has shape \[4, 3\] in the checkpoint and \[2, 3\]"
    with pytest.raises(ck.CheckpointError, match=shapes):
        ck.check_model_shapes(saved, model, tmp_path / "rank0.pt")


def test_rng_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ck.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ck.write_atomic(tmp_path / "rng.pt", lambda f: torch.save(state, f))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 3)
    faults = FaultInjector(0, "disk_full@step=6")
    with pytest.raises(ck.CheckpointError, match="No space left on device.*step_00000003.*intact|previous"):
        ck.Checkpointer(tmp_path, keep=1, rank=0, world_size=1, faults=faults).save(6, _state(6), CONFIG)
    path, warnings = ck.resolve_resume("auto", tmp_path)
    assert path == ck.step_dir(tmp_path, 3)
    assert not (ck.step_dir(tmp_path, 6) / "rank0.pt").exists()


def test_unwritable_checkpoint_directory(tmp_path):
    (tmp_path / ck.CHECKPOINTS).write_text("a file where the directory should be")
    with pytest.raises(ck.CheckpointError, match="cannot create"):
        _save(tmp_path, 2)


def test_resave_of_a_step_invalidates_its_old_manifest_first(tmp_path):
    path = _save(tmp_path, 4)
    faults = FaultInjector(0, "disk_full@step=4")
    with pytest.raises(ck.CheckpointError):
        ck.Checkpointer(tmp_path, keep=5, rank=0, world_size=1, faults=faults).save(4, _state(4), CONFIG)
    assert not (path / ck.MANIFEST).exists()


def test_truncate_jsonl_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "train", "step": s}) for s in (2, 4, 6, 8)]
    path.write_text("\n".join(lines) + '\n{"event": "tra')
    assert truncate_jsonl(path, 4) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]


def test_fault_spec_parsing_and_finiteness_check():
    from slowmo_train.faults import Fault, all_finite, parse_faults

    assert parse_faults("kill@step=7,rank=1; hang@step=3,seconds=5") == [Fault("kill", 7, 1), Fault("hang", 3, 0, 5.0)]
    with pytest.raises(ValueError, match="SLOWMO_TRAIN_FAULTS: cannot parse 'explode@step=1'"):
        parse_faults("explode@step=1")
    assert all_finite([torch.ones(3), None]) and not all_finite([torch.tensor([1.0, float("inf")])])
