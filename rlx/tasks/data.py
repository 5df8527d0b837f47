"""Load real datasets through `datasets`: a hub id, a local dataset directory, or local json/jsonl/parquet files."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from rlx.errors import UserError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_split(spec: str, split: str, config: str | None = None, limit: int | None = None) -> Dataset:
    """One split of `spec`.

    - `path/to/file.jsonl|.json|.parquet|.csv`: the file is the split (`split` is ignored);
    - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: `split` is selected;
    - a directory of data files or a hub id: `load_dataset(spec, config, split=split)` (hub ids need network
      or a populated HF cache; rlx sets HF_HUB_OFFLINE=1 unless you unset it).
    """
    path = Path(spec)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise UserError(
                    f"cannot load data file {path}: unsupported suffix '{path.suffix}'. "
                    f"Expected one of {', '.join(_FILE_BUILDERS)}."
                )
            if path.stat().st_size == 0:
                raise UserError(
                    f"data file {path} is empty; expected one example per row. Point at a non-empty file."
                )
            ds = load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            ds = load_from_disk(str(path))
            if not isinstance(ds, Dataset):
                if split not in ds:
                    raise UserError(
                        f"dataset {path} has splits {list(ds)}, not '{split}'. Set the split key."
                    )
                ds = ds[split]
        else:
            ds = load_dataset(spec, config, split=split)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError, StopIteration) as e:
        raise UserError(
            f"cannot load dataset '{spec}' (config={config}, split={split}): {e}. "
            "Give a local .jsonl/.parquet file or directory, or a hub id with network access "
            "(unset HF_HUB_OFFLINE)."
        ) from None
    if len(ds) == 0:
        raise UserError(f"dataset '{spec}' (split={split}) has no rows; expected at least one example.")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def require_columns(ds: Dataset, columns: list[str], spec: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(
            f"dataset '{spec}' lacks column(s) {missing}; it has {ds.column_names}. "
            f"Expected columns {columns}."
        )
