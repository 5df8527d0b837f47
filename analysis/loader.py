"""Load rlx run directories for offline analysis.

A run directory (written by `rlx.train`) holds:

    config.yaml               resolved RunConfig
    metrics.jsonl             one JSON object per logging step: {"step": ..., <TRL metric names>: ...}
    eval_before_after.json    greedy accuracy before/after training (optional)
    eval.json                 rlx.evaluate output (optional)
    diagnostics/manifest.jsonl every file an instrument wrote, with its schema version (rlx/storage.py;
                              runs before manifest version 2 have diagnostics/manifest.json, read as well)

`Run(path)` reads all of it and checks it: a missing, truncated or newer-schema file raises
`RunLoadError` naming the file, or, with `strict=False`, is skipped with a `RunLoadWarning`.
Files a rank wrote alone (`name.rank{r}.ext`) are merged: tables are concatenated with a `rank`
column, tensor files are returned one per rank. A table written as shards (every file the manifest lists
under one `name`, e.g. `grad_alignment/step_NNNNNN.parquet`) is concatenated the same way.
`load_runs([...])` loads several runs for comparison;
`RunSet.metrics(...)` aligns them on `step`.

What each file holds is declared in `rlx.dumps`; `Run.read(dump)` and `Run.find_dump(dump)` select a declared
dump's files. A directory whose manifest lists only standalone dumps (the output of `python -m
rlx.replay.analysis out=DIR`) opens without `config.yaml` and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlx import dumps
from rlx.errors import UserError
from rlx.storage import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    read_manifest,
    read_manifest_lines,
)

SUPPORTED_SCHEMA: dict[str, int] = {}
"""Newest schema version of each instrument's files this package reads (from `rlx.dumps`; a file of a declared
dump is checked against its own dump's version). An instrument rlx does not declare must be at version 1."""
for _d in dumps.DUMPS.values():
    SUPPORTED_SCHEMA[_d.instrument] = max(SUPPORTED_SCHEMA.get(_d.instrument, 0), _d.version)
DEFAULT_SUPPORTED_SCHEMA = 1
_RANK_RE = re.compile(r"\.rank(\d+)(?=\.[^.]+$|$)")


class RunLoadError(UserError):
    """A run-directory file is missing, truncated, unreadable or has a schema newer than this package."""


class RunLoadWarning(UserWarning):
    """A file was skipped because the caller asked for `strict=False`."""


@dataclass
class TensorFile:
    """One safetensors file: its tensors (as float/int numpy arrays), its metadata and the rank that wrote it."""

    path: Path
    rank: int
    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


@dataclass
class DiagFile:
    """A manifest entry, validated; `load()` reads (and caches) its contents."""

    entry: dict[str, Any]
    path: Path
    _cache: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def instrument(self) -> str:
        return self.entry.get("instrument", "")

    @property
    def format(self) -> str:
        return self.entry.get("format") or self.path.suffix.lstrip(".")

    @property
    def schema_version(self) -> int:
        return int(self.entry.get("schema_version", 0))

    @property
    def rank(self) -> int:
        return int(self.entry.get("rank", 0))

    @property
    def key(self) -> str:
        """The manifest path with any `.rank{r}` removed: the same logical file across ranks."""
        return _RANK_RE.sub("", self.entry["path"])

    def load(self) -> Any:
        if self._cache is None:
            self._cache = _read(self.path, self.format)
        return self._cache


def _read(path: Path, fmt: str) -> Any:
    """Read one diagnostics file; any decoding failure becomes a `RunLoadError` naming the file."""
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "safetensors":
            from safetensors import safe_open
            from safetensors.numpy import load_file

            with safe_open(str(path), "np") as fh:
                meta = dict(fh.metadata() or {})
            try:
                tensors = load_file(str(path))
            except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read through torch, upcast
                from safetensors.torch import load_file as load_torch

                tensors = {
                    k: (v.float() if v.is_floating_point() else v).numpy()
                    for k, v in load_torch(str(path)).items()
                }
            return TensorFile(path, 0, meta, tensors)
        if fmt == "json":
            return json.loads(path.read_text())
        if fmt == "jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except Exception as e:  # pyarrow, safetensors and json raise unrelated types for a truncated file
        raise RunLoadError(
            f"{path}: cannot read this {fmt} file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Re-run the instrument or remove the entry from diagnostics/manifest.jsonl."
        ) from e
    raise RunLoadError(
        f"{path}: unknown format '{fmt}' in the manifest; expected parquet, safetensors or json."
    )


