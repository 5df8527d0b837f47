"""REINFORCE++ (`algo: reinforce_pp`, rlx/trainers/reinforce_pp.py): the advantages the trainer puts into its
rollout against hand-computed values, and a 2-step run of the tiny recipe through rlx/train.py with gradient
alignment, ReLaX, rollout dumps and the eval loop on."""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict

import pytest
import torch

from tests.conftest import read_metrics

# One rollout of two completions, C = 3 positions, float64 log-probs. Row 0 has 3 tokens, row 1 has 2 (padded).
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.6, 0.0]], dtype=torch.float64)
# Two reward functions weighted 1 and 0.5: scores 1 (row 0) and 0.5 (row 1).
REWARDS_PER_FUNC = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([1.0, 0.5], dtype=torch.float64)
BETA = 0.1

# Reward-to-go G_t over each row's tokens, by hand (r_t = -beta KL_t + score at the last token):
#   k1 = old - ref: row 0 [0.5, -1, 0], row 1 [0, 0.2]
#     r: row 0 [-0.05, 0.1, 1.0]  -> gamma 1:   G = [1.05, 1.1, 1.0];  gamma 0.5: G = [0.25, 0.6, 1.0]
#        row 1 [0, -0.02 + 0.5]  -> gamma 1:   G = [0.48, 0.48];      gamma 0.5: G = [0.24, 0.48]
#   k2 = (ref - old)^2 / 2: row 0 [0.125, 0.5, 0], row 1 [0, 0.02]
#     r: row 0 [-0.0125, -0.05, 1.0] -> G = [0.9375, 0.95, 1.0];  row 1 [0, 0.498] -> G = [0.498, 0.498]
HAND_RETURNS = {
    ("k1", 1.0): [[1.05, 1.1, 1.0], [0.48, 0.48, 0.0]],
    ("k1", 0.5): [[0.25, 0.6, 1.0], [0.24, 0.48, 0.0]],
    ("k2", 1.0): [[0.9375, 0.95, 1.0], [0.498, 0.498, 0.0]],
}


def hand_whiten(returns: list[list[float]]) -> list[list[float]]:
    """(G - mean) / sqrt(sample var + 1e-8) over the five valid tokens of both rows; padding 0."""
    vals = [g for row, m in zip(returns, MASK.tolist()) for g, k in zip(row, m) if k]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return [
        [(g - mean) / math.sqrt(var + 1e-8) if k else 0.0 for g, k in zip(row, m)]
        for row, m in zip(returns, MASK.tolist())
    ]


class FakeAccelerator:
    """One rank of `world`: `reduce` adds the other ranks' stacked sums (given), `gather` concatenates theirs."""

    def __init__(self, rank=0, world=1, others_sums=None, others_gathered=None):
        self.process_index, self.num_processes = rank, world
        self.others_sums, self.others_gathered = others_sums, others_gathered

    def reduce(self, x, reduction="sum"):
        assert reduction == "sum"
        return x if self.others_sums is None else x + self.others_sums.to(x.dtype)

    def gather(self, x):
        return x if self.others_gathered is None else torch.cat([x, self.others_gathered.to(x.dtype)])


