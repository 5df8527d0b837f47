"""How dumps are stored: the run's diagnostics directory and its manifest (the declarations are in `rlx.dumps`).

Every instrument writes under `<run_dir>/diagnostics/` through a `DiagnosticsWriter` and registers
each file in `diagnostics/manifest.jsonl` (manifest version 2), an append-only log of entries:

    {"format": "rlx-diagnostics", "manifest_version": 2}                                  <- header line
    {"name": "grad_alignment", "path": "grad_alignment/step_000010.parquet", "format": "parquet",
     "schema_version": 1, "rank": 0, "instrument": "grad_alignment", "description": "...",
     "updated": "2026-11-21T14:00:00"}                                                    <- one line per write

A write appends one line (O(1) per write, however long the run); a later line for the same `path` replaces
the earlier one. `read_manifest` folds the lines into the version-1 shape `{"format", "manifest_version",
"files": [...]}` (sorted by path), so readers see one entry per file. Runs written before version 2 have
`diagnostics/manifest.json` (that shape, rewritten whole at every write); `read_manifest` reads it too, and
a run resumed by a newer rlx holds both (the JSONL entries win).

Files a rank writes alone carry `.rank{r}` in their name unless they hold globally reduced values
(written by rank 0 only). Tables that grow over a run are written as one shard per write (e.g.
`grad_alignment/step_NNNNNN.parquet`, all registered under the table's `name`), never rewritten.
File writes are atomic (temp file + rename), so a crash never leaves a truncated file behind a manifest
entry; the manifest is appended under a file lock so ranks never interleave lines, and a line torn by a kill
is dropped by the reader (`torn` counts them). The analysis package reads only files the manifest lists.

What each file holds (path, version, columns and dtypes) is declared in `rlx.dumps`; `DiagnosticsWriter.write`
checks the data against its declaration. `DiagnosticsWriter.stats` counts the bytes and files each writer wrote
(payload and manifest separately).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from rlx.dumps import Dump

MANIFEST_NAME = "manifest.jsonl"
LEGACY_MANIFEST_NAME = "manifest.json"
"""Manifest version 1: one JSON document rewritten at every write (runs of rlx before manifest version 2)."""
MANIFEST_VERSION = 2
HEADER = {"format": "rlx-diagnostics", "manifest_version": MANIFEST_VERSION}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest_lines(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(header, entries in write order, number of lines that are not JSON objects) of a manifest.jsonl."""
    header: dict[str, Any] = {}
    entries, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not isinstance(obj, dict):
            torn += 1
        elif "path" in obj:
            entries.append(obj)
        elif "manifest_version" in obj:
            header = obj
    return header, entries, torn


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest as `{"format", "manifest_version", "files": [one entry per path, sorted], "torn"}`.

    Reads `diagnostics/manifest.json` (version 1) and `diagnostics/manifest.jsonl` (version 2); for a path in
    both, or written more than once, the last entry wins. `manifest_version` is the newest version found.
    """
    diag = Path(run_dir) / "diagnostics"
    files: dict[str, dict[str, Any]] = {}
    versions, torn = [], 0
    legacy, log = diag / LEGACY_MANIFEST_NAME, diag / MANIFEST_NAME
    if legacy.exists():
        old = json.loads(legacy.read_text())
        versions.append(int(old.get("manifest_version", 1)))
        files.update({f["path"]: f for f in old.get("files", [])})
    if log.exists():
        header, entries, torn = read_manifest_lines(log)
        versions.append(int(header.get("manifest_version", MANIFEST_VERSION)))
        files.update({f["path"]: f for f in entries})
    version = max(versions, default=MANIFEST_VERSION)
    return {
        "format": "rlx-diagnostics",
        "manifest_version": version,
        "files": sorted(files.values(), key=lambda f: f["path"]),
        "torn": torn,
    }


class DiagnosticsWriter:
    """Writes diagnostics files for one rank of one run and keeps the manifest current.

    `stats` counts what this writer wrote: `files` and `bytes` (payload files, each counted at its final
    size), `manifest_lines` and `manifest_bytes` (appended to the manifest).
    """

    def __init__(self, run_dir: str | Path, rank: int = 0, world_size: int = 1):
        self.dir = Path(run_dir) / "diagnostics"
        self.rank, self.world_size = rank, world_size  # the directory is made by the first write
        self.stats = {"files": 0, "bytes": 0, "manifest_lines": 0, "manifest_bytes": 0}

    def path(self, relpath: str, per_rank: bool = False) -> Path:
        """Where to write `relpath`; per-rank files get `.rank{r}` before the suffix."""
        p = self.dir / relpath
        if per_rank:
            p = p.with_name(f"{p.stem}.rank{self.rank}{p.suffix}")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def register(
        self,
        name: str,
        path: Path,
        fmt: str,
        schema_version: int,
        instrument: str,
        description: str,
        **extra: Any,
    ) -> None:
        """Append the manifest entry for `path` (a later entry for the same path replaces an earlier one)."""
        entry = {
            "name": name,
            "path": str(Path(path).relative_to(self.dir)),
            "format": fmt,
            "schema_version": schema_version,
            "rank": self.rank,
            "instrument": instrument,
            "description": description,
            "updated": _dt.datetime.now().isoformat(timespec="seconds"),
            **extra,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.dir / ".manifest.lock"
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                with open(self.dir / MANIFEST_NAME, "ab+") as log:
                    data = b""
                    end = log.seek(0, os.SEEK_END)
                    if end == 0:
                        data += (json.dumps(HEADER) + "\n").encode()
                    else:  # a line torn by a kill mid-append stays alone on its line
                        log.seek(end - 1)
                        if log.read(1) != b"\n":
                            data += b"\n"
                    data += (json.dumps(entry) + "\n").encode()
                    log.write(data)
                    log.flush()
                self.stats["manifest_lines"] += 1
                self.stats["manifest_bytes"] += len(data)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _count(self, path: Path) -> None:
        self.stats["files"] += 1
        self.stats["bytes"] += path.stat().st_size

    # ---- typed writers -----------------------------------------------------------------------------

    def write(
        self,
        dump: Dump,
        data: Any,
        *,
        metadata: dict[str, str] | None = None,
        description: str | None = None,
        per_rank: bool | None = None,
        **path_fields: Any,
    ) -> Path:
        """Write one file of a declared dump (`rlx.dumps`) and register it: its path (the pattern filled with
        `path_fields`, `.rank{r}` for a per-rank dump), version, instrument and name come from the declaration,
        and `data` is checked against it (ValueError on an undeclared column, tensor or key). Parquet: `data` is
        a list of row dicts or a DataFrame, written with the declared arrow schema; safetensors: a dict of
        tensors (+ `metadata`); json: an object. `per_rank` overrides the declaration's (e.g. a file that carries
        `.rank{r}` only under multi-process training)."""
        from rlx import dumps

        relpath, desc = dump.relpath(**path_fields), description or dump.description
        per_rank = dump.per_rank if per_rank is None else per_rank
        kw = dict(schema_version=dump.version, instrument=dump.instrument, description=desc)
        if dump.format == "parquet":
            return self.write_parquet(
                relpath, dumps.arrow_table(dump, data), per_rank=per_rank, name=dump.name, **kw
            )
        if dump.format == "safetensors":
            dumps.check_tensors(dump, data, metadata)
            return self.write_tensors(
                relpath, data, metadata=metadata, per_rank=per_rank, name=dump.name, **kw
            )
        dumps.check_json(dump, data)
        return self.write_json(relpath, data, per_rank=per_rank, **kw)

    def write_parquet(
        self,
        relpath: str,
        rows: list[dict[str, Any]] | pa.Table,
        *,
        schema_version: int,
        instrument: str,
        description: str,
        per_rank: bool = False,
        name: str | None = None,
    ) -> Path:
        """Write `rows` (row dicts, or a pyarrow Table) atomically as one parquet file and register it (under
        `name`, default the file stem). Declared dumps go through `write`, which builds the Table.

        A table that grows over a run is written as shards under one `name` (the analysis loader
        concatenates them), so each write costs the new rows only."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path(relpath, per_rank)
        with atomic_path(path) as tmp:
            if isinstance(rows, pa.Table):
                pq.write_table(rows, tmp)
            else:
                import pandas as pd

                pd.DataFrame(rows).to_parquet(tmp, index=False)
        self._count(path)
        name = name or path.stem.split(".rank")[0]
        self.register(name, path, "parquet", schema_version, instrument, description)
        return path

    def write_tensors(
        self,
        relpath: str,
        tensors: dict[str, Any],
        *,
        schema_version: int,
        instrument: str,
        description: str,
        metadata: dict[str, str] | None = None,
        per_rank: bool = False,
        name: str | None = None,
    ) -> Path:
        """Write a safetensors file atomically and register it (under `name`, default the file stem)."""
        from safetensors.torch import save_file

        path = self.path(relpath, per_rank)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"schema_version": str(schema_version), "instrument": instrument, **(metadata or {})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self._count(path)
        self.register(
            name or Path(relpath).stem, path, "safetensors", schema_version, instrument, description
        )
        return path

    def write_json(
        self,
        relpath: str,
        obj: Any,
        *,
        schema_version: int,
        instrument: str,
        description: str,
        per_rank=False,
    ) -> Path:
        path = self.path(relpath, per_rank)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj, indent=1))
        self._count(path)
        self.register(Path(relpath).stem, path, "json", schema_version, instrument, description)
        return path


def read_table(run_dir: str | Path, name: str, instrument: str | None = None) -> Any:
    """Every parquet file the manifest lists under `name` (shards, ranks), concatenated in path order; None if
    there is none. A light reader for scripts and tests; `analysis.loader.Run.table` is the checked one."""
    import pandas as pd

    diag = Path(run_dir) / "diagnostics"
    frames = [
        pd.read_parquet(diag / f["path"])
        for f in read_manifest(run_dir)["files"]
        if f.get("format") == "parquet"
        and f["name"] == name
        and (instrument is None or f.get("instrument") == instrument)
    ]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else None