def _validate(path: Path, fmt: str, schema_version: int) -> None:
    """Cheap integrity checks without reading the payload (parquet footer, safetensors header/size)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        elif fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as fh:
                meta = fh.metadata() or {}
            inner = meta.get("schema_version")
            if inner is not None and int(inner) != schema_version:
                raise RunLoadError(
                    f"{path}: schema_version {inner} in the file header but {schema_version} in the manifest; "
                    "the file was rewritten outside DiagnosticsWriter."
                )
        elif fmt == "json":
            json.loads(path.read_text())
    except RunLoadError:
        raise
    except Exception as e:
        raise RunLoadError(
            f"{path}: cannot read this {fmt} file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Re-run the instrument or remove the entry from diagnostics/manifest.jsonl."
        ) from e


def _read_jsonl(path: Path, lenient: bool = False) -> pd.DataFrame:
    """metrics.jsonl as a frame, one row per step. `lenient`: lines that are not JSON (a torn last line after a
    kill) are dropped with a `RunLoadWarning` saying how many, instead of failing the file."""
    rows, bad = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not lenient:
                raise RunLoadError(
                    f"{path}: line {i} is not valid JSON ({e}); the file is truncated or corrupt. "
                    "Expected one JSON object per logging step."
                ) from e
            bad.append(i)
    if bad:
        warnings.warn(
            f"{path}: dropped {len(bad)} line(s) that are not valid JSON (line {', '.join(map(str, bad[:5]))}); "
            f"kept {len(rows)} rows.",
            RunLoadWarning,
            stacklevel=3,
        )
    if not rows:  # a run killed before its first logged step
        return pd.DataFrame({"step": pd.Series([], dtype=int)})
    df = pd.DataFrame(rows)
    if "step" not in df.columns:
        raise RunLoadError(f"{path}: no 'step' field; expected one JSON object per logging step with 'step'.")
    # TRL logs train metrics and e.g. eval or final summaries at the same step, under different keys: merge
    # them per step. The same key twice at one step means the step was written twice (two runs in one
    # directory, or a resume that replayed steps): refuse to merge that silently.
    per_step = df.drop(columns=[c for c in ("epoch",) if c in df.columns]).groupby("step").count()
    twice = per_step.index[(per_step > 1).any(axis=1)].tolist()
    if twice:
        keys = sorted(per_step.columns[(per_step.loc[twice[0]] > 1)])
        raise RunLoadError(
            f"{path}: step {twice[0]} is logged more than once ({', '.join(keys[:4])}; {len(twice)} steps in all). "
            "Two runs wrote this directory, or a resume replayed steps; rlx's own resume writes each step once. "
            "Its metrics cannot be trusted: start a clean run."
        )
    df = df.groupby("step", as_index=False, sort=True).last()
    df["step"] = df["step"].astype(int)
    return df


class Run:
    """One run directory, loaded and checked.

    Attributes: `path`, `config` (OmegaConf DictConfig or None), `metrics` (DataFrame, one row per
    logged step, sorted by `step`), `eval_before_after` and `eval` (dicts or None), `evals` (every
    eval*.json by stem, e.g. `eval.replay-learnable`), `manifest` (dict),
    `files` (validated `DiagFile`s), `skipped` (messages of files skipped with `strict=False`).
    """

    def __init__(self, path: str | Path, strict: bool = True, label: str | None = None):
        self.path = Path(path)
        self.strict = strict
        self.skipped: list[str] = []
        if not self.path.is_dir():
            raise RunLoadError(
                f"{self.path}: not a directory; expected an rlx run directory (with config.yaml)."
            )
        self.standalone = _standalone(self.path)
        """No training run: the manifest lists only standalone dumps (e.g. `python -m rlx.replay.analysis out=DIR`)."""
        self.config = self._guard(self.path / "config.yaml", self._load_config, required=not self.standalone)
        self.metrics = self._guard(
            self.path / "metrics.jsonl",
            lambda p: _read_jsonl(p, lenient=not strict),
            required=not self.standalone,
        )
        if self.metrics is None:
            self.metrics = pd.DataFrame({"step": pd.Series([], dtype=int)})
        self.eval_before_after = self._guard(self.path / "eval_before_after.json", _read_json, required=False)
        # rlx.evaluate writes eval.json, and eval.replay-<mode>.json with Activation Replay
        self.evals: dict[str, Any] = {}
        for p in sorted(self.path.glob("eval*.json")):
            if p.name != "eval_before_after.json":
                self.evals[p.stem] = self._guard(p, _read_json, required=False)
        self.eval = self.evals.get("eval")
        self.manifest, self.files = self._load_manifest()
        self.label = label or self._default_label()

    # ---- loading -------------------------------------------------------------------------------------

    def _fail(self, msg: str) -> None:
        if self.strict:
            raise RunLoadError(msg)
        warnings.warn(msg, RunLoadWarning, stacklevel=3)
        self.skipped.append(msg)

    def _guard(self, path: Path, reader, required: bool) -> Any:
        if not path.exists():
            if required:
                self._fail(f"{path}: missing; every rlx run directory has it (written by rlx.train).")
            return None
        try:
            return reader(path)
        except RunLoadError as e:
            self._fail(str(e))
        except Exception as e:
            self._fail(f"{path}: cannot read it ({type(e).__name__}: {e}).")
        return None

    @staticmethod
    def _load_config(path: Path) -> Any:
        from omegaconf import OmegaConf

        return OmegaConf.load(path)

    def _load_manifest(self) -> tuple[dict[str, Any], list[DiagFile]]:
        """The manifest (version 1 `manifest.json` and/or version 2 `manifest.jsonl`; the last entry of a path
        wins) and its files, each checked."""
        diag = self.path / "diagnostics"
        legacy, log = diag / LEGACY_MANIFEST_NAME, diag / MANIFEST_NAME
        manifest = {"format": "rlx-diagnostics", "manifest_version": MANIFEST_VERSION, "files": []}
        if not legacy.exists() and not log.exists():
            return manifest, []
        entries: dict[str, dict[str, Any]] = {}
        versions = []
        for mpath in (legacy, log):
            if not mpath.exists():
                continue
            if mpath is legacy:
                doc = self._guard(mpath, _read_json, required=True)
                if doc is None:
                    continue
                header, listed, torn = doc, doc.get("files", []), 0
            else:
                header, listed, torn = read_manifest_lines(mpath)
                if torn:
                    self._fail(
                        f"{mpath}: {torn} line(s) are not valid JSON (a kill while appending); the files they "
                        "listed are not read. Resume the run (trainer.resume_from_checkpoint=true) to restore "
                        "its diagnostics, or load it with strict=False."
                    )
            version = int(header.get("manifest_version", 1 if mpath is legacy else MANIFEST_VERSION))
            if version > MANIFEST_VERSION:
                self._fail(
                    f"{mpath}: manifest_version {version} is newer than this package reads "
                    f"({MANIFEST_VERSION}); upgrade rlx to analyse this run."
                )
                continue
            versions.append(version)
            entries.update({e["path"]: e for e in listed})
        manifest["manifest_version"] = max(versions, default=MANIFEST_VERSION)
        manifest["files"] = sorted(entries.values(), key=lambda e: e["path"])
        mname = " and ".join(p.name for p in (legacy, log) if p.exists())
        files = []
        for entry in manifest["files"]:
            path = diag / entry["path"]
            inst = entry.get("instrument", "")
            supported = dumps.newest_version(entry)
            version = int(entry.get("schema_version", 0))
            if not path.exists():
                self._fail(f"{path}: listed in {diag / mname} but missing; the run was copied incompletely.")
                continue
            if version > supported:
                self._fail(
                    f"{path}: schema_version {version} of instrument '{inst}' is newer than this package "
                    f"reads ({supported}); upgrade rlx (analysis/) to read it."
                )
                continue
            try:
                _validate(path, entry.get("format") or path.suffix.lstrip("."), version)
            except RunLoadError as e:
                self._fail(str(e))
                continue
            files.append(DiagFile(entry, path))
        return manifest, files

    def _default_label(self) -> str:
        recipe = self._cfg("recipe") or ""
        return f"{recipe}:{self.path.name}" if recipe else self.path.name

    def _cfg(self, dotted: str, default: Any = None) -> Any:
        if self.config is None:
            return default
        from omegaconf import OmegaConf

        value = OmegaConf.select(self.config, dotted, default=default)
        return default if value is None else value

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def algo(self) -> str:
        return str(self._cfg("algo", "?"))

    @property
    def recipe(self) -> str:
        return str(self._cfg("recipe", ""))

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (None-safe)."""
        return self._cfg(dotted, default)

    def find(
        self, instrument: str | None = None, name: str | None = None, fmt: str | None = None
    ) -> list[DiagFile]:
        """Manifest files matching all given fields (sorted by path, ranks adjacent)."""
        out = [
            f
            for f in self.files
            if (instrument is None or f.instrument == instrument)
            and (name is None or f.name == name)
            and (fmt is None or f.format == fmt)
        ]
        return sorted(out, key=lambda f: (f.key, f.rank))

    def has(self, instrument: str | None = None, name: str | None = None) -> bool:
        return bool(self.find(instrument, name))

    def find_dump(self, dump: dumps.Dump) -> list[DiagFile]:
        """The files of one declared dump (sorted by path, ranks adjacent)."""
        return [f for f in self.find(dump.instrument) if dump.matches(f.entry)]

    def read(self, dump: dumps.Dump) -> pd.DataFrame | None:
        """A declared parquet dump: its shards and ranks concatenated (`rank` column added when absent)."""
        return self._concat(self.find_dump(dump))

    def table(self, instrument: str | None = None, name: str | None = None) -> pd.DataFrame | None:
        """All matching parquet files concatenated; per-rank and per-step files merged (`rank` column added)."""
        return self._concat(self.find(instrument, name, "parquet"))

    def _concat(self, files: list[DiagFile]) -> pd.DataFrame | None:
        frames = []
        for f in files:
            try:
                df = f.load()
            except RunLoadError as e:
                self._fail(str(e))
                continue
            df = df.copy()
            if "rank" not in df.columns:
                df["rank"] = f.rank
            frames.append(df)
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True)

    def tensors(self, instrument: str | None = None, name: str | None = None) -> list[TensorFile]:
        """All matching safetensors files, each with its rank, in manifest-path order."""
        return self._tensors(self.find(instrument, name, "safetensors"))

    def read_tensors(self, dump: dumps.Dump) -> list[TensorFile]:
        """The files of a declared safetensors dump, each with its rank, in manifest-path order."""
        return self._tensors(self.find_dump(dump))

    def _tensors(self, files: list[DiagFile]) -> list[TensorFile]:
        out = []
        for f in files:
            try:
                tf = f.load()
            except RunLoadError as e:
                self._fail(str(e))
                continue
            tf.rank = f.rank
            out.append(tf)
        return out

    def json(self, instrument: str | None = None, name: str | None = None) -> list[Any]:
        return [f.load() for f in self.find(instrument, name, "json")]

    def metric(self, name: str) -> pd.Series | None:
        """One metric over steps (index = step), NaN-free; None when the run never logged it."""
        if name not in self.metrics.columns:
            return None
        s = self.metrics.set_index("step")[name].dropna()
        return s if len(s) else None

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, algo={self.algo}, steps={len(self.metrics)}, files={len(self.files)})"
        )


