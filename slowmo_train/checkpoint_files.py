"""Finding, checking and reading checkpoints: where they are, which one a resume takes, which config
changes a resume allows, the RNG states, and loading a rank's file (see slowmo_train/checkpoint.py for
the format and how checkpoints are written).

Which config keys may differ on resume (:data:`MUTABLE_ON_RESUME`): run length (``train.max_steps``),
logging, evaluation cadence and settings, checkpoint cadence, launcher settings other than the world
size, data paths, and the device's math and layout (``train.tf32``, ``model.channels_last``: a run
saved on the CPU resumes on GPUs). Everything else (task, model, algorithm, SlowMo, optimizer and
schedule, ``train.epochs``, batch sizes, precision, seed) and the world size must match, or the resume
stops with one line naming the key.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slowmo_train.faults import RunError

FORMAT = 1
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")

#: config keys (prefixes ending in ".") that may change when a run is resumed; all others must match
MUTABLE_ON_RESUME = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every_epochs",
    "train.eval_batch_size",
    "train.progress",
    "train.nonfinite",
    "train.max_nonfinite_skips",
    "checkpoint.",
    "launcher.",
    "eval.",
    "data.root",
    "data.cache_dir",
    "data.download",
    "data.workers",
    "name",
    "output_dir",
    "resume",
    "train.tf32",
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
        raise CheckpointError(
            f"{ckpt} is not a complete checkpoint: {MANIFEST} is missing (the save was interrupted)"
        ) from None
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
            raise CheckpointError(
                f"{path} (rank {rank}) is truncated or was changed: {size} bytes, the manifest says {entry['bytes']}"
            )
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
    raise CheckpointError(
        f"resume={resume}: not a checkpoint (no {MANIFEST}) nor a run directory with "
        f"{CHECKPOINTS}/; use resume=auto or the path of RUN_DIR/{CHECKPOINTS}/step_N"
    )


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
        raise CheckpointError(
            f"{where} was written by {manifest['world_size']} workers, this run has {world_size}: "
            "resume with the same number of workers (launcher.nproc_per_node / torchrun)"
        )
    saved, now = _flatten(manifest.get("config", {})), _flatten(config)
    for key in sorted(saved.keys() & now.keys()):
        if not _mutable(key) and saved[key] != now[key]:
            raise CheckpointError(
                f"{where} was written with {key}={saved[key]!r}, this run has {key}={now[key]!r}: only run "
                "length, logging, evaluation, checkpoint and launcher settings and data paths may change on "
                f"resume; set {key}={saved[key]!r} or start a new run (another output_dir, resume=none)"
            )


# --- RNG state ------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Every global RNG as plain types and tensors (what weights_only loading accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        raise CheckpointError(
            f"{path} cannot be loaded: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a slowmo-train rank checkpoint of format {FORMAT}")
    if int(state.get("rank", -1)) != rank or int(state.get("step", -1)) != int(manifest["step"]):
        raise CheckpointError(
            f"{path} holds rank {state.get('rank')} step {state.get('step')}, "
            f"expected rank {rank} step {manifest['step']}"
        )
    return manifest, state


def check_model_shapes(saved: dict, model: torch.nn.Module, path: Path) -> None:
    """One line naming the first parameter/buffer whose name or shape differs."""
    current = model.state_dict()
    for key in list(current) + [k for k in saved if k not in current]:  # in model order
        if key not in current:
            raise CheckpointError(
                f"{path}: the checkpoint has model entry {key!r} that this model lacks (model.arch changed?)"
            )
        if key not in saved:
            raise CheckpointError(
                f"{path}: this model has entry {key!r} that the checkpoint lacks (model.arch changed?)"
            )
        if tuple(saved[key].shape) != tuple(current[key].shape):
            raise CheckpointError(
                f"{path}: model entry {key} has shape {list(saved[key].shape)} in the checkpoint "
                f"and {list(current[key].shape)} in this model (model.width or model.arch changed?)"
            )
