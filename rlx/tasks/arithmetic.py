"""Integer arithmetic: `a+b=` / `a-b=` with multi-digit operands; reward 1 for the exact integer, else 0."""

from __future__ import annotations

import random
import re

from datasets import Dataset

from rlx.errors import UserError
from rlx.tasks.base import Task

_INT = re.compile(r"^\s*(-?\d+)\s*$")


def arithmetic_reward(completion: str, answer: str) -> float:
    """1.0 when the completion is exactly the integer `answer` (surrounding whitespace allowed), else 0.0."""
    m = _INT.match(completion)
    return 1.0 if m is not None and int(m.group(1)) == int(answer) else 0.0


def generate_problems(n: int, min_digits: int, max_digits: int, operations: list[str], rng: random.Random):
    """`n` distinct problems (a, op, b); operand digit counts drawn uniformly in [min_digits, max_digits]."""
    seen, out = set(), []
    space = sum(1 for _ in operations) * (10**max_digits) ** 2
    if n > space:
        raise UserError(
            f"task.num_train + task.num_eval = {n} distinct problems requested, but only {space} exist with "
            f"max_digits={max_digits}. Lower task.num_train or raise task.max_digits."
        )
    while len(out) < n:
        da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
        a = rng.randint(0 if da == 1 else 10 ** (da - 1), 10**da - 1)
        b = rng.randint(0 if db == 1 else 10 ** (db - 1), 10**db - 1)
        p = (a, rng.choice(operations), b)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def evaluate_op(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.max_completion_length = cfg.max_digits + 3  # sign, carry digit, eos
        rng = random.Random(cfg.data_seed)
        problems = generate_problems(
            cfg.num_eval + cfg.num_train, cfg.min_digits, cfg.max_digits, list(cfg.operations), rng
        )
        self._eval, self._train = problems[: cfg.num_eval], problems[cfg.num_eval :]

    @staticmethod
    def _to_dataset(problems) -> Dataset:
        rows = {"prompt": [], "answer": [], "solution": []}
        for a, op, b in problems:
            result = str(evaluate_op(a, op, b))
            rows["prompt"].append(f"{a}{op}{b}=")
            rows["answer"].append(result)
            rows["solution"].append(result)
        return Dataset.from_dict(rows)

    def train_dataset(self) -> Dataset:
        return self._to_dataset(self._train)

    def eval_dataset(self) -> Dataset:
        return self._to_dataset(self._eval)

    def score(self, completion: str, answer: str) -> float:
        return arithmetic_reward(completion, answer)
