"""User-facing errors: one clear message, exit code 2 (3 for a diverged run), no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for (a key, a value, a path), not a bug in rlx.

    The message says what was wrong, what was expected and what to do.
    """

    exit_code = 2


class Diverged(Exception):
    """The run diverged or collapsed (rlx/guard.py): the message names the step and the metric; exit code 3."""

    exit_code = 3

    def __init__(self, message: str, step: int, checkpoint: bool = True):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint  # False when the weights in memory are not worth saving (non-finite)


def exit_on_user_error(fn: Callable) -> Callable:
    """Decorate an entry point: a `UserError` prints `error: <message>` on stderr and exits 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _close_progress_bars()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(UserError.exit_code)
        except Diverged as e:
            _close_progress_bars()
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(Diverged.exit_code)
        except RuntimeError as e:  # torch.distributed's DistBackendError included
            if _is_collective_timeout(e):
                _close_progress_bars()
                print(COLLECTIVE_TIMEOUT_HINT, file=sys.stderr, flush=True)
            raise

    return wrapper


COLLECTIVE_TIMEOUT_HINT = (
    "error: a collective operation timed out after trainer.ddp_timeout seconds: another rank never joined it "
    "(it failed, is stuck, or took a different code path; see its log). Raise trainer.ddp_timeout only if one "
    "rank legitimately works alone that long."
)


def _is_collective_timeout(e: BaseException) -> bool:
    """A gloo/NCCL collective that gave up waiting for a peer (torch's messages: 'Timed out waiting Nms ...')."""
    text = str(e).lower()
    return "timed out" in text or ("timeout" in text and ("collective" in text or "watchdog" in text))


def _close_progress_bars() -> None:
    """End any open tqdm bar (the trainer's) so the message starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def hub_hint(spec: str, key: str, kind: str = "model") -> str:
    """What to do when `spec` (a `key` value) did not load: a local path that is wrong, or a hub id not reachable.

    `kind` is `model` or `dataset`. rlx never sets HF_HUB_OFFLINE itself: it is the user's (or the Makefile's).
    """
    local = (
        "an HF-format directory with config.json and weights"
        if kind == "model"
        else "a local .jsonl/.json/.parquet/.csv file or a save_to_disk directory"
    )
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return f"Set {key} to {local} or a hub id."
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    state = "HF_HUB_OFFLINE is set, so only the local HF cache was searched" if offline else f"from {where}"
    repo_type = "" if kind == "model" else " --repo-type dataset"
    return (
        f"'{spec}' is read as a Hugging Face Hub {kind} id ({state}). Either set {key} to {local} "
        f"(download it elsewhere with `hf download {spec}{repo_type} --local-dir DIR`), or go online: unset "
        "HF_HUB_OFFLINE, check the network, or set HF_ENDPOINT to a reachable mirror."
    )