def _standalone(path: Path) -> bool:
    """Whether `path` holds no training run but only standalone dumps (`rlx.dumps`, e.g. the Activation Replay
    finding written with `out=DIR`): then config.yaml and metrics.jsonl are not expected."""
    if (path / "config.yaml").exists():
        return False
    try:
        files = read_manifest(path)["files"]
    except (OSError, ValueError):
        return False
    return bool(files) and all((d := dumps.dump_of(f)) is not None and d.standalone for f in files)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunLoadError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt.") from e


class RunSet(Sequence):
    """Several runs loaded together; labels are made unique."""

    def __init__(self, runs: Iterable[Run]):
        self.runs = list(runs)
        seen: dict[str, int] = {}
        for r in self.runs:
            n = seen.get(r.label, 0)
            seen[r.label] = n + 1
            if n:
                r.label = f"{r.label}#{n + 1}"

    def __getitem__(self, i):  # type: ignore[override]
        return self.runs[i]

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def metrics(self, names: Sequence[str] | None = None, how: str = "outer") -> pd.DataFrame:
        """Long table (run, step, metric, value) restricted to `names`; `how="inner"` keeps only steps
        every run logged (steps aligned across runs)."""
        frames = []
        for r in self.runs:
            m = r.metrics
            cols = [c for c in (names or m.columns) if c in m.columns and c != "step"]
            if not cols or not len(m):
                continue
            long = m[["step", *cols]].melt(id_vars="step", var_name="metric", value_name="value").dropna()
            long.insert(0, "run", r.label)
            frames.append(long)
        if not frames:
            return pd.DataFrame(columns=["run", "step", "metric", "value"])
        df = pd.concat(frames, ignore_index=True)
        df["value"] = pd.to_numeric(df["value"], errors="coerce")
        if how == "inner":
            steps = None
            for _, g in df.groupby("run"):
                s = set(g["step"])
                steps = s if steps is None else steps & s
            df = df[df["step"].isin(steps or set())]
        return df.sort_values(["run", "metric", "step"]).reset_index(drop=True)

    def wide(self, metric: str, how: str = "outer") -> pd.DataFrame:
        """One metric: index = step, one column per run (NaN where a run did not log that step)."""
        df = self.metrics([metric], how=how)
        if not len(df):
            return pd.DataFrame()
        return df.pivot_table(index="step", columns="run", values="value", aggfunc="last")


