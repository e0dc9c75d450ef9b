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

Background saves (``checkpoint.background=true``, the default): at the save step every rank copies
its state to host memory (on GPUs a non-blocking copy into pinned buffers and one synchronize; on
the CPU a copy), which is all the step waits for; a thread then writes the rank file (same temporary
name, fsync and rename) while training continues. The collective half of the save (gathering the
ranks' statuses, rank 0's manifest, pruning) runs on the main thread at a step every rank reaches
together, never in the thread (collectives of one group issued from two threads would interleave
differently on different ranks): :meth:`Checkpointer.poll`, called every step, completes the save
once a pipelined 8-byte all-reduce says every rank has written its file; :meth:`Checkpointer.finish`
waits for it (before the next save and at the end of training). A save at a stop signal or at the
last step (``wait=True``) writes directly from the live tensors (no copy: the process exits next),
is complete when it returns, and cancels a background save still in flight (its directory is
removed). The host copy is kept for the next save (pinned allocation is slow, fresh host pages
fault in at ~1 GB/s): background saves cost one copy of the rank's state in host memory; set
``checkpoint.background=false`` where host memory is short. States under
``checkpoint.background_min_mb`` (on every rank) are written directly: they take well under a second,
and a background save is complete only a few steps after it starts (a crash in between falls back
to the previous checkpoint), so small states would gain nothing for that window. Measured costs: docs/RESULTS.md,
"Checkpoint time at cluster scale" (``scripts/bench_checkpoint.py``).

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

import copy
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import threading
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
class SaveCancelled(Exception):
    """A background write given up because a newer checkpoint supersedes it."""


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it, in pieces so that a
    cancelled background write stops within one piece."""

    PIECE = 64 * 2**20

    def __init__(self, f, cancel: threading.Event | None = None):
        self.f, self.sha, self.bytes, self.cancel = f, hashlib.sha256(), 0, cancel

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.PIECE):
            if self.cancel is not None and self.cancel.is_set():
                raise SaveCancelled()
            piece = view[start:start + self.PIECE]
            self.sha.update(piece)  # hashlib and file writes release the GIL: training goes on meanwhile
            self.f.write(piece)
        self.bytes += len(view)
        return len(view)

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


def write_atomic(path: Path, save_fn, on_write=None, cancel: threading.Event | None = None) -> tuple[str, int]:
    """Write through ``save_fn(file)`` to a temporary name, fsync, then rename to ``path``.
    Returns (sha256 hex, bytes). The temporary file is removed if anything fails or ``cancel`` is set
    during the write (SaveCancelled)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f, cancel)
            if on_write is not None:
                on_write()
            save_fn(writer)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # written for a restart, not to be read now: leave the page
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cache to the training
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return writer.sha.hexdigest(), writer.bytes


