"""Checkpoints that resume a run bit-exactly, and the choice of the one to resume from.

    slowmo-train ... output_dir=runs/a checkpoint.every_steps=500     # writes runs/a/checkpoints/
    slowmo-train ... output_dir=runs/a resume=auto                    # continues where it stopped

Layout: ``RUN_DIR/checkpoints/step_00000500/{rank0.pt, rank1.pt, ..., manifest.json}``. Every rank
writes its own file (with gossip or Local SGD the ranks' models differ; sharded SlowMo keeps a
different slice of the slow state on each rank): first under a temporary name, fsync'ed, then
renamed. After all ranks report success, rank 0 writes ``manifest.json`` (the step, the world size,
the resolved config and every rank file's size and SHA-256) the same way. A checkpoint is
*complete* only when its manifest exists and every file it lists has the listed size, so a crash or
a full disk during a save never leaves a checkpoint that ``resume=auto`` would load.

A rank file holds everything the next step depends on: model, base optimizer, algorithm state
(SlowMo x0/u shards, push-sum numerators/weight with in-flight OSGP messages), gradient scaler, the
Python/NumPy/torch/CUDA RNG states, the step (the data position follows from it: tasks'
``train_batches(epoch, skip)`` are deterministic) and the trainer's counters, including the loss
accumulated since the last log line, so that the logged losses of a resumed run equal those of an
uninterrupted one. Files are read with ``torch.load(weights_only=True)``: no code runs from a file.

Which config keys may differ on resume (:data:`MUTABLE_ON_RESUME`): run length (``train.max_steps``),
logging, evaluation cadence and settings, checkpoint cadence, launcher settings other than the world
size, data paths, and the device's math and layout (``train.tf32``, ``model.channels_last``: a run
saved on the CPU resumes on GPUs). Everything else (task, model, algorithm, SlowMo, optimizer and schedule,
``train.epochs``, batch sizes, precision, seed) and the world size must match, or the resume stops
with one line naming the key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slowmo_train import control
from slowmo_train.faults import FaultInjector, RunError

log = logging.getLogger("slowmo_train")

FORMAT = 1
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")

#: config keys (prefixes ending in ".") that may change when a run is resumed; all others must match
MUTABLE_ON_RESUME = (
    "train.max_steps", "train.log_every", "train.eval_every_epochs", "train.eval_batch_size", "train.progress",
    "train.nonfinite", "train.max_nonfinite_skips", "checkpoint.", "launcher.", "eval.", "data.root",
    "data.cache_dir", "data.download", "data.workers", "name", "output_dir", "resume", "train.tf32",
    "model.channels_last",
)


class CheckpointError(RunError):
    """A checkpoint cannot be written or used; the message names the file and the problem."""


# --- where checkpoints are ----------------------------------------------------------------------
def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def read_manifest(ckpt: Path) -> dict:
    path = ckpt / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {MANIFEST} is missing "
                              "(the save was interrupted)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"{path} is not a slowmo-train checkpoint manifest of format {FORMAT}")
    return manifest


def check_complete(ckpt: Path) -> dict:
    """The manifest of ``ckpt`` if every file it lists exists with the listed size, else
    CheckpointError naming the first problem."""
    manifest = read_manifest(ckpt)
    for rank in range(int(manifest["world_size"])):
        entry = manifest["files"].get(str(rank))
        if entry is None:
            raise CheckpointError(f"{ckpt / MANIFEST} lists no file for rank {rank}")
        path = ckpt / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path} (rank {rank}) is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path} (rank {rank}) is truncated or was changed: {size} bytes, "
                                  f"the manifest says {entry['bytes']}")
    return manifest


def newest_complete(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` (a ``checkpoints`` directory) and a warning
    for every newer incomplete one that was skipped."""
    warnings = []
    for _, ckpt in list_step_dirs(root):
        try:
            check_complete(ckpt)
            return ckpt, warnings
        except CheckpointError as err:
            warnings.append(f"skipping incomplete checkpoint: {err}")
    return None, warnings


