"""Plug-in reward functions: `task.reward=[module:function, path/to/file.py:function, ...]`.

A reward function follows TRL's convention: called once per batch as
`fn(prompts=..., completions=..., completion_ids=..., **columns)` where every other dataset column (e.g.
`answer`) arrives as a keyword list aligned with `completions`, and returns one float per completion (or None
for "this function does not apply to this sample"). Several functions are summed, weighted by TRL's
`trainer.reward_weights`.

rlx wraps each function so that a bad reward is reported, not buried: an exception exits 2 naming the
function and the first sample of the batch; a wrong return shape too. NaN or None rewards follow TRL (that
function is left out of the sum for that sample) and are reported once per function with the sample; if every
reward function returns NaN for `guard.collapse_steps` logged steps, the divergence guard stops the run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlx.errors import UserError


def load_reward(spec: str) -> Callable[..., list[float | None]]:
    """The function named by `module:function` (importable, the working directory included) or `file.py:function`."""
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name:
        raise UserError(
            f"task.reward entry '{spec}': expected 'module:function' or 'path/to/file.py:function'."
        )
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UserError(f"task.reward entry '{spec}': no file {path} (relative to {Path.cwd()}).")
        mod_name = f"rlx_reward_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise UserError(
                    f"task.reward entry '{spec}': importing {path} failed ({type(e).__name__}: {e})."
                ) from None
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UserError(
                f"task.reward entry '{spec}': cannot import module '{where}' ({e}). Give an importable module "
                "(from the working directory or an installed package) or a path ending in .py."
            ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"task.reward entry '{spec}': '{where}' has no function '{name}'.")
    return fn


def _sample(kwargs: dict[str, Any], i: int) -> str:
    parts = []
    for key in ("prompts", "completions", "answer"):
        values = kwargs.get(key)
        if isinstance(values, list) and i < len(values):
            parts.append(f"{key[:-1] if key.endswith('s') else key}={str(values[i])[:200]!r}")
    return ", ".join(parts)


def checked(fn: Callable[..., list[float | None]], label: str) -> Callable[..., list[float | None]]:
    """`fn` with its failures reported (see the module docstring); keeps its `__name__` for TRL's metric names."""
    warned = False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal warned
        n = len(kwargs.get("completions") or [])
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            raise UserError(
                f"reward function {label} raised {type(e).__name__}: {e} (first sample of the batch: "
                f"{_sample(kwargs, 0)}). Fix the function; return None for samples it does not apply to."
            ) from None
        out = list(out) if out is not None else None
        if out is None or len(out) != n:
            raise UserError(
                f"reward function {label} returned {'None' if out is None else f'{len(out)} values'} for {n} "
                "completions; expected a list with one float (or None) per completion."
            )
        bad = [i for i, r in enumerate(out) if r is None or (isinstance(r, float) and math.isnan(r))]
        if bad and not warned:
            warned = True
            print(
                f"warning: reward function {label} returned None/NaN for {len(bad)} of {n} completions (left out "
                f"of the reward sum, as TRL does; reported once). First: {_sample(kwargs, bad[0])}",
                file=sys.stderr,
                flush=True,
            )
        return out

    return wrapper


def plugin_rewards(specs: list[str]) -> list[Callable[..., list[float | None]]]:
    """Load and wrap every `task.reward` entry; raises UserError on the first that does not load."""
    return [checked(load_reward(s), s) for s in specs]
