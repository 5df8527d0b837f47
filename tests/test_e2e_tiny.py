"""End-to-end runs of the embedded recipes for a few steps, asserting on what they log and write."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import read_metrics

FAST = ["eval.num_prompts=32", "trainer.report_to=[tensorboard]"]


@pytest.mark.slow
def test_grpo_tiny_runs_and_logs(run_recipe):
    run = run_recipe("grpo_tiny", *FAST, "trainer.max_steps=3", "trainer.per_device_train_batch_size=16")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per step: HF's closing summary goes to run_info
    for r in rows:
        if "reward" in r:
            assert 0.0 <= r["reward"] <= 1.0 and math.isfinite(r["entropy"]) and r["entropy"] > 0
            assert math.isfinite(r["entropy_cov/cov"])  # the always-on GRPO covariance diagnostic
    ba = json.loads((run / "eval_before_after.json").read_text())
    assert ba["before"]["num_prompts"] == 32 and 0 <= ba["after"]["greedy_accuracy"] <= 1
    assert (run / "final" / "model.safetensors").exists() and (run / "config.yaml").exists()
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    info = json.loads((run / "run_info.json").read_text())
    assert info["global_step"] == 3 and info["algo"] == "grpo"
    assert info["train_summary"]["step"] == 3 and info["train_summary"]["train_runtime"] > 0


@pytest.mark.slow
def test_dpo_tiny_learns_preferences(run_recipe):
    run = run_recipe("dpo_tiny", *FAST)  # the full recipe: 60 steps over 256 policy-sampled pairs
    rows = [r for r in read_metrics(run) if "rewards/accuracies" in r]
    assert len(rows) == 60
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1
    late = rows[-10:]
    assert sum(r["rewards/accuracies"] for r in late) / len(late) > 0.6
    assert sum(r["rewards/margins"] for r in late) / len(late) > 0.05
    assert late[-1]["logps/chosen"] > late[-1]["logps/rejected"]


@pytest.mark.slow
def test_sft_tiny_lowers_loss(run_recipe):
    run = run_recipe("sft_tiny", *FAST, "trainer.max_steps=12")
    rows = [r for r in read_metrics(run) if "loss" in r and "train_runtime" not in r]
    assert len(rows) == 12
    assert all(0.0 <= r["mean_token_accuracy"] <= 1.0 and math.isfinite(r["loss"]) for r in rows)
    assert sum(r["loss"] for r in rows[-4:]) / 4 < sum(r["loss"] for r in rows[:4]) / 4


@pytest.mark.slow
def test_dpo_lora_without_reference_model_runs_alignment(run_recipe):
    """DPO with LoRA has no reference model: TRL computes the reference log-probs through the policy itself
    (adapters off, no grad) inside the loss. The seam keeps the policy's forward only, so gradient alignment sees
    one row per sequence and its total equals the trainer's own gradient norm."""
    run = run_recipe(
        "dpo_tiny_align", *FAST, "model.lora.enabled=true", "trainer.max_steps=2", "eval.before_after=false"
    )
    rows = [r for r in read_metrics(run) if "grad_align/norm_total" in r]
    assert rows, "alignment logged nothing"
    for r in rows:
        assert r["grad_align/norm_total"] == pytest.approx(r["grad_norm"], rel=1e-3)