def rollout_of(monkeypatch, rows, kl_estimator="k1", gamma=1.0, with_old=True, accelerator=None):
    """Run `RLXReinforcePPTrainer._generate_and_score_completions` on the hand-built rows of the batch: GRPO's
    rollout (the parent method) is replaced by the hand-built output, the trainer's own code runs as in training."""
    from rlx.trainers.grpo import RLXGRPOTrainer
    from rlx.trainers.reinforce_pp import RLXReinforcePPTrainer

    idx = torch.tensor(rows)
    out = {
        "prompt_ids": torch.ones(len(rows), 2, dtype=torch.long),
        "prompt_mask": torch.ones(len(rows), 2, dtype=torch.long),
        "completion_ids": torch.full((len(rows), 3), 7, dtype=torch.long),
        "completion_mask": MASK[idx],
        "ref_per_token_logps": REF[idx],
        "advantages": torch.full((len(rows),), 99.0),  # GRPO's group advantages: must be replaced
    }
    if with_old:
        out["old_per_token_logps"] = OLD[idx]
    monkeypatch.setattr(RLXGRPOTrainer, "_generate_and_score_completions", lambda self, inputs: out)
    trainer = object.__new__(RLXReinforcePPTrainer)
    scored = []

    def score_old(model, input_ids, attention_mask, c, batch_size=None):
        scored.append((input_ids.shape, c))
        return OLD[idx], None, None

    trainer.__dict__.update(
        accelerator=accelerator or FakeAccelerator(),
        args=types.SimpleNamespace(kl_estimator=kl_estimator, gamma=gamma, per_device_train_batch_size=2),
        beta=BETA,
        model=types.SimpleNamespace(training=True),
        reward_weights=WEIGHTS,
        _rlx_rewards_per_func=REWARDS_PER_FUNC,  # gathered over ranks, as GRPO hands it over
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=score_old,
    )
    result = trainer._generate_and_score_completions({})
    return result, trainer, scored


@pytest.mark.parametrize("kl_estimator,gamma", list(HAND_RETURNS))
def test_advantages_are_whitened_kl_shaped_reward_to_go(monkeypatch, kl_estimator, gamma):
    """A_t = whiten(G_t) over every valid token of the batch, G_t the reward-to-go of r_t = -beta KL_t + score 1[t=T].
    The three hand cases tell apart: KL sign (+beta KL gives G row 0 = [0.95, 0.9, 1.0]), reward-to-go direction (a
    forward sum gives [-0.05, 0.05, 1.05]), per-row or biased whitening, and the k1/k2 estimators."""
    out, trainer, scored = rollout_of(monkeypatch, [0, 1], kl_estimator, gamma)
    expected = torch.tensor(hand_whiten(HAND_RETURNS[(kl_estimator, gamma)]), dtype=torch.float64)
    assert out["advantages"].shape == (2, 3)
    torch.testing.assert_close(out["advantages"].double(), expected, rtol=0, atol=1e-12)
    assert torch.equal(out["old_per_token_logps"], OLD)
    assert not scored  # GRPO's old log-probs were used
    returns = torch.tensor(HAND_RETURNS[(kl_estimator, gamma)], dtype=torch.float64)
    valid = returns[MASK.bool()]
    m = trainer._metrics["train"]
    assert m["returns/mean"] == [pytest.approx(valid.mean().item(), abs=1e-12)]
    assert m["returns/std"] == [pytest.approx(valid.std().item(), abs=1e-12)]


def test_whitening_by_hand_numbers():
    """The helper itself on k1, gamma 1: mean 0.822, sample variance 0.39488 / 4 = 0.09872."""
    a = hand_whiten(HAND_RETURNS[("k1", 1.0)])
    s = math.sqrt(0.09872 + 1e-8)
    assert a[0] == pytest.approx([0.228 / s, 0.278 / s, 0.178 / s], abs=1e-12)
    assert a[1] == pytest.approx([-0.342 / s, -0.342 / s, 0.0], abs=1e-12)


def test_old_logps_are_scored_when_grpo_skipped_them(monkeypatch):
    """A rollout used once has no old log-probs from GRPO: the trainer scores them (the KL needs log pi_old) and
    hands them to the loss."""
    out, _, scored = rollout_of(monkeypatch, [0, 1], with_old=False)
    assert scored == [(torch.Size([2, 5]), 3)]
    assert torch.equal(out["old_per_token_logps"], OLD)
    expected = torch.tensor(hand_whiten(HAND_RETURNS[("k1", 1.0)]), dtype=torch.float64)
    torch.testing.assert_close(out["advantages"].double(), expected, rtol=0, atol=1e-12)


