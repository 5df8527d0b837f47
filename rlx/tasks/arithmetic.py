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


def buggy_op(a: int, op: str, b: int) -> int:
    """The answer of the two classic column-arithmetic bugs (Brown & Burton 1978, "Diagnostic models for procedural
    bugs in basic mathematical skills"), applied column by column from the units up:

    - addition forgets the carry: each result digit is (a_i + b_i) mod 10, so 47+38 -> 75 (correct 85);
    - subtraction takes the smaller digit from the larger ("smaller-from-larger"): each digit is |x_i - y_i| for
      x = max(a, b), y = min(a, b), and the sign is that of a - b, so 52-38 -> 26 (correct 14), 38-52 -> -26.

    Problems that need no carry or borrow come out right. Other operators have no bug (the correct value).
    """
    if op == "+":
        width = max(len(str(a)), len(str(b)))
        return sum(((a // 10**i % 10 + b // 10**i % 10) % 10) * 10**i for i in range(width))
    if op == "-":
        x, y = max(a, b), min(a, b)
        digits = sum(abs(x // 10**i % 10 - y // 10**i % 10) * 10**i for i in range(len(str(x))))
        return digits if a >= b else -digits
    return evaluate_op(a, op, b)


_PROBLEM = re.compile(r"^(\d+)([+*-])(\d+)=$")


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

    def buggy_solution(self, prompt: str) -> str | None:
        """`buggy_op` on the problem in `prompt` (None when the bug gives the correct answer)."""
        m = _PROBLEM.match(prompt)
        if m is None:
            return None
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        wrong = buggy_op(a, op, b)
        return None if wrong == evaluate_op(a, op, b) else str(wrong)
