"""Advantage estimators (rlx/algorithms/advantages.py) against values worked out by hand, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from rlx.algorithms import ppo
from rlx.algorithms.advantages import (
    ADV_ESTIMATORS,
    advantage_estimator,
    grpo_advantages,
    register_adv_est,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from rlx.config.schema import TaskConfig
from rlx.tasks import get_task
from tests.test_ppo_trainer import tiny_random_model_dir  # noqa: F401  (fixture)

F64 = torch.float64
NAN = float("nan")


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


# Two prompts, three completions each: group 1 = [1, 2, 4], group 2 = [0, 0, 3].
REWARDS = [1.0, 2.0, 4.0, 0.0, 0.0, 3.0]
# Group 1: mean 7/3, deviations [-4/3, -1/3, 5/3], sample variance (16 + 1 + 25) / 9 / 2 = 7/3.
# Group 2: mean 1, deviations [-1, -1, 2], sample variance (1 + 1 + 4) / 2 = 3.
DEV = [-4 / 3, -1 / 3, 5 / 3, -1.0, -1.0, 2.0]


def test_grpo_group_scaling_is_trls():
    a = grpo_advantages(torch.tensor(REWARDS, dtype=F64), num_generations=3)
    s1, s2 = math.sqrt(7 / 3) + 1e-4, math.sqrt(3) + 1e-4  # sample std (N - 1) plus TRL's 1e-4
    close(a, [-4 / 3 / s1, -1 / 3 / s1, 5 / 3 / s1, -1 / s2, -1 / s2, 2 / s2])


def test_grpo_batch_and_no_scaling():
    r = torch.tensor(REWARDS, dtype=F64)
    # batch: the group baseline stays, the std is over all six rewards: mean 5/3, deviations
    # [-2/3, 1/3, 7/3, -5/3, -5/3, 4/3], squares sum to 120/9 = 40/3, sample variance 40/3 / 5 = 8/3.
    s = math.sqrt(8 / 3) + 1e-4
    close(grpo_advantages(r, 3, scale_rewards="batch"), [d / s for d in DEV])
    close(grpo_advantages(r, 3, scale_rewards="none"), DEV)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(r, 3, scale_rewards="max")


def test_grpo_unscorable_and_degenerate_groups():
    # [1, NaN, 3]: the NaN is left out (mean 2, sample std of [1, 3] = sqrt(2)) and gets advantage 0;
    # [5, 5, 5]: std 0, so (r - mean) / (0 + 1e-4) = 0.
    a = grpo_advantages(torch.tensor([1.0, NAN, 3.0, 5.0, 5.0, 5.0], dtype=F64), 3)
    s = math.sqrt(2) + 1e-4
    close(a, [-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0])
    # One completion per prompt: no spread, advantage 0 (TRL: std taken as 0).
    close(grpo_advantages(torch.tensor([1.0, 3.0], dtype=F64), 1), [0.0, 0.0])


def test_rloo_leave_one_out_baseline():
    a = rloo_advantages(torch.tensor(REWARDS, dtype=F64), num_generations=3)
    # Group 1 (sum 7): baselines (7-1)/2 = 3, (7-2)/2 = 2.5, (7-4)/2 = 1.5 -> A = [-2, -0.5, 2.5].
    # Group 2 (sum 3): baselines 1.5, 1.5, 0 -> A = [-1.5, -1.5, 3]. (= 3/2 * DEV: k / (k - 1) (r - mean).)
    close(a, [-2.0, -0.5, 2.5, -1.5, -1.5, 3.0])


def test_rloo_normalized_over_the_batch():
    a = rloo_advantages(torch.tensor(REWARDS, dtype=F64), 3, normalize=True)
    # A = [-2, -0.5, 2.5, -1.5, -1.5, 3]: mean 0 (a leave-one-out group always sums to 0), squares sum to
    # 4 + 0.25 + 6.25 + 2.25 + 2.25 + 9 = 24, sample variance 24 / 5 = 4.8.
    s = math.sqrt(4.8) + 1e-4
    close(a, [v / s for v in [-2.0, -0.5, 2.5, -1.5, -1.5, 3.0]])


def test_rloo_unscorable_and_single_completion():
    # [1, NaN, 3]: k = 2 scorable, sum 4: baselines 3 and 1 -> A = [-2, 0 (unscorable), 2].
    # [2, 2, 5]: sum 9: baselines 3.5, 3.5, 2 -> A = [-1.5, -1.5, 3].
    a = rloo_advantages(torch.tensor([1.0, NAN, 3.0, 2.0, 2.0, 5.0], dtype=F64), 3)
    close(a, [-2.0, 0.0, 2.0, -1.5, -1.5, 3.0])
    close(rloo_advantages(torch.tensor([1.0, 3.0], dtype=F64), 1), [0.0, 0.0])


# Two sequences, three completion positions; row 1 has two tokens (its kl 9.0 is padding and must not count).
SCORES = torch.tensor([1.0, 0.0], dtype=F64)
KL = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]], dtype=F64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)


def test_reinforce_plus_plus_reward_to_go_and_global_whitening():
    a, g = reinforce_plus_plus_advantages(SCORES, KL, MASK, beta=0.5, gamma=1.0)
    # r = -0.5 KL (+ score on the last token): row 0 [-0.05, -0.10, -0.15 + 1 = 0.85], row 1 [-0.20, -0.25, pad].
    # G (sum to the end of the row): row 0 [0.70, 0.75, 0.85], row 1 [-0.45, -0.25, 0].
    close(g, [[0.70, 0.75, 0.85], [-0.45, -0.25, 0.0]])
    # Over the 5 tokens: mean 1.60 / 5 = 0.32; deviations [0.38, 0.43, 0.53, -0.77, -0.57]; squares
    # 0.1444 + 0.1849 + 0.2809 + 0.5929 + 0.3249 = 1.528; sample variance 1.528 / 4 = 0.382.
    s = math.sqrt(0.382 + 1e-8)
    close(a, [[0.38 / s, 0.43 / s, 0.53 / s], [-0.77 / s, -0.57 / s, 0.0]])


def test_reinforce_plus_plus_discount_and_given_moments():
    a, g = reinforce_plus_plus_advantages(SCORES, KL, MASK, beta=0.5, gamma=0.5)
    # G_t = r_t + 0.5 G_{t+1}: row 0: 0.85, -0.10 + 0.425 = 0.325, -0.05 + 0.1625 = 0.1125;
    # row 1: -0.25, -0.20 - 0.125 = -0.325.
    close(g, [[0.1125, 0.325, 0.85], [-0.325, -0.25, 0.0]])
    # Moments given (e.g. all-reduced across ranks): A = (G - 0.1) / sqrt(4 + 1e-8) on the tokens, 0 on padding.
    moments = (torch.tensor(0.1, dtype=F64), torch.tensor(4.0, dtype=F64))
    a, _ = reinforce_plus_plus_advantages(SCORES, KL, MASK, beta=0.5, gamma=0.5, moments=moments)
    s = math.sqrt(4.0 + 1e-8)
    close(a, [[0.0125 / s, 0.225 / s, 0.75 / s], [-0.425 / s, -0.35 / s, 0.0]])


def test_registry():
    assert set(ADV_ESTIMATORS) >= {"grpo", "rloo", "reinforce_plus_plus", "gae"}
    assert advantage_estimator("gae") is ppo.gae  # the PPO module's GAE, registered, not a copy
    assert advantage_estimator("rloo") is rloo_advantages
    with pytest.raises(KeyError, match="expected one of grpo, rloo"):
        advantage_estimator("vtrace")
    with pytest.raises(ValueError, match="registered twice"):
        register_adv_est("grpo")(lambda r: r)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_estimator_is_what_trls_rollout_computes(tiny_random_model_dir, tmp_path, scale):  # noqa: F811
    """The registered `grpo` estimator against the advantages RLXGRPOTrainer's real rollout (TRL's code) hands
    the loss, on scripted rewards from two weighted reward functions with one unscorable completion."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from rlx.embedded import load_tokenizer
    from rlx.trainers.grpo import RLXGRPOTrainer
    from tests.test_rloo import R1, R2, scripted

    task = get_task(OmegaConf.structured(TaskConfig(num_train=16, num_eval=4)))
    r1, r2 = scripted(R1), scripted(R2)
    r1.__name__, r2.__name__ = "r1", "r2"
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=1,
        reward_weights=[1.0, 2.0], scale_rewards=scale,
    )  # fmt: skip
    trainer = RLXGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_random_model_dir),
        reward_funcs=[r1, r2],
        args=args,
        train_dataset=task.train_dataset(),
        processing_class=load_tokenizer(str(tiny_random_model_dir)),
    )
    rows = task.train_dataset()
    trainer.model.train()
    out = trainer._generate_and_score_completions([rows[p] for p in (0, 0, 0, 0, 1, 1, 1, 1)])
    rewards = torch.tensor(
        [a + 2 * b if a is not None else float("nan") for a, b in zip(R1, R2, strict=True)],
        dtype=torch.float64,
    )
    want = advantage_estimator("grpo")(rewards, 4, scale_rewards=scale)
    torch.testing.assert_close(out["advantages"].double(), want, rtol=1e-5, atol=1e-6)
    assert want.abs().sum() > 1  # not all zero: the comparison has content