# --- host snapshots (background saves) -------------------------------------------------------------
def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostStaging:
    """Copies of a state in host memory, whose buffers are reused from one save to the next.

    Copies are made per storage, not per tensor, so that what ``torch.save`` writes is what it would
    have written from the live state: tensors that share memory (tied embeddings, views into a flat
    buffer) still share it, and each storage is stored once. Device storages go to pinned buffers
    through non-blocking copies followed by one synchronize per device. (PyTorch's pinned allocator
    rounds each buffer up to a power of two: transformer weights are powers of two already, ResNet
    convolutions are not and may take up to twice their size in pinned memory.)"""

    def __init__(self):
        self._free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}

    def copy(self, state: Any) -> tuple[Any, list[tuple[tuple[int, bool], torch.UntypedStorage]]]:
        """(the copy, the host buffers it uses: hand them to :meth:`release` once it is written)."""
        copies: dict[tuple, tuple[tuple[int, bool], torch.UntypedStorage]] = {}
        devices: set[torch.device] = set()

        def host(storage: torch.UntypedStorage) -> torch.UntypedStorage:
            key = (storage.device, storage.data_ptr(), storage.nbytes())
            if key not in copies:
                pinned = storage.device.type == "cuda"
                size = (storage.nbytes(), pinned)
                free = self._free.get(size)
                buffer = free.pop() if free else torch.empty(
                    storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
                _as_bytes(buffer).copy_(_as_bytes(storage), non_blocking=pinned)
                if pinned:
                    devices.add(storage.device)
                copies[key] = (size, buffer)
            return copies[key][1]

        seen: dict[int, Any] = {}  # an object met twice is copied once, as pickle stores it once

        def walk(obj: Any) -> Any:
            if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
                return obj
            if id(obj) not in seen:
                seen[id(obj)] = copy_of(obj)
            return seen[id(obj)]

        def copy_of(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                t = obj.detach()
                if t.layout != torch.strided or type(t) is not torch.Tensor or t.is_quantized or t.is_conj() \
                        or t.is_neg():
                    return t.to("cpu", copy=True)  # rare kinds: a plain (synchronous) copy
                out = torch.empty(0, dtype=t.dtype)
                return out.set_(host(t.untyped_storage()), t.storage_offset(), t.size(), t.stride())
            if isinstance(obj, dict):
                out = copy.copy(obj)  # keeps the type and attributes (a module state_dict's _metadata)
                for key, value in obj.items():
                    out[key] = walk(value)
                return out
            if isinstance(obj, list):
                return [walk(x) for x in obj]
            if isinstance(obj, tuple):
                items = [walk(x) for x in obj]
                return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
            return copy.deepcopy(obj)

        snapshot = walk(state)
        for device in devices:
            torch.cuda.synchronize(device)
        self._free.clear()  # buffers this state no longer needs (a shape changed) go back to the system
        return snapshot, list(copies.values())

    def clear(self) -> None:
        self._free.clear()

    def release(self, buffers: list[tuple[tuple[int, bool], torch.UntypedStorage]]) -> None:
        """Keep ``buffers`` (written and no longer referenced by a writer) for the next copy."""
        for size, buffer in buffers:
            self._free.setdefault(size, []).append(buffer)


def state_bytes(state: Any) -> int:
    """Bytes of the tensor storages in ``state`` (each counted once): what a rank file holds."""
    seen: dict[tuple, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.layout == torch.strided:
                storage = obj.untyped_storage()
                seen[(obj.device, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            else:
                seen[(id(obj),)] = obj.element_size() * obj.numel()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(state)
    return sum(seen.values())


class _BackgroundSave:
    """A checkpoint whose rank file a thread is writing from a host snapshot."""

    def __init__(self, step: int, ckpt: Path, config: dict, meta: dict | None, started: float):
        self.step, self.ckpt, self.config, self.meta, self.started = step, ckpt, config, meta, started
        self.snapshot_s = self.written_s = 0.0
        self.buffers: list = []
        self.status: dict | None = None
        self.cancel, self.written = threading.Event(), threading.Event()
        self.agreement: control.Pending | None = None
        self.thread: threading.Thread | None = None


class Checkpointer:
    """Saves this rank's state into ``RUN_DIR/checkpoints/step_N`` (collective) and prunes old ones.

    With ``background``, :meth:`save` returns after a host snapshot and the file is written by a
    thread; :meth:`poll` (every step) or :meth:`finish` completes the checkpoint (see the module
    docstring). Without it, and for states under ``background_min_bytes`` on every rank, every save
    is written and complete when :meth:`save` returns."""

    def __init__(self, run_dir: Path, keep: int, rank: int, world_size: int, faults: FaultInjector | None = None,
                 every_steps: int = 0, at_end: bool = True, background: bool = False, background_min_bytes: int = 0):
        self.run_dir, self.keep, self.rank, self.world_size = Path(run_dir), keep, rank, world_size
        self.faults, self.every_steps, self.at_end, self.background = faults, every_steps, at_end, background
        self.background_min_bytes = background_min_bytes
        self.last_path: Path | None = None
        self.last_saved_at = time.monotonic()
        self.last_timing: dict[str, float] = {}  # of the last completed save (benchmarks, logs)
        self._pending: _BackgroundSave | None = None
        self._staging = HostStaging()

    def should_save(self, step: int, done: bool, asked: bool = False) -> bool:
        """Every ``every_steps`` steps, at the last step (``at_end``), or when ``asked`` (a stop
        signal, or ``checkpoint.every_minutes`` elapsed: the ranks agree on those first)."""
        return asked or (self.every_steps > 0 and step % self.every_steps == 0) or (done and self.at_end)

    def seconds_since_save(self) -> float:
        return time.monotonic() - self.last_saved_at

    @property
    def pending(self) -> bool:
        """A background save is not complete yet (the same on every rank)."""
        return self._pending is not None

    def save(self, step: int, state: dict, config: dict, meta: dict | None = None, wait: bool = False) -> Path:
        """Every rank calls it at the same step, with its state after that step. Returns the
        checkpoint directory; raises CheckpointError on every rank if any rank could not write (no
        manifest is written then, and the previous checkpoints are untouched).

        With ``background`` and not ``wait``, it returns once ``state`` is copied to host memory: the
        checkpoint is complete after a later :meth:`poll` or :meth:`finish` (which raise the
        CheckpointError, if any). ``wait``: the process is about to exit (a stop signal, the last
        step): write from ``state`` directly and complete before returning; a background save still
        in flight is cancelled, since this one supersedes it."""
        if wait:
            self.cancel()
            self._staging.clear()  # no background save follows: the host copy's memory goes back now
        else:
            self.finish()  # one save in flight at a time, and its host buffers are free again
        start = time.perf_counter()
        ckpt = self._prepare(step)
        if wait or not self._in_background(state):
            status = self._write_rank_file(step, ckpt, state)
            self.last_timing = {}
            return self._complete(step, ckpt, status, config, meta, start)
        job = _BackgroundSave(step, ckpt, config, meta, start)
        snapshot, job.buffers = self._staging.copy(state)
        job.snapshot_s = time.perf_counter() - start
        job.thread = threading.Thread(target=self._write_in_background, args=(job, snapshot),
                                      name=f"checkpoint-step{step}", daemon=True)
        del snapshot  # the thread holds the only reference: the copy is freed when it is written
        self._pending, self.last_saved_at = job, time.monotonic()
        job.thread.start()
        return ckpt

    def _in_background(self, state: dict) -> bool:
        """Whether this save goes to the background; the ranks agree (the largest state decides)."""
        if not self.background:
            return False
        if self.background_min_bytes <= 0:
            return True
        return control.all_reduce([state_bytes(state)], op="max")[0] >= self.background_min_bytes

    def poll(self) -> Path | None:
        """Every rank calls it at every step. Completes the background save in flight once every
        rank has written its file (a non-blocking 8-byte all-reduce started at one call and read at
        the next, as StopPoller's; so no rank ever waits for another's disk here) and returns its
        directory; None while it is not complete or when none is in flight."""
        job = self._pending
        if job is None:
            return None
        if job.agreement is not None:
            everyone_wrote = job.agreement.wait()[0] > 0
            job.agreement = None
            if everyone_wrote:
                return self._complete_background()
        job.agreement = control.all_reduce_async([float(job.written.is_set())], op="min")
        return None

    def finish(self) -> Path | None:
        """Wait for the background save in flight, if any, and complete it (collective: every rank
        at the same step). Returns its directory (None if none was in flight or it was cancelled)."""
        job = self._pending
        if job is None:
            return None
        if job.agreement is not None:  # every rank started it: every rank reads it
            job.agreement.wait()
            job.agreement = None
        return self._complete_background()

    def cancel(self) -> None:
        """Give up the background save in flight (collective). A rank that already wrote its file
        keeps nothing either: no manifest is written and the directory is removed; if every rank
        had written its file, the checkpoint is completed instead. A rank's write error still
        raises CheckpointError."""
        if self._pending is not None:
            self._pending.cancel.set()
            self.finish()

    # --- the parts of a save ---
    def _prepare(self, step: int) -> Path:
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
        return ckpt

    def _write_rank_file(self, step: int, ckpt: Path, state: dict, cancel: threading.Event | None = None) -> dict:
        """This rank's file, written atomically; its status for the manifest (file, sha256, bytes),
        or an ``error`` line, or ``cancelled``."""
        name = f"rank{self.rank}.pt"
        status: dict[str, Any] = {"file": name}
        try:
            on_write = (lambda: self.faults.on_checkpoint_write(step)) if self.faults else None
            sha, nbytes = write_atomic(ckpt / name, lambda f: torch.save(state, f), on_write, cancel)
            status.update(sha256=sha, bytes=nbytes)
        except Exception as err:  # any rank's problem must reach every rank, not hang them in the gather
            if cancel is not None and cancel.is_set():
                return {**status, "cancelled": True}
            reason = (err.strerror or str(err)) if isinstance(err, OSError) else \
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            status["error"] = f"rank {self.rank} cannot write {ckpt / name}: {reason}"
        if self.faults:
            self.faults.after_checkpoint_write(step)
        return status

    def _write_in_background(self, job: _BackgroundSave, snapshot: Any) -> None:
        try:
            job.status = self._write_rank_file(job.step, job.ckpt, snapshot, job.cancel)
        finally:
            del snapshot
            job.written_s = time.perf_counter() - job.started
            job.written.set()

    def _complete_background(self) -> Path | None:
        job, self._pending = self._pending, None
        job.thread.join()
        self._staging.release(job.buffers)
        status = job.status or {"file": f"rank{self.rank}.pt",
                                "error": f"rank {self.rank}: the thread writing {job.ckpt} ended without a result"}
        self.last_timing = {"snapshot_s": job.snapshot_s, "written_s": job.written_s}
        return self._complete(job.step, job.ckpt, status, job.config, job.meta, job.started)

    def _complete(self, step: int, ckpt: Path, status: dict, config: dict, meta: dict | None,
                  start: float) -> Path | None:
        """The collective half: gather the statuses, raise any rank's error on every rank, write the
        manifest (rank 0), prune."""
        statuses = control.all_gather_object(status)
        errors = [s["error"] for s in statuses if "error" in s]
        if errors:
            raise CheckpointError(f"checkpoint of step {step} not written: {errors[0]}; "
                                  f"the previous checkpoint ({self.last_path or 'none'}) is intact")
        if any(s.get("cancelled") for s in statuses):
            if self.rank == 0:
                shutil.rmtree(ckpt, ignore_errors=True)
                log.info("checkpoint of step %d given up: a newer one supersedes it", step)
            return None

        error = None
        if self.rank == 0:
            manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {}), "config": config,
                        "files": {str(r): s for r, s in enumerate(statuses)}}
            try:
                write_atomic(ckpt / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            except OSError as err:
                error = f"cannot write {ckpt / MANIFEST}: {err.strerror or err}"
        error = control.broadcast_object(error)
        if error is not None:
            raise CheckpointError(f"checkpoint of step {step} not written: {error}; "
                                  f"the previous checkpoint ({self.last_path or 'none'}) is intact")
        self.last_path = ckpt
        if "written_s" not in self.last_timing:  # a direct save: the step waited for all of it
            self.last_saved_at = time.monotonic()
        self.last_timing["durable_s"] = time.perf_counter() - start
        if self.rank == 0:
            self.prune()
            mb = sum(s["bytes"] for s in statuses) / len(statuses) / 2**20
            t = self.last_timing
            how = (f"{t['snapshot_s']:.2f}s in the step, durable after {t['durable_s']:.2f}s"
                   if "written_s" in t else f"{t['durable_s']:.2f}s")
            log.info("checkpoint of step %d: %s (%.1f MB/rank, %s)", step, ckpt, mb, how)
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
