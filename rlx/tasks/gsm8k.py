"""GSM8K-style math word problems with a verifiable final answer.

Rows need `question` and `answer` (GSM8K's format: reasoning, then `#### 42`). Prompts are conversational;
the reward is 1.0 when the completion's final answer equals the reference, checked with `math-verify`
(LaTeX/expression aware) and falling back to the last number in the text.
"""

from __future__ import annotations

import re

from datasets import Dataset

from rlx.tasks.base import Task
from rlx.tasks.data import load_split, require_columns

DEFAULT_SYSTEM = (
    "Solve the problem step by step. Put the final answer in \\boxed{} at the end of your response."
)
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def reference_answer(answer_field: str) -> str:
    """The number after `####` in a GSM8K answer (commas removed)."""
    tail = answer_field.split("####")[-1]
    return tail.strip().replace(",", "")


def _last_number(text: str) -> str | None:
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "") if nums else None


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer equals `answer`, else 0.0 (math-verify, then last-number match)."""
    try:
        from math_verify import parse, verify

        gold = parse(answer)
        pred = parse(completion)
        if gold and pred and verify(gold, pred):
            return 1.0
        if pred:  # math-verify parsed an answer and it was wrong
            return 0.0
    except Exception:  # math-verify unavailable or failed to parse: fall back
        pass
    last = _last_number(completion)
    try:
        return 1.0 if last is not None and abs(float(last) - float(answer)) < 1e-6 else 0.0
    except ValueError:
        return 0.0


class GSM8KTask(Task):
    name = "gsm8k"
    max_completion_length = 512

    def _load(self, split: str, limit: int | None, spec: str | None = None) -> Dataset:
        spec = spec or self.cfg.dataset or "openai/gsm8k"
        config = self.cfg.dataset_config or ("main" if spec == "openai/gsm8k" else None)
        ds = load_split(spec, split, config, limit)
        require_columns(ds, ["question", "answer"], spec)
        system = self.cfg.system_prompt or DEFAULT_SYSTEM

        def convert(row):
            return {
                "prompt": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": row["question"]},
                ],
                "answer": reference_answer(row["answer"]),
                "solution": row["answer"].split("####")[0].strip()
                + f"\n\\boxed{{{reference_answer(row['answer'])}}}",
            }

        return ds.map(convert, remove_columns=ds.column_names)

    def train_dataset(self) -> Dataset:
        return self._load(self.cfg.train_split, self.cfg.max_train_samples)

    def eval_dataset(self) -> Dataset:
        return self._load(self.cfg.eval_split, self.cfg.max_eval_samples, self.cfg.eval_dataset)

    def score(self, completion: str, answer: str) -> float:
        return math_reward(completion, answer)