def test_two_ranks_whiten_over_the_global_batch(monkeypatch):
    """Rank 1 of 2 holds row 1 only (rank 0 holds row 0): its score is its own slice of the gathered rewards, and
    its advantages are whitened with the moments of both ranks' tokens, as on one process."""
    g0 = torch.tensor(HAND_RETURNS[("k1", 1.0)][0], dtype=torch.float64)
    rank0 = torch.stack([g0.sum(), (g0 * g0).sum(), torch.tensor(3.0, dtype=torch.float64)])
    acc = FakeAccelerator(rank=1, world=2, others_sums=rank0, others_gathered=torch.tensor([0.5 - 1.0 + 0.0]))
    out, trainer, _ = rollout_of(monkeypatch, [1], accelerator=acc)
    expected = torch.tensor(hand_whiten(HAND_RETURNS[("k1", 1.0)])[1:], dtype=torch.float64)
    torch.testing.assert_close(out["advantages"].double(), expected, rtol=0, atol=1e-12)
    # mean per-sequence KL over both ranks: rank 0's -0.5 and this rank's 0.2
    assert trainer._metrics["train"]["kl"] == [pytest.approx((-0.5 + 0.2) / 2, abs=1e-12)]


def test_config_validates_the_reward_shaping():
    from rlx.trainers.reinforce_pp import ReinforcePPConfig

    base = {"output_dir": "/tmp/unused", "use_cpu": True, "report_to": []}
    assert ReinforcePPConfig(**base).kl_estimator == "k1"
    with pytest.raises(ValueError, match="kl_estimator"):
        ReinforcePPConfig(**base, kl_estimator="k4")
    with pytest.raises(ValueError, match="gamma"):
        ReinforcePPConfig(**base, gamma=1.5)


@pytest.mark.slow
def test_reinforce_pp_tiny_with_alignment_relax_rollouts_and_eval(run_recipe):
    """Two steps of the tiny recipe through rlx/train.py with gradient alignment, ReLaX, every rollout dumped and
    in-training evaluation: each writes its rows, and alignment's token-level split holds on REINFORCE++'s (B, C)
    advantages (no KL component: the KL is in the reward)."""
    from analysis.loader import Run
    from rlx import dumps
    from rlx.storage import read_table

    run_dir = run_recipe(
        "reinforce_pp_tiny",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=32",
        "trainer.warmup_steps=0",
        "trainer.report_to=[]",
        "eval.before_after=false",
        "eval.every=2",
        "eval.num_prompts=8",
        "eval.num_samples=2",
        "eval.ks=[1,2]",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=1",
        "diagnostics.rollouts.fraction=1",
        "regularizers=[relax]",
        "regularizers.relax.xi=1e-6",
    )
    metrics = read_metrics(run_dir)
    rows = {r["step"]: r for r in metrics if "loss" in r}
    for s in (1, 2):
        r = rows[s]
        for k in (
            "grad_align/G_total",
            "relax/dsd_mean",
            "relax/masked_frac",
            "relax/loss",
            "entropy_cov/cov",
            "kl",
            "returns/std",
        ):
            assert math.isfinite(r[k]), (s, k, r)
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert sorted(r["step"] for r in metrics if "eval/greedy_accuracy" in r) == [0, 2]

    df = read_table(run_dir, "grad_alignment")
    assert sorted(df.step.unique()) == [1, 2]
    assert "kl" not in set(df.component)
    for s in (1, 2):
        g = {
            c: float(df[(df.step == s) & (df.component == c)].G.iloc[0])
            for c in ("total", "pos", "neg", "top", "mid", "bot")
        }
        assert g["pos"] + g["neg"] == pytest.approx(g["total"], rel=1e-4)
        assert g["top"] + g["mid"] + g["bot"] == pytest.approx(g["total"], rel=1e-4)

    rollouts = Run(run_dir).read(dumps.ROLLOUTS)
    assert len(rollouts) == 2 * 32 and rollouts.advantage.map(math.isfinite).all()
    assert (rollouts.advantage > 0).any() and (rollouts.advantage < 0).any()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["algo"] == "reinforce_pp" and info["global_step"] == 2
