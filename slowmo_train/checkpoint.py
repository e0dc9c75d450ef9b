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
removed). The host copy (slowmo_train/checkpoint_snapshot.py) is kept for the next save: one copy
of the rank's state in host memory (``checkpoint.background=false`` where that is short). States
under ``checkpoint.background_min_mb`` are written directly (well under a second; a background save
completes a few steps after it starts). Costs: docs/RESULTS.md, "Checkpoint time at cluster scale".

A rank file holds everything the next step depends on: model, base optimizer, algorithm state
(SlowMo x0/u shards, push-sum numerators/weight with in-flight OSGP messages), gradient scaler, the
Python/NumPy/torch/CUDA RNG states, the step (the data position follows from it: tasks'
``train_batches(epoch, skip)`` are deterministic) and the trainer's counters, including the loss
accumulated since the last log line, so that the logged losses of a resumed run equal those of an
uninterrupted one. Files are read with ``torch.load(weights_only=True)``: no code runs from a file.
Finding, checking and reading checkpoints, and the config keys a resume may change
(``MUTABLE_ON_RESUME``), are in slowmo_train/checkpoint_files.py (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from slowmo_train import control
from slowmo_train.checkpoint_files import (  # noqa: F401  (the checkpoint API in one place)
    CHECKPOINTS,
    FORMAT,
    MANIFEST,
    MUTABLE_ON_RESUME,
    CheckpointError,
    capture_rng,
    check_compatible,
    check_complete,
    check_model_shapes,
    checkpoint_root,
    list_step_dirs,
    load_rank_state,
    newest_complete,
    read_manifest,
    resolve_resume,
    restore_rng,
    step_dir,
)
from slowmo_train.checkpoint_snapshot import HostStaging, state_bytes
from slowmo_train.faults import FaultInjector

log = logging.getLogger("slowmo_train")


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
            piece = view[start : start + self.PIECE]
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

    def __init__(
        self,
        run_dir: Path,
        keep: int,
        rank: int,
        world_size: int,
        faults: FaultInjector | None = None,
        every_steps: int = 0,
        at_end: bool = True,
        background: bool = False,
        background_min_bytes: int = 0,
    ):
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
        job.thread = threading.Thread(
            target=self._write_in_background, args=(job, snapshot), name=f"checkpoint-step{step}", daemon=True
        )
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
            reason = (
                (err.strerror or str(err))
                if isinstance(err, OSError)
                else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
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
        status = job.status or {
            "file": f"rank{self.rank}.pt",
            "error": f"rank {self.rank}: the thread writing {job.ckpt} ended without a result",
        }
        self.last_timing = {"snapshot_s": job.snapshot_s, "written_s": job.written_s}
        return self._complete(job.step, job.ckpt, status, job.config, job.meta, job.started)

    def _complete(
        self, step: int, ckpt: Path, status: dict, config: dict, meta: dict | None, start: float
    ) -> Path | None:
        """The collective half: gather the statuses, raise any rank's error on every rank, write the
        manifest (rank 0), prune."""
        statuses = control.all_gather_object(status)
        errors = [s["error"] for s in statuses if "error" in s]
        if errors:
            raise CheckpointError(
                f"checkpoint of step {step} not written: {errors[0]}; "
                f"the previous checkpoint ({self.last_path or 'none'}) is intact"
            )
        if any(s.get("cancelled") for s in statuses):
            if self.rank == 0:
                shutil.rmtree(ckpt, ignore_errors=True)
                log.info("checkpoint of step %d given up: a newer one supersedes it", step)
            return None

        error = None
        if self.rank == 0:
            manifest = {
                "format": FORMAT,
                "step": step,
                "world_size": self.world_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **(meta or {}),
                "config": config,
                "files": {str(r): s for r, s in enumerate(statuses)},
            }
            try:
                write_atomic(ckpt / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            except OSError as err:
                error = f"cannot write {ckpt / MANIFEST}: {err.strerror or err}"
        error = control.broadcast_object(error)
        if error is not None:
            raise CheckpointError(
                f"checkpoint of step {step} not written: {error}; "
                f"the previous checkpoint ({self.last_path or 'none'}) is intact"
            )
        self.last_path = ckpt
        if "written_s" not in self.last_timing:  # a direct save: the step waited for all of it
            self.last_saved_at = time.monotonic()
        self.last_timing["durable_s"] = time.perf_counter() - start
        if self.rank == 0:
            self.prune()
            mb = sum(s["bytes"] for s in statuses) / len(statuses) / 2**20
            t = self.last_timing
            how = (
                f"{t['snapshot_s']:.2f}s in the step, durable after {t['durable_s']:.2f}s"
                if "written_s" in t
                else f"{t['durable_s']:.2f}s"
            )
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