def resolve_resume(resume: str, run_dir: Path | None) -> tuple[Path | None, list[str]]:
    """Turn ``resume`` (none | auto | PATH) into a complete checkpoint directory or None (start
    fresh), plus warnings to log. Raises CheckpointError for a PATH that cannot be used."""
    if resume == "none":
        return None, []
    if resume == "auto":
        return newest_complete(checkpoint_root(run_dir)) if run_dir is not None else (None, [])
    path = Path(resume).expanduser()
    if (path / MANIFEST).exists():
        check_complete(path)
        return path, []
    for root in (path / CHECKPOINTS, path):  # a run directory, or its checkpoints/ directory
        if list_step_dirs(root):
            ckpt, warnings = newest_complete(root)
            if ckpt is None:
                raise CheckpointError(f"resume={resume}: no complete checkpoint in {root} ({'; '.join(warnings)})")
            return ckpt, warnings
    if path.is_dir() and _STEP_DIR.match(path.name):
        read_manifest(path)  # raises: the save of this checkpoint never completed
    raise CheckpointError(f"resume={resume}: not a checkpoint (no {MANIFEST}) nor a run directory with "
                          f"{CHECKPOINTS}/; use resume=auto or the path of RUN_DIR/{CHECKPOINTS}/step_N")


# --- which config changes a resume allows ----------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUTABLE_ON_RESUME)


def check_compatible(manifest: dict, config: dict, world_size: int, where: Path) -> None:
    """Raise CheckpointError (one line) if this run cannot continue the checkpoint's."""
    if int(manifest["world_size"]) != world_size:
        raise CheckpointError(f"{where} was written by {manifest['world_size']} workers, this run has {world_size}: "
                              "resume with the same number of workers (launcher.nproc_per_node / torchrun)")
    saved, now = _flatten(manifest.get("config", {})), _flatten(config)
    for key in sorted(saved.keys() & now.keys()):
        if not _mutable(key) and saved[key] != now[key]:
            raise CheckpointError(
                f"{where} was written with {key}={saved[key]!r}, this run has {key}={now[key]!r}: only run "
                "length, logging, evaluation, checkpoint and launcher settings and data paths may change on "
                f"resume; set {key}={saved[key]!r} or start a new run (another output_dir, resume=none)")


