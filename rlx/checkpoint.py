"""Checkpoints that resume the *same* run, and the run directory's lock.

A checkpoint is HF Trainer's `checkpoint-N/` (weights, optimizer, scheduler, RNG per rank, trainer state)
plus what rlx adds next to it:

    checkpoint-N/rlx_state.rank{r}.pt   per rank: every instrument's `state_dict()` and the trainer's own
                                        state (GRPO/PPO rollout buffer and micro-step counter, PPO KL
                                        controller, the prompt sampler's epoch)
    checkpoint-N/rlx_run/metrics.jsonl  the run's metrics rows up to step N
    checkpoint-N/rlx_run/diagnostics/   a snapshot of the run's diagnostics (instruments flush first)
    checkpoint-N/rlx_checkpoint.json    written last, after every rank finished: a checkpoint without it
                                        is incomplete and never resumed from

Resuming restores `metrics.jsonl` and `diagnostics/` from the snapshot, so rows written after step N by the
killed run are discarded and every step ends up with exactly one row.

The lock: `<run_dir>/.rlx.lock` is held (`fcntl.flock`) by global rank 0 for the life of the run and names
its holder (PID, host, start time). The kernel releases it when the holder dies, so a killed run leaves a
stale file that only a resume may take over.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlx.errors import UserError

MARKER = "rlx_checkpoint.json"
RUN_SNAPSHOT = "rlx_run"
LOCK_NAME = ".rlx.lock"
METRICS = "metrics.jsonl"
DIAGNOSTICS = "diagnostics"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def fault_point(point: str, step: int) -> None:
    """Fault injection for the resume tests: `RLX_FAULT=<point>:<step>` SIGKILLs this process right there.

    Points: `after_log` (the step's metrics row is written, its checkpoint is not), `in_checkpoint` (HF's files
    and rlx's state are written, the run snapshot and the marker are not), `after_checkpoint` (complete).
    """
    if os.environ.get("RLX_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def state_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / f"rlx_state.rank{rank}.pt"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `run_dir` that rlx finished writing, oldest first."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(setting: Any, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume_from_checkpoint` asks for: None (off), the latest complete one (true), or a path.

    `true` in a directory with no run yet returns None (a requeued job's first start); `true` in a run that has
    no complete checkpoint is an error, as is a path that is not a complete rlx checkpoint of this run.
    """
    if setting in (None, False, "", "false", "False"):
        return None
    if setting in (True, "true", "True", "latest"):
        done = complete_checkpoints(run_dir)
        if done:
            return done[-1][1]
        if (run_dir / METRICS).exists():
            raise UserError(
                f"trainer.resume_from_checkpoint=true: {run_dir} holds a run but no complete checkpoint "
                f"(checkpoint-N/ with {MARKER}). Nothing can be resumed; start a new run in another output_dir. "
                "Set trainer.save_steps to checkpoint more often."
            )
        return None
    path = Path(str(setting)).expanduser()
    if not path.is_absolute() and not path.exists() and (run_dir / path).exists():
        path = run_dir / path  # checkpoint-N relative to the run dir
    path = path.absolute()
    if not (path / MARKER).is_file():
        raise UserError(
            f"trainer.resume_from_checkpoint={setting}: not a complete rlx checkpoint (no {MARKER} in it). "
            f"Expected a checkpoint-N/ directory of the run, or true for the latest complete one in output_dir."
        )
    if path.parent.resolve() != run_dir.resolve():
        raise UserError(
            f"trainer.resume_from_checkpoint={path} belongs to {path.parent}, but output_dir is {run_dir}. "
            f"A resume continues the run in place: set output_dir={path.parent}."
        )
    return path


# ---- what a checkpoint carries besides HF's files --------------------------------------------------------


def snapshot_run_files(run_dir: Path, checkpoint: Path, step: int) -> None:
    """Copy metrics rows up to `step` and the diagnostics directory into the checkpoint (rank 0)."""
    dest = checkpoint / RUN_SNAPSHOT
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    rows = read_metrics_rows(run_dir / METRICS)
    (dest / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))
    diag = run_dir / DIAGNOSTICS
    if diag.is_dir():
        shutil.copytree(diag, dest / DIAGNOSTICS, ignore=shutil.ignore_patterns(".*"))


def write_marker(checkpoint: Path, step: int, world_size: int) -> None:
    info = {
        "step": step,
        "world_size": world_size,
        "written": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    tmp = checkpoint / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, checkpoint / MARKER)


def read_marker(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / MARKER).read_text())


def restore_run_files(run_dir: Path, checkpoint: Path) -> int:
    """Put the run's metrics and diagnostics back as they were at the checkpoint (rank 0).

    Returns how many metrics rows written after the checkpoint were discarded.
    """
    snap = checkpoint / RUN_SNAPSHOT
    kept = read_metrics_rows(snap / METRICS)
    now = read_metrics_rows(run_dir / METRICS)
    _atomic_write(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
    diag = run_dir / DIAGNOSTICS
    if diag.exists():
        trash = run_dir / f".{DIAGNOSTICS}.discarded"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(diag, trash)
        shutil.rmtree(trash)
    if (snap / DIAGNOSTICS).is_dir():
        shutil.copytree(snap / DIAGNOSTICS, diag)
    return max(len(now) - len(kept), 0)


def read_metrics_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the run directory's lock ---------------------------------------------------------------------------


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The live holder of `run_dir`'s lock, or None when it is free (never written or left by a dead run).

    Opens the lock file read-only: checking never changes the directory.
    """
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return json.loads(path.read_text() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def describe_holder(info: dict[str, Any]) -> str:
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('started', '?')})"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s exclusive lock; a second holder gets a UserError naming the first."""
    path = run_dir / LOCK_NAME
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            try:
                info = json.loads(fh.read() or "{}")
            except json.JSONDecodeError:
                info = {}
            raise UserError(
                f"output_dir {run_dir} is in use by another rlx run: {describe_holder(info)}. "
                "Wait for it to finish, or choose another output_dir."
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(info))
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock; the file stays (a later resume reads who held it last)
