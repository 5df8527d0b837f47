"""Evaluation during training (eval.every): schedule, pass@k against hand counts, saved samples, no effect on
training, exact across a kill and resume, and the same numbers on 2 DDP processes as on 1."""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

EVAL = ["eval.every=2", "eval.num_prompts=10", "eval.num_samples=4", "eval.ks=[1,2,4]", "eval.batch_size=4"]
SHORT = [
    "recipe=grpo_tiny",
    "trainer.max_steps=5",
    "trainer.per_device_train_batch_size=16",
    "eval.before_after=false",
    "trainer.report_to=[]",
]


def merged_rows(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], {}).update(r)
    return out


def hand_pass_at_k(correct: list[bool], k: int) -> float:
    n, c = len(correct), sum(correct)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_table_against_hand_counts():
    from rlx.eval_loop import pass_at_k_table, summarize

    # prompt 0: 1 of 4 correct, prompt 1: 0 of 4, prompt 2: 4 of 4
    pattern = {0: [1, 0, 0, 0], 1: [0, 0, 0, 0], 2: [1, 1, 1, 1]}
    rows = [
        {"prompt_index": i, "kind": "sample", "sample": j, "correct": bool(c), "reward": float(c)}
        for i, cs in pattern.items()
        for j, c in enumerate(cs)
    ]
    rows += [
        {"prompt_index": i, "kind": "greedy", "sample": 0, "correct": i != 1, "reward": 0.5} for i in pattern
    ]
    table = pass_at_k_table(rows, [1, 2, 4, 8])
    assert set(table) == {"pass@1", "pass@2", "pass@4"}  # k > samples per prompt is not estimable
    assert table["pass@1"] == pytest.approx((1 / 4 + 0 + 1) / 3)
    assert table["pass@2"] == pytest.approx((1 - 3 / 6 + 0 + 1) / 3)  # C(3,2)/C(4,2) = 3/6 misses
    assert table["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    s = summarize(rows, [1, 2, 4])
    assert s["greedy_accuracy"] == pytest.approx(2 / 3) and s["greedy_mean_reward"] == 0.5
    assert s["sample_mean_reward"] == pytest.approx(5 / 12)


def test_crossing_of_base_and_policy_curves():
    from analysis.diagnostics.passk import crossing

    rows = []
    for k, base, policy in [(1, 0.2, 0.5), (2, 0.4, 0.6), (4, 0.7, 0.65), (8, 0.9, 0.7)]:
        rows += [{"step": 0, "k": k, "pass_at_k": base}, {"step": 50, "k": k, "pass_at_k": policy}]
    c = crossing(pd.DataFrame(rows))
    assert c["crossing_k"] == 4 and c["policy_wins_at_1"] and c["base_pass@8"] == 0.9 and c["n"] == 8
    assert crossing(pd.DataFrame(rows), base_step=50, policy_step=0)["crossing_k"] is None  # never led at k=1
    ahead = [dict(r, pass_at_k=r["pass_at_k"] + (0.5 if r["step"] == 50 else 0)) for r in rows]
    assert crossing(pd.DataFrame(ahead))["crossing_k"] is None  # the policy leads at every k


@pytest.mark.slow
def test_grpo_eval_every_logs_saves_and_leaves_training_alone(run_recipe):
    with_eval = run_recipe("grpo_tiny", *SHORT[1:], *EVAL)
    without = run_recipe("grpo_tiny", *SHORT[1:])
    rows = merged_rows(with_eval)
    evaluated = sorted(s for s, r in rows.items() if "eval/greedy_accuracy" in r)
    assert evaluated == [0, 2, 4, 5]  # step 0, every 2, and the last step
    for step in evaluated:
        table = pd.read_parquet(with_eval / "diagnostics" / "eval" / f"step_{step:06d}.parquet")
        assert len(table) == 10 + 10 * 4 and set(table["step"]) == {step}
        assert sorted(table[table.kind == "greedy"].prompt_index) == list(range(10))
        samples = table[table.kind == "sample"]
        for k in (1, 2, 4):  # independent of rlx's estimator: math.comb on the saved samples
            hand = sum(hand_pass_at_k(list(g.correct), k) for _, g in samples.groupby("prompt_index")) / 10
            assert rows[step][f"eval/pass@{k}"] == pytest.approx(hand, abs=1e-12)
        greedy = table[table.kind == "greedy"]
        assert rows[step]["eval/greedy_accuracy"] == pytest.approx(greedy.correct.mean())
    # the analysis side: pass@k for every k, against math.comb on the saved samples; the passk command
    from analysis.__main__ import main as analysis_main
    from analysis.diagnostics.passk import passk_curves
    from analysis.loader import Run

    curves = passk_curves(Run(with_eval))
    assert sorted(curves["step"].unique()) == evaluated and sorted(curves["k"].unique()) == [1, 2, 3, 4]
    last = pd.read_parquet(with_eval / "diagnostics" / "eval" / "step_000005.parquet")
    last = last[last.kind == "sample"]
    for k in (1, 2, 3, 4):
        hand = sum(hand_pass_at_k(list(g.correct), k) for _, g in last.groupby("prompt_index")) / 10
        got = curves[(curves.step == 5) & (curves.k == k)]["pass_at_k"].item()
        assert got == pytest.approx(hand, abs=1e-12)
    assert analysis_main(["passk", str(with_eval)]) == 0 and (with_eval / "passk.png").stat().st_size > 0
    # the evaluation draws from a forked RNG and does not touch the trainer's buffers: training is identical
    plain = merged_rows(without)
    for step in range(1, 6):
        for key, value in plain[step].items():
            if (
                isinstance(value, float)
                and "time" not in key
                and "runtime" not in key
                and "per_second" not in key
            ):
                assert rows[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


@pytest.mark.slow
def test_dpo_eval_every(run_recipe):
    run = run_recipe(
        "dpo_tiny",
        "preference.num_pairs=32",
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=16",
        "eval.before_after=false",
        "eval.every=3",
        "eval.num_prompts=6",
        "eval.num_samples=2",
        "eval.ks=[1,2]",
    )
    rows = merged_rows(run)
    assert sorted(s for s, r in rows.items() if "eval/pass@2" in r) == [0, 3]
    assert "rewards/margins" in rows[3]  # the train row of the same step is kept beside it


@pytest.mark.slow
def test_eval_is_exact_across_kill_and_resume(tmp_path, tiny_model_dir):
    from tests.test_resume import killed_and_resumed, train

    args = [*SHORT, *EVAL, "trainer.save_steps=2"]
    straight = tmp_path / "straight"
    assert train(straight, args).returncode == 0
    run = killed_and_resumed(tmp_path, args, ["after_log:3"])
    a, b = merged_rows(straight), merged_rows(run)
    assert sorted(a) == sorted(b)
    for step in a:
        for key in (k for k in a[step] if k.startswith("eval/")):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-12), (step, key)


def _launcher() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = str(REPO / "accelerate_configs" / "cpu_ddp.yaml")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--main_process_port",
        str(port),
    ]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_give_the_one_process_numbers(tmp_path, tiny_model_dir):
    """learning_rate=0 keeps the policy fixed, so every evaluation must match across world sizes exactly."""
    from tests.test_resume import train

    args = [
        *SHORT,
        *EVAL,
        "trainer.learning_rate=0",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=8",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(one, args).returncode == 0
    p = train(two, args, launcher=_launcher())
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2
    a, b = merged_rows(one), merged_rows(two)
    evaluated = [s for s in a if "eval/greedy_accuracy" in a[s]]
    assert evaluated == [0, 2]
    for step in evaluated:
        for key in (k for k in a[step] if k.startswith("eval/")):
            assert b[step][key] == a[step][key], (step, key)
        ta = pd.read_parquet(one / "diagnostics" / "eval" / f"step_{step:06d}.parquet")
        tb = pd.read_parquet(two / "diagnostics" / "eval" / f"step_{step:06d}.parquet")
        pd.testing.assert_frame_equal(ta, tb)


def test_relax_harness_preset_and_overrides(tmp_path):
    from rlx.errors import UserError
    from rlx.evaluate import resolve

    cfg, _, _ = resolve(["harness=relax", "eval.num_samples=64", f"output={tmp_path}"])
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.num_samples) == (0.6, 0.95, 64)
    assert list(cfg.eval.ks) == [1, 2, 4, 8, 16, 32, 64]
    cfg, _, _ = resolve(["harness=relax", "eval.top_p=1.0", f"output={tmp_path}"])  # explicit keys win
    assert cfg.eval.top_p == 1.0 and cfg.eval.num_samples == 1024 and list(cfg.eval.ks)[-1] == 1024
    with pytest.raises(UserError, match="harness=verl"):
        resolve(["harness=verl", f"output={tmp_path}"])