# --- RNG state ------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Every global RNG as plain types and tensors (what weights_only loading accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing --------------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, save_fn, on_write=None) -> tuple[str, int]:
    """Write through ``save_fn(file)`` to a temporary name, fsync, then rename to ``path``.
    Returns (sha256 hex, bytes). The temporary file is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            if on_write is not None:
                on_write()
            save_fn(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return writer.sha.hexdigest(), writer.bytes


class Checkpointer:
    """Saves this rank's state into ``RUN_DIR/checkpoints/step_N`` (collective) and prunes old ones."""

    def __init__(self, run_dir: Path, keep: int, rank: int, world_size: int, faults: FaultInjector | None = None,
                 every_steps: int = 0, at_end: bool = True):
        self.run_dir, self.keep, self.rank, self.world_size = Path(run_dir), keep, rank, world_size
        self.faults, self.every_steps, self.at_end = faults, every_steps, at_end
        self.last_path: Path | None = None
        self.last_saved_at = time.monotonic()

    def should_save(self, step: int, done: bool, asked: bool = False) -> bool:
        """Every ``every_steps`` steps, at the last step (``at_end``), or when ``asked`` (a stop
        signal, or ``checkpoint.every_minutes`` elapsed: the ranks agree on those first)."""
        return asked or (self.every_steps > 0 and step % self.every_steps == 0) or (done and self.at_end)

    def seconds_since_save(self) -> float:
        return time.monotonic() - self.last_saved_at

    def save(self, step: int, state: dict, config: dict, meta: dict | None = None) -> Path:
        """Every rank calls it at the same step. Returns the checkpoint directory; raises
        CheckpointError on every rank if any rank could not write (no manifest is written then,
        and the previous checkpoints are untouched)."""
        start = time.perf_counter()
        ckpt = step_dir(self.run_dir, step)
        error = None
        if self.rank == 0:
            # Re-saving a step (after resuming from an older checkpoint) must first invalidate the
            # old manifest, so that a crash mid-save cannot pair it with new rank files.
            try:
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / MANIFEST).unlink(missing_ok=True)
            except OSError as err:
                error = f"cannot create {ckpt}: {err.strerror or err}"
        error = control.broadcast_object(error)
        if error is not None:
            raise CheckpointError(f"checkpoint of step {step} not written: {error}; the previous checkpoint is intact")

        name = f"rank{self.rank}.pt"
        status: dict[str, Any] = {"file": name}
        try:
            on_write = (lambda: self.faults.on_checkpoint_write(step)) if self.faults else None
            sha, nbytes = write_atomic(ckpt / name, lambda f: torch.save(state, f), on_write)
            status.update(sha256=sha, bytes=nbytes)
        except OSError as err:
            status["error"] = f"rank {self.rank} cannot write {ckpt / name}: {err.strerror or err}"
        if self.faults:
            self.faults.after_checkpoint_write(step)
        statuses = control.all_gather_object(status)
        errors = [s["error"] for s in statuses if "error" in s]
        if errors:
            raise CheckpointError(f"checkpoint of step {step} not written: {errors[0]}; "
                                  f"the previous checkpoint ({self.last_path or 'none'}) is intact")

        if self.rank == 0:
            manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {}), "config": config,
                        "files": {str(r): s for r, s in enumerate(statuses)}}
            try:
                write_atomic(ckpt / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
                error = None
            except OSError as err:
                error = f"cannot write {ckpt / MANIFEST}: {err.strerror or err}"
        error = control.broadcast_object(error)
        if error is not None:
            raise CheckpointError(f"checkpoint of step {step} not written: {error}; "
                                  f"the previous checkpoint ({self.last_path or 'none'}) is intact")
        self.last_path, self.last_saved_at = ckpt, time.monotonic()
        if self.rank == 0:
            self.prune()
            mb = sum(s["bytes"] for s in statuses) / len(statuses) / 2**20
            log.info("checkpoint of step %d: %s (%.1f MB/rank, %.2fs)", step, ckpt, mb, time.perf_counter() - start)
        return ckpt

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and incomplete leftovers
        older than the newest complete one."""
        complete = 0
        for _, ckpt in list_step_dirs(checkpoint_root(self.run_dir)):
            try:
                check_complete(ckpt)
                is_complete = True
            except CheckpointError:
                is_complete = False
            if is_complete and complete < self.keep:
                complete += 1
            elif complete > 0:
                shutil.rmtree(ckpt, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------------
def load_rank_state(ckpt: Path, rank: int) -> tuple[dict, dict]:
    """(manifest, this rank's state) after verifying size and checksum; CheckpointError otherwise.

    The state is loaded onto the CPU, whatever device wrote it: each component moves what it needs
    to its device when it loads its part (``load_state_dict`` copies into the model's tensors, the
    optimizer casts to its parameters' device and keeps scalar step counters on the CPU), and the
    RNG states, which ``torch.set_rng_state`` accepts only as CPU tensors, stay where they are."""
    manifest = check_complete(ckpt)
    entry = manifest["files"][str(rank)]
    path = ckpt / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {ckpt / MANIFEST}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip error: the file is unusable
        raise CheckpointError(f"{path} cannot be loaded: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a slowmo-train rank checkpoint of format {FORMAT}")
    if int(state.get("rank", -1)) != rank or int(state.get("step", -1)) != int(manifest["step"]):
        raise CheckpointError(f"{path} holds rank {state.get('rank')} step {state.get('step')}, "
                              f"expected rank {rank} step {manifest['step']}")
    return manifest, state


def check_model_shapes(saved: dict, model: torch.nn.Module, path: Path) -> None:
    """One line naming the first parameter/buffer whose name or shape differs."""
    current = model.state_dict()
    for key in list(current) + [k for k in saved if k not in current]:  # in model order
        if key not in current:
            raise CheckpointError(f"{path}: the checkpoint has model entry {key!r} that this model lacks "
                                  "(model.arch changed?)")
        if key not in saved:
            raise CheckpointError(f"{path}: this model has entry {key!r} that the checkpoint lacks "
                                  "(model.arch changed?)")
        if tuple(saved[key].shape) != tuple(current[key].shape):
            raise CheckpointError(f"{path}: model entry {key} has shape {list(saved[key].shape)} in the checkpoint "
                                  f"and {list(current[key].shape)} in this model (model.width or model.arch changed?)")
