"""Your own task: a prompts file and a reward function (`task=jsonl task.dataset=FILE task.reward=[mod:fn]`).

Rows need `prompt` (a string, or a list of chat messages) and an answer column (`task.answer_column`,
default `answer`); an optional `solution` (a reference completion) is used by SFT and the alignment target.
Every other column reaches the reward functions as a keyword argument (TRL's convention). Held-out prompts
come from `task.eval_dataset` or, without one, `task.num_eval` rows split off the training file with
`task.data_seed` (disjoint from training).
"""

from __future__ import annotations

from datasets import Dataset

from rlx.tasks.base import Task, completion_text
from rlx.tasks.data import load_split, require_columns
from rlx.tasks.gsm8k import math_reward


class JsonlTask(Task):
    name = "jsonl"
    max_completion_length = 256

    def _normalised(self, ds: Dataset, spec: str) -> Dataset:
        col = self.cfg.answer_column
        require_columns(ds, ["prompt", col], spec)
        if col != "answer":
            ds = ds.remove_columns([c for c in ds.column_names if c == "answer"]).rename_column(col, "answer")
        ds = ds.map(lambda r: {"answer": str(r["answer"])})
        if "solution" not in ds.column_names:
            ds = ds.map(lambda r: {"solution": r["answer"]})
        return ds

    def _splits(self) -> tuple[Dataset, Dataset]:
        if getattr(self, "_cache", None) is None:
            if not self.cfg.dataset:
                from rlx.errors import UserError

                raise UserError(
                    "task=jsonl needs task.dataset=FILE (.jsonl/.json/.parquet/.csv) with prompt and answer columns."
                )
            train = self._normalised(load_split(self.cfg.dataset, self.cfg.train_split), self.cfg.dataset)
            if self.cfg.eval_dataset:
                held = self._normalised(
                    load_split(self.cfg.eval_dataset, self.cfg.eval_split), self.cfg.eval_dataset
                )
            else:
                n = min(self.cfg.num_eval, len(train) // 2)
                parts = train.train_test_split(test_size=max(n, 1), seed=self.cfg.data_seed)
                train, held = parts["train"], parts["test"]
            if self.cfg.max_train_samples is not None:
                train = train.select(range(min(self.cfg.max_train_samples, len(train))))
            if self.cfg.max_eval_samples is not None:
                held = held.select(range(min(self.cfg.max_eval_samples, len(held))))
            self._cache = (train, held)
        return self._cache

    def train_dataset(self) -> Dataset:
        return self._splits()[0]

    def eval_dataset(self) -> Dataset:
        return self._splits()[1]

    def score(self, completion: str, answer: str) -> float:
        """The first `task.reward` plug-in on this one sample, else math-verify / last-number match."""
        if self.cfg.reward:
            value = self.reward_funcs[0](prompts=[None], completions=[completion], answer=[answer])[0]
            return float("nan") if value is None else float(value)
        return math_reward(completion_text(completion), answer)
