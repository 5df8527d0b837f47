"""RLOO (`algo: rloo`, rlx/trainers/rloo.py): the advantage the trainer hands its loss against hand-computed
leave-one-out values, and a short `recipe=rloo_tiny` run through rlx/train.py with gradient alignment and ReLaX."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from rlx.config.schema import TaskConfig
from rlx.errors import UserError
from tests.conftest import read_metrics
from tests.test_ppo_trainer import tiny_random_model_dir  # noqa: F401  (fixture)

NAN = float("nan")
# Two prompts x 4 completions; two reward functions, weights 1 and 2; completion 5 is unscorable (both None).
R1 = [3.0, 1.0, 0.0, 0.0, 1.0, None, 0.0, 0.0]
R2 = [0.0, 1.0, 0.0, 0.0, 0.0, None, 0.0, 1.0]
# r = R1 + 2 R2 = [3, 3, 0, 0 | 1, -, 0, 2]. Group 1 (k = 4, sum 6): b = (6 - r_i) / 3 = [1, 1, 2, 2].
# Group 2 (k = 3 scorable, sum 3): b = (3 - r_i) / 2 = [1, -, 1.5, 0.5]; the unscorable completion gets 0.
HAND = [2.0, 2.0, -2.0, -2.0, 0.0, 0.0, -1.5, 1.5]
# scale_rewards=batch (TRL's normalize_advantages): over the 7 scorable advantages, mean 0, sample variance
# (4 * 4 + 0 + 2.25 + 2.25) / 6.
HAND_STD = math.sqrt(20.5 / 6)


def scripted(values):
    def reward(prompts, completions, **kw):
        assert len(completions) == len(values)
        return list(values)

    return reward


def rloo_trainer(model_dir, out, **over):
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from rlx.embedded import load_tokenizer
    from rlx.tasks import get_task
    from rlx.trainers.rloo import RLXRLOOTrainer

    task = get_task(OmegaConf.structured(TaskConfig(num_train=16, num_eval=4)))
    r1, r2 = scripted(R1), scripted(R2)
    r1.__name__, r2.__name__ = "r1", "r2"
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=1,
        reward_weights=[1.0, 2.0], **{"scale_rewards": "none", "loss_type": "dr_grpo", **over},
    )  # fmt: skip
    return RLXRLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[r1, r2],
        args=args,
        train_dataset=task.train_dataset(),
        processing_class=load_tokenizer(str(model_dir)),
    ), task


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_trainer_advantages_are_hand_leave_one_out(tiny_random_model_dir, tmp_path, scale):  # noqa: F811
    """TRL's rollout on two prompts, with scripted rewards: the advantages the loss will read are the hand values."""
    trainer, task = rloo_trainer(tiny_random_model_dir, tmp_path, scale_rewards=scale)
    rows = task.train_dataset()
    inputs = [rows[p] for p in (0, 0, 0, 0, 1, 1, 1, 1)]  # TRL's layout: num_generations per prompt in a row
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    want = torch.tensor(HAND, dtype=torch.float64)
    if scale == "batch":
        want = want / (HAND_STD + 1e-4)
        want[5] = 0.0
    assert out["advantages"].shape == (8,)
    torch.testing.assert_close(out["advantages"].double(), want, rtol=1e-6, atol=1e-6)
    assert list(trainer._logs["advantages"])[-8:] == pytest.approx(want.tolist(), abs=1e-6)
    assert trainer._metrics["train"]["rloo/advantage_abs_mean"][-1] == pytest.approx(want.abs().mean().item())


def test_group_scaling_is_refused(tiny_random_model_dir, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="scale_rewards='group' with algo=rloo"):
        rloo_trainer(tiny_random_model_dir, tmp_path, scale_rewards="group")


def test_rloo_defaults_reach_the_trainer_config(tmp_path):
    from types import SimpleNamespace

    from rlx.config.loader import load_config
    from rlx.tasks import get_task
    from rlx.trainers.construction import make_trainer_config

    cfg = load_config(["algo=rloo", "recipe=grpo_tiny", "trainer.loss_type=grpo"])
    args = make_trainer_config(cfg, SimpleNamespace(run_dir=tmp_path), get_task(cfg.task))
    assert (args.scale_rewards, args.loss_type) == ("none", "grpo")  # the spec's default; the recipe's wins
    cfg = load_config(["recipe=rloo_tiny"])
    args = make_trainer_config(cfg, SimpleNamespace(run_dir=tmp_path), get_task(cfg.task))
    assert (cfg.algo, args.scale_rewards, args.loss_type, args.max_steps) == ("rloo", "none", "dr_grpo", 400)


@pytest.mark.slow
def test_rloo_tiny_runs_with_alignment_and_relax(run_recipe):
    """Two steps of rloo_tiny with gradient alignment and ReLaX on: their rows and metrics are written, and the
    dumped rollouts carry the leave-one-out advantages of their rewards."""
    from analysis.loader import Run
    from rlx import dumps

    run_dir = run_recipe(
        "rloo_tiny",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=32",
        "trainer.report_to=[]",
        "eval.before_after=false",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=1",
        "diagnostics.grad_alignment.target_size=16",
        "regularizers=[relax]",
        "regularizers.relax.xi=1e-6",
        "diagnostics.rollouts.fraction=1.0",
    )
    assert json.loads((run_dir / "run_info.json").read_text())["algo"] == "rloo"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in (
            "grad_align/G_total",
            "relax/dsd_mean",
            "relax/loss",
            "entropy_cov/cov",
            "rloo/advantage_abs_mean",
        ):
            assert math.isfinite(r[k]), (k, r)
    run = Run(run_dir)
    align = run.read(dumps.GRAD_ALIGNMENT)
    assert sorted(align.step.unique()) == [1, 2] and "total" in set(align.component)
    assert len(run.read(dumps.RELAX_TRAJECTORIES)) > 0
    roll = run.read(dumps.ROLLOUTS)
    assert len(roll) == 2 * 32
    for _, g in roll.groupby(["round", "group_id"]):
        r = g.reward.to_numpy()
        loo = r - (r.sum() - r) / (len(r) - 1)
        assert g.advantage.to_numpy() == pytest.approx(loo, abs=1e-5)
