"""Tokenizer round trip, task generation and the pure reward functions."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from rlx.algorithms.passk import pass_at_k
from rlx.config.schema import TaskConfig
from rlx.embedded import build_tokenizer, load_tokenizer
from rlx.tasks import get_task
from rlx.tasks.arithmetic import ArithmeticTask, arithmetic_reward, buggy_op
from rlx.tasks.countdown import countdown_reward, parse_expression, random_puzzle
from rlx.tasks.gsm8k import math_reward, reference_answer


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = build_tokenizer()
    text = "Use 3 7 9 to get 30: (9-7)*3*5 = x!"
    ids = tok(text=text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again(text=text)["input_ids"] == ids and again.padding_side == "left"
    assert again.decode(ids + [again.eos_token_id], skip_special_tokens=True) == text
    chat = again.apply_chat_template(
        [{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|user|>1+1=<|assistant|>"


def test_arithmetic_splits_are_disjoint_and_answers_correct():
    task = get_task(TaskConfig(name="arithmetic", num_train=500, num_eval=50))
    train, held = task.train_dataset(), task.eval_dataset()
    assert len(train) == 500 and len(held) == 50
    assert not set(train["prompt"]) & set(held["prompt"])
    for p, a in zip(held["prompt"], held["answer"]):
        assert int(a) == eval(p[:-1])  # noqa: S307 - generated arithmetic only


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        ("46", "46", 1.0),
        (" 46 ", "46", 1.0),
        ("-4", "-4", 1.0),
        ("45", "46", 0.0),
        ("46x", "46", 0.0),
        ("", "3", 0.0),
    ],
)
def test_arithmetic_reward(completion, answer, reward):
    assert arithmetic_reward(completion, answer) == reward


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("(9-7)*15", 0.1),  # well formed, wrong numbers
        ("9*3+7", 0.1),  # uses each once, value 34 != 30
        ("(9-7)*3*5", 0.1),  # 5 is not given
        ("3*(7+9)-18", 0.1),
        ("(9+7-3)*3", 0.1),
        ("3*(9-7)", 0.1),  # misses nothing? uses 3,9,7 -> 6 != 30
        ("3*7+9", 1.0),  # 30
        ("9+7*3", 1.0),
        ("9/0+3+7", 0.0),  # division by zero: malformed
        ("3 7 9", 0.0),
        ("abc", 0.0),
        ("", 0.0),
    ],
)
def test_countdown_reward(completion, reward):
    assert countdown_reward(completion, [3, 7, 9], 30) == reward


def test_countdown_puzzles_are_solved_by_their_reference():
    rng = random.Random(0)
    for _ in range(200):
        nums, target, text = random_puzzle(rng.choice([3, 4]), 20, rng)
        assert countdown_reward(text, nums, target) == 1.0
        value, leaves = parse_expression(text)
        assert value == target and sorted(leaves) == sorted(nums)


def test_gsm8k_answer_and_reward():
    assert reference_answer("so 3*4=12\n#### 1,200") == "1200"
    assert math_reward("... the answer is \\boxed{1200}", "1200") == 1.0
    assert math_reward("so we get 1200.", "1200") == 1.0
    assert math_reward("\\boxed{1199}", "1200") == 0.0


def _pass_at_k_brute(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 4), (8, 3, 8), (10, 9, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert math.isclose(pass_at_k(n, c, k), _pass_at_k_brute(n, c, k), rel_tol=1e-12)
    assert math.isclose(pass_at_k(n, c, k), 1 - math.comb(n - c, k) / math.comb(n, k), rel_tol=1e-12)


def test_pass_at_k_all_correct_and_bad_counts():
    assert pass_at_k(4, 4, 2) == 1.0 and pass_at_k(4, 4, 4) == 1.0
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(4, -1, 1)
    with pytest.raises(ValueError, match="needs at least 5 samples"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize(
    "a, op, b, expected",
    [
        (47, "+", 38, 75),  # 7+8=15 -> 5, carry forgotten; 4+3=7
        (99, "+", 1, 90),
        (5, "+", 7, 2),
        (23, "+", 41, 64),  # no carry: the bug is invisible
        (52, "-", 38, 26),  # |2-8|=6, |5-3|=2
        (38, "-", 52, -26),  # sign of a-b, digits of the larger minus the smaller
        (10, "-", 1, 11),
        (5, "-", 7, -2),
        (57, "-", 23, 34),  # no borrow: correct
    ],
)
def test_buggy_column_arithmetic(a, op, b, expected):
    assert buggy_op(a, op, b) == expected
    task = ArithmeticTask.__new__(ArithmeticTask)
    correct = a + b if op == "+" else a - b
    assert task.buggy_solution(f"{a}{op}{b}=") == (None if expected == correct else str(expected))
