"""UltraFeedback-style preference data for DPO (e.g. HuggingFaceH4/ultrafeedback_binarized).

Rows need `chosen` and `rejected` as message lists (the last message is the assistant reply) and
optionally `prompt`; they are converted to TRL's conversational preference format
(`prompt` messages, `chosen` / `rejected` single assistant messages). There is no verifiable reward.
"""

from __future__ import annotations

from datasets import Dataset

from rlx.tasks.base import Task
from rlx.tasks.data import load_split, require_columns


def to_preference_row(row: dict) -> dict:
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str):  # plain-text variant: prompt + completion strings
        return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
    prompt = chosen[:-1] if len(chosen) > 1 else [{"role": "user", "content": row.get("prompt", "")}]
    return {"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


class UltraFeedbackTask(Task):
    name = "ultrafeedback"
    max_completion_length = 512
    verifiable = False
    preference_pairs = True

    def _load(self, split: str, limit: int | None, spec: str | None = None) -> Dataset:
        spec = spec or self.cfg.dataset or "HuggingFaceH4/ultrafeedback_binarized"
        ds = load_split(spec, split, self.cfg.dataset_config, limit)
        require_columns(ds, ["chosen", "rejected"], spec)
        return ds.map(to_preference_row, remove_columns=ds.column_names)

    def train_dataset(self) -> Dataset:
        return self._load(self.cfg.train_split, self.cfg.max_train_samples)

    def eval_dataset(self) -> Dataset:
        return self._load(self.cfg.eval_split, self.cfg.max_eval_samples, self.cfg.eval_dataset)

    def score(self, completion: str, answer: str) -> float:
        raise NotImplementedError("ultrafeedback has no verifiable reward; use it with algo=dpo")
