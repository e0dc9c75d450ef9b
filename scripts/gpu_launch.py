"""The subprocess side of scripts/gpu_check.py, shared by its smoke, resume and restart rows and by
the speed rows of scripts/gpu_speed.py: the context every row runs in (``Ctx``: options, GPUs, ranks
per run, work directory, data roots) and its ``Outcome``; the environment of a launched run
(``clean_env``: no torchrun variables nor faults of our own, one data cache for all runs, faults
injected through ``SLOWMO_TRAIN_FAULTS``); running one command in its own process group with a
time-out and a log (``run_proc``); and the one line that says why a run failed (``error_line``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from slowmo_train.scripting import launch_env

FAULTS = "SLOWMO_TRAIN_FAULTS"  # slowmo_train/faults.py: KIND@step=N,rank=R, fired in the first attempt only
Outcome = tuple[bool, str, str]  # (ok, figure, note)


@dataclass
class Ctx:
    args: argparse.Namespace
    gpus: int
    nproc: int  # ranks per run
    work: Path
    data: dict[str, Path] = field(default_factory=dict)  # task -> data.root; under work/ when synthetic


# --- launching a process -----------------------------------------------------------------------------
def clean_env(ctx: Ctx, faults: str | None = None) -> dict:
    """No torchrun variables nor faults of our own environment; one data cache for all runs."""
    return launch_env(
        drop=(FAULTS,),
        XDG_CACHE_HOME=str(ctx.work / "cache"),
        PYTHONUNBUFFERED="1",
        **({FAULTS: faults} if faults else {}),
    )


def run_proc(cmd: list[str], env: dict, cwd: Path, timeout: float, log: Path) -> tuple[int | None, str]:
    """(exit code, or None after a time-out, which kills the whole process group; stdout + stderr)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, code = proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, code = proc.communicate()[0], None
    log.write_text(" ".join(cmd) + "\n\n" + out)
    return code, out


def error_line(code: int | None, out: str, timeout: float) -> str:
    """slowmo-train's one-line error, else a Python exception line, else the first line of output."""
    if code is None:
        return f"timed out after {timeout:g}s"
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("slowmo-train: error")]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    other = [line for line in lines if not re.match(r"^\d\d:\d\d:\d\d ", line) and "HYDRA_FULL_ERROR" not in line]
    return ours[0] if ours else f"exit code {code}: " + (raised[-1:] or other[:1] or ["no output"])[0][:300]
