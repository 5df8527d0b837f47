"""Load real datasets through `datasets`: a hub id, a local dataset directory, or local json/jsonl/parquet files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset, load_from_disk

from rlx.errors import UserError, hub_hint

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_split(
    spec: str,
    split: str,
    config: str | None = None,
    limit: int | None = None,
    key: str = "task.dataset (task.eval_dataset for the held-out split)",
) -> Dataset:
    """One split of `spec` (the value of config `key`, named in errors).

    - `path/to/file.jsonl|.json|.parquet|.csv`: the file is the split (`split` is ignored);
    - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: `split` is selected;
    - a directory of data files or a hub id: `load_dataset(spec, config, split=split)` (hub ids need network,
      or a populated HF cache under HF_HUB_OFFLINE=1; rlx sets neither).
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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"cannot load dataset '{spec}' (config={config}, split={split}): {first}. "
            f"{hub_hint(spec, key, kind='dataset')}"
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


def fit_prompts(
    ds: Dataset, tokenizer: Any, context: int | None, max_completion_length: int, overlong: str = "error"
) -> Dataset:
    """`ds` without prompts that do not fit the model's context together with the completion budget.

    rlx never truncates a prompt for rollouts (a truncated question is another question, and its reward is
    meaningless): `overlong="error"` refuses the run, `"drop"` removes those rows and prints the count. Chat
    prompts are measured after the chat template. `context` is the model's `max_position_embeddings` (None:
    unknown, nothing checked).
    """
    if overlong not in ("error", "drop"):
        raise UserError(f"task.overlong_prompts={overlong!r}: expected 'error' or 'drop'.")
    if not context:
        return ds
    limit = int(context) - int(max_completion_length)
    if limit <= 0:
        raise UserError(
            f"trainer.max_completion_length={max_completion_length} leaves no room for a prompt in the model's "
            f"context of {context} tokens. Set trainer.max_completion_length below {context}."
        )
    prompts = ds["prompt"]
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        if isinstance(p, list)
        else p
        for p in prompts
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over and overlong == "drop":
        keep = sorted(set(range(len(lengths))) - set(over))
        if not keep:
            raise UserError(
                f"every training prompt is longer than {limit} tokens (context {context} minus "
                f"trainer.max_completion_length={max_completion_length}); nothing is left to train on."
            )
        print(
            f"task.overlong_prompts=drop: dropped {len(over)} of {len(lengths)} training prompts over {limit} tokens"
        )
        return ds.select(keep)
    if over:
        worst = max(over, key=lengths.__getitem__)
        raise UserError(
            f"{len(over)} of {len(lengths)} training prompts are longer than {limit} tokens (the model's context "
            f"{context} minus trainer.max_completion_length={max_completion_length}); the longest, row {worst}, "
            f"has {lengths[worst]} tokens. rlx does not truncate prompts. Lower trainer.max_completion_length, "
            "or set task.overlong_prompts=drop to train without them."
        )
    return ds
