"""rlx/algorithms/probing.py: the probe monitors' shared helpers, against hand-computed cases and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algorithms.probing import StepRows, auroc, measured_step, reward_buckets


def test_measured_step_on_fresh_rollouts():
    assert [s for s in range(1, 31) if measured_step(s, 10)] == [1, 10, 20, 30]
    assert [s for s in range(1, 6) if measured_step(s, 1)] == [1, 2, 3, 4, 5]
    assert [s for s in range(1, 30) if measured_step(s, 0)] == [1]  # every <= 0: step 1 only


def test_measured_step_with_reused_rollouts_takes_the_first_step_of_a_rollout_holding_a_multiple():
    # rollouts start at steps 1, 5, 9, 13, ... (4 optimizer steps each); every=10: (prev start, step] must hold a
    # multiple of 10: 10 lies in (5, 9]? no; in (9, 13] yes -> step 13; 20 in (17, 21] -> 21; 30 in (29, 33] -> 33
    assert [s for s in range(1, 40) if measured_step(s, 10, rollout_steps=4)] == [1, 13, 21, 33]
    assert [s for s in range(1, 14) if measured_step(s, 1, rollout_steps=4)] == [1, 5, 9, 13]


def _auroc_brute(s, y):
    pos, neg = [a for a, b in zip(s, y) if b], [a for a, b in zip(s, y) if not b]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pairwise_count_with_ties_half(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = torch.rand(40, generator=g) < 0.4
    assert auroc(s, y) == pytest.approx(_auroc_brute(s.tolist(), y.tolist()), abs=1e-12)


def test_auroc_hand_cases():
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 1, 1])) == 0.5
    assert auroc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1, 0, 0])) == 1.0
    assert auroc(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1, 0, 0])) == 0.5
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    assert math.isnan(auroc(torch.tensor([1.0, float("nan")]), torch.tensor([1, 0])))


def test_reward_buckets_threshold_and_nan():
    b = reward_buckets(torch.tensor([0.0, 1.0, 0.5, float("nan"), 2.0]), threshold=0.5)
    assert b["correct"].tolist() == [False, True, True, False, True]
    assert b["wrong"].tolist() == [True, False, False, False, False]


def test_step_rows_keep_each_sample_once_and_in_order():
    rows = StepRows()
    rows.add(torch.tensor([7, 3]), x=torch.tensor([1.0, 2.0]), r=torch.tensor([0.0, 1.0]))
    rows.add(torch.tensor([3, 9]), x=torch.tensor([5.0, 4.0]), r=torch.tensor([1.0, 0.0]))  # 3 again: ignored
    rows.add(torch.tensor([7]), x=torch.tensor([8.0]), r=torch.tensor([1.0]))  # all seen: nothing
    assert len(rows) == 3
    out = rows.gather(None)
    assert out["sample_id"].tolist() == [7, 3, 9] and out["x"].tolist() == [1.0, 2.0, 4.0]
    assert out["x"].dtype == torch.float64 and out["sample_id"].dtype == torch.int64
    assert len(rows) == 0 and rows.gather(None) == {}  # emptied
    rows.add(None, x=torch.tensor([1.0, 2.0]))  # no ids: numbered in arrival order
    rows.add(None, x=torch.tensor([3.0]))
    assert rows.gather(None)["sample_id"].tolist() == [0, 1, 2]
