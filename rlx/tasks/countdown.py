"""Countdown: use each of n numbers exactly once with + - * / to reach a target.

Reward (TinyZero-style): 1.0 for a correct expression, 0.1 for a well-formed
expression that is wrong or misuses the numbers, 0.0 for anything that does not parse. The prompt is
`Use 3 7 9 to get 30:`; the completion is a bare expression such as `(9-7)*3*5`.
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from datasets import Dataset

from rlx.tasks.base import Task

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def parse_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the list of integer literals of an arithmetic expression, or None if malformed."""
    text = text.strip()
    if not text or len(text) > 64 or any(c not in "0123456789+-*/() " for c in text):
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    leaves: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            leaves.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _OPS[type(node.op)](left, right)
        raise ValueError("unsupported syntax")

    try:
        return ev(tree), leaves
    except (ZeroDivisionError, ValueError):
        return None


def countdown_reward(completion: str, numbers: list[int], target: int) -> float:
    """1.0 if `completion` uses each of `numbers` exactly once and equals `target`; 0.1 if it parses; else 0."""
    parsed = parse_expression(completion)
    if parsed is None:
        return 0.0
    value, leaves = parsed
    return 1.0 if sorted(leaves) == sorted(numbers) and value == target else 0.1


def random_puzzle(n: int, max_number: int, rng: random.Random, max_target: int = 99):
    """Draw n numbers and a random expression over them whose value is an integer in [1, max_target]."""
    while True:
        nums = [rng.randint(1, max_number) for _ in range(n)]
        exprs = [(Fraction(x), str(x), True) for x in nums]  # (value, text, is_leaf)
        rng.shuffle(exprs)
        while len(exprs) > 1:
            (va, ta, la), (vb, tb, lb) = exprs.pop(), exprs.pop()
            op = rng.choice("+-*/")
            if op == "/" and (vb == 0 or (va / vb).denominator != 1):
                op = rng.choice("+*")
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else va}[op]
            wrap = lambda t, leaf: t if leaf else f"({t})"  # noqa: E731
            exprs.append((value, f"{wrap(ta, la)}{op}{wrap(tb, lb)}", False))
            rng.shuffle(exprs)
        value, text, _ = exprs[0]
        if value.denominator == 1 and 1 <= value <= max_target:
            return nums, int(value), text


class CountdownTask(Task):
    name = "countdown"
    max_completion_length = 24

    def __init__(self, cfg):
        super().__init__(cfg)
        rng = random.Random(cfg.data_seed)
        seen, puzzles = set(), []
        total = cfg.num_eval + cfg.num_train
        while len(puzzles) < total:
            nums, target, text = random_puzzle(
                rng.choice(list(cfg.countdown_sizes)), cfg.countdown_max_number, rng
            )
            key = (tuple(sorted(nums)), target)
            if key not in seen:
                seen.add(key)
                puzzles.append((nums, target, text))
        self._eval, self._train = puzzles[: cfg.num_eval], puzzles[cfg.num_eval :]

    @staticmethod
    def _to_dataset(puzzles) -> Dataset:
        return Dataset.from_dict(
            {
                "prompt": [f"Use {' '.join(map(str, n))} to get {t}:" for n, t, _ in puzzles],
                "answer": [f"{' '.join(map(str, n))}|{t}" for n, t, _ in puzzles],
                "solution": [s for _, _, s in puzzles],
            }
        )

    def train_dataset(self) -> Dataset:
        return self._to_dataset(self._train)

    def eval_dataset(self) -> Dataset:
        return self._to_dataset(self._eval)

    def score(self, completion: str, answer: str) -> float:
        nums, target = answer.split("|")
        return countdown_reward(completion, [int(x) for x in nums.split()], int(target))
