"""Rollout dumps: sample ids, the kept fraction, row values against hand-made batches, and a GRPO + ReLaX run
whose ReLaX trajectory rows join back to the dumped text by sample id."""

from __future__ import annotations

import glob
import math

import pandas as pd
import pytest
import torch

from tests.conftest import read_metrics


def test_sample_ids_are_unique_over_rounds_and_ranks():
    from rlx.instruments.rollouts import sample_ids

    ids = torch.cat([sample_ids(r, k, 6) for r in range(3) for k in range(2)])
    assert len(set(ids.tolist())) == 36
    assert sample_ids(2, 1, 6)[0].item() == (2 << 32) + 6  # round in the high bits, rank * n + i in the low


def test_kept_fraction_is_deterministic_and_close():
    from rlx.instruments.rollouts import kept, sample_ids

    ids = torch.cat([sample_ids(r, 0, 1000) for r in range(5)])
    k = kept(ids, 0.1, seed=3)
    assert torch.equal(k, kept(ids, 0.1, seed=3)) and abs(k.float().mean().item() - 0.1) < 0.02
    assert kept(ids, 1.0, seed=3).all()
    # the same completion is kept whatever rank holds it: the choice depends on the id only
    assert torch.equal(kept(ids[:500], 0.1, 3), k[:500])


class _Tok:
    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in s) for s in seqs]


def test_rollout_rows_against_a_hand_made_batch():
    from rlx.instruments.rollouts import rollout_rows

    batch = {
        "prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "completion_ids": torch.tensor([[1, 2, 0], [3, 0, 0]]),
        "completion_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
        "advantages": torch.tensor([[1.0, 3.0, 100.0], [-2.0, 50.0, 50.0]]),  # per token (PPO): masked mean
        "ref_per_token_logps": torch.tensor([[-1.0, -3.0, -9.0], [-0.5, -9.0, -9.0]]),
        "rlx_sample_ids": torch.tensor([10, 11]),
        "rlx_group_ids": torch.tensor([0, 0]),
    }
    rewards = torch.tensor([[1.0, 0.5], [float("nan"), float("nan")]])
    rows = rollout_rows(
        batch,
        _Tok(),
        rewards,
        ["a", "b"],
        torch.tensor([1.0, 2.0]),
        round_=4,
        step=9,
        rank=1,
        keep=torch.tensor([True, True]),
    )
    r0, r1 = rows
    assert (r0["prompt"], r0["completion"], r0["completion_length"]) == ("5 6", "1 2", 2)
    assert r0["advantage"] == 2.0 and r1["advantage"] == -2.0
    assert r0["ref_logp_mean"] == -2.0 and r0["old_logp_mean"] is None
    assert r0["reward"] == 2.0 and r0["reward/b"] == 0.5  # 1 * 1.0 + 2 * 0.5
    assert math.isnan(r1["reward"]) and (r1["sample_id"], r1["round"], r1["step"], r1["rank"]) == (
        11,
        4,
        9,
        1,
    )
    only = rollout_rows(
        batch, _Tok(), None, [], None, round_=0, step=1, rank=0, keep=torch.tensor([False, True])
    )
    assert [r["sample_id"] for r in only] == [11] and "reward" not in only[0]


@pytest.mark.slow
def test_grpo_rollouts_join_relax_and_alignment_rows(run_recipe):
    run = run_recipe(
        "grpo_relax_tiny",
        "trainer.max_steps=4",
        "trainer.per_device_train_batch_size=16",
        "trainer.steps_per_generation=2",
        "diagnostics.rollouts.fraction=1.0",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=2",
        "diagnostics.grad_alignment.target_size=16",
        "diagnostics.grad_alignment.save_token_weights=true",
        "eval.before_after=false",
    )
    files = sorted(glob.glob(str(run / "diagnostics" / "rollouts" / "*.parquet")))
    assert [f.split("/")[-1] for f in files] == ["round_000000.rank0.parquet", "round_000001.rank0.parquet"]
    roll = pd.concat(pd.read_parquet(f) for f in files)
    assert len(roll) == 2 * 32 and roll["sample_id"].is_unique
    assert sorted(roll["step"].unique()) == [1, 3]  # each round feeds steps_per_generation optimizer steps
    metrics = {r["step"]: r for r in read_metrics(run)}
    for step, g in roll.groupby("step"):  # TRL logs the round's mean reward at the round's steps
        assert g["reward/arithmetic_reward"].mean() == pytest.approx(
            metrics[step]["rewards/arithmetic_reward/mean"]
        )
    traj = pd.concat(
        pd.read_parquet(f) for f in glob.glob(str(run / "diagnostics" / "relax" / "trajectories*.parquet"))
    )
    joined = traj.merge(roll, on="sample_id", suffixes=("", "_rollout"), validate="many_to_one")
    assert len(joined) == len(traj) == 4 * 16  # every trajectory row finds its completion
    assert (joined["group_id"] == joined["group_id_rollout"]).all()
    assert joined["advantage"].to_numpy() == pytest.approx(joined["advantage_rollout"].to_numpy(), abs=1e-6)
    assert ((joined["step"] - joined["step_rollout"]).isin([0, 1])).all()
    # the alignment token shards: one sample id per row, each a completion of the dumped rollouts
    from safetensors.torch import load_file

    shards = sorted(glob.glob(str(run / "diagnostics" / "grad_alignment_tokens" / "*.safetensors")))
    assert shards
    for shard in shards:
        t = load_file(shard)
        assert t["sample_id"].shape[0] == t["w"].shape[0]
        assert set(t["sample_id"].tolist()) <= set(roll["sample_id"])


@pytest.mark.slow
def test_dpo_preference_pairs_are_dumped_with_their_verification(run_recipe):
    run = run_recipe(
        "dpo_tiny",
        "preference.num_pairs=24",
        "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=8",
        "eval.before_after=false",
    )
    pairs = pd.read_parquet(run / "diagnostics" / "rollouts" / "preference_pairs.parquet")
    assert set(pairs["split"]) == {"train", "eval"} and (pairs["split"] == "train").sum() <= 24
    for (
        _,
        r,
    ) in pairs.iterrows():  # arithmetic prompts "a+b=": check each side independently of rlx's verifier
        truth = str(eval(r["prompt"].rstrip("=")))  # noqa: S307 - generated digits and + / - only
        assert r["chosen"].strip() == truth, r.to_dict()
        assert r["rejected"].strip() != truth and r["chosen_source"] in ("policy", "reference")


def test_best_and_worst_groups_per_round():
    from analysis.measures.rollouts import best_worst_groups

    df = pd.DataFrame(
        {
            "round": [0] * 6 + [1] * 2,
            "step": [1] * 6 + [2] * 2,
            "group_id": [0, 0, 1, 1, 2, 2, 5, 5],
            "prompt": list("aabbccdd"),
            "completion": list("xyzwvuts"),
            "reward": [0.5, 0.5, 1.0, 0.0, 1.0, 1.0, 0.2, 0.4],
            "advantage": [0.0] * 8,
        }
    )
    out = best_worst_groups(df)
    r0 = out[out["round"] == 0]
    assert list(r0[r0.group == "best"].group_id) == [2, 2] and set(r0[r0.group == "worst"].group_id) == {
        0
    }  # ties: the first
    assert list(out[out["round"] == 1].group) == ["best", "best"]  # one group: shown once
    assert best_worst_groups(df, rounds=[1])["round"].unique().tolist() == [1]