def load_runs(paths: Iterable[str | Path], strict: bool = True) -> RunSet:
    """Load several run directories for comparison."""
    return RunSet(Run(p, strict=strict) for p in paths)


def find_run(recipes: Iterable[str], env: str = "RLX_RUN_DIR") -> Path:
    """The run a notebook analyses: `$RLX_RUN_DIR`, else the newest run of `recipes` under `runs/` of the working
    directory or of the repository (so a notebook finds it from the repo root and from its own folder)."""
    import os

    if os.environ.get(env):
        return Path(os.environ[env])
    roots = [Path.cwd() / "runs", Path(__file__).resolve().parents[1] / "runs"]
    candidates = sorted(
        {p for root in roots for r in recipes for p in (root / r).glob("*") if (p / "config.yaml").exists()},
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise RunLoadError(
            f"no run of {', '.join(recipes)} under {' or '.join(str(r) for r in dict.fromkeys(roots))}: train one "
            f"(see the notebook's first cell) or set {env}=RUN_DIR."
        )
    return candidates[-1]


def notebook_output_dir(name: str, run_dir: str | Path) -> Path:
    """Where a notebook writes what it computes: `$RLX_NB_OUT/<run>` or `analysis/notebooks/_outputs/<name>/<run>`,
    never the training run's directory."""
    import os

    root = (
        Path(os.environ["RLX_NB_OUT"])
        if os.environ.get("RLX_NB_OUT")
        else Path(__file__).parent / "notebooks" / "_outputs" / name
    )
    out = root / Path(run_dir).name
    out.mkdir(parents=True, exist_ok=True)
    return out
