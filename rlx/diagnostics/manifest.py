"""The diagnostics directory and its manifest.

Every instrument writes under `<run_dir>/diagnostics/` through a `DiagnosticsWriter` and registers
each file in `diagnostics/manifest.json`:

    {"format": "rlx-diagnostics", "manifest_version": 1,
     "files": [{"name": "grad_alignment", "path": "grad_alignment.parquet", "format": "parquet",
                "schema_version": 1, "rank": 0, "instrument": "grad_alignment",
                "description": "...", "updated": "2026-11-21T14:00:00"}]}

Files a rank writes alone carry `.rank{r}` in their name unless they hold globally reduced values
(written by rank 0 only). Writes are atomic (temp file + rename), so a crash never leaves a truncated
file behind a manifest entry; the manifest itself is updated under a file lock so ranks never clobber
each other's entries. The analysis package reads only files the manifest lists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


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


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "diagnostics" / MANIFEST_NAME
    if not path.exists():
        return {"format": "rlx-diagnostics", "manifest_version": MANIFEST_VERSION, "files": []}
    return json.loads(path.read_text())


class DiagnosticsWriter:
    """Writes diagnostics files for one rank of one run and keeps the manifest current."""

    def __init__(self, run_dir: str | Path, rank: int = 0, world_size: int = 1):
        self.dir = Path(run_dir) / "diagnostics"
        self.rank, self.world_size = rank, world_size  # the directory is made by the first write

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
        """Add or refresh the manifest entry for `path` (idempotent)."""
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
        lock = self.dir / ".manifest.lock"
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                manifest = read_manifest(self.dir.parent)
                files = [f for f in manifest["files"] if f["path"] != entry["path"]]
                manifest["files"] = sorted([*files, entry], key=lambda f: f["path"])
                with atomic_path(self.dir / MANIFEST_NAME) as tmp:
                    tmp.write_text(json.dumps(manifest, indent=1))
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- typed writers -----------------------------------------------------------------------------

    def write_parquet(
        self,
        relpath: str,
        rows: list[dict[str, Any]],
        *,
        schema_version: int,
        instrument: str,
        description: str,
        per_rank: bool = False,
    ) -> Path:
        """Write all `rows` (the whole table so far) atomically as parquet and register it."""
        import pandas as pd

        path = self.path(relpath, per_rank)
        with atomic_path(path) as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
        self.register(path.stem.split(".rank")[0], path, "parquet", schema_version, instrument, description)
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
    ) -> Path:
        """Write a safetensors file atomically and register it."""
        from safetensors.torch import save_file

        path = self.path(relpath, per_rank)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"schema_version": str(schema_version), "instrument": instrument, **(metadata or {})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self.register(Path(relpath).stem, path, "safetensors", schema_version, instrument, description)
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
        self.register(Path(relpath).stem, path, "json", schema_version, instrument, description)
        return path
