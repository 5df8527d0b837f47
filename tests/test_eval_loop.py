"""Evaluation during training (eval.every): schedule, pass@k against hand counts, saved samples, no effect on
training, exact across a kill and resume, and the same numbers on 2 DDP processes as on 1; with eval.replay, the
Activation Replay rows equal the offline replay path's on the same checkpoint and seeds; the cost metrics."""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest

from rlx.eval_loop import is_cost_metric
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
    from analysis.measures.passk import crossing

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
    from analysis.loader import Run
    from analysis.measures.passk import passk_curves

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
        for key in (k for k in a[step] if k.startswith("eval/") and not is_cost_metric(k)):
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
        # a replay pass too: learnable replay in code alignment changes even the step-0 policy (RL layer-l input
        # vs base layer-l output), and its statistics are summed over the ranks
        "eval.replay=learnable",
        "replay.steps=2",
        "replay.lr=0.001",
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
        keys = [k for k in a[step] if k.startswith(("eval/", "eval_replay/")) and not is_cost_metric(k)]
        assert "eval_replay/pass@4" in keys and "eval_replay/prompts" in keys
        for key in keys:
            if "/loss_" in key:
                # replay's optimisation loss is a float sum over each rank's packed prompts: the packing (and so
                # the summation order) depends on which prompts a rank holds, so it agrees to round-off only
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key)
            else:
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


# ---- eval.replay: Activation Replay inside the in-training evaluation ----------------------------------------

REPLAY_RUN = [
    "trainer.max_steps=1",
    "trainer.per_device_train_batch_size=32",  # 4 groups of 8: some with mixed rewards, so the step moves
    "trainer.warmup_steps=0",
    "trainer.learning_rate=3e-3",  # one large step: the policy drifts from its base, so replay has work to do
    "eval.before_after=false",
    "trainer.report_to=[]",
    "eval.every=1",
    "eval.num_prompts=4",
    "eval.num_samples=3",
    "eval.ks=[1,3]",
    "eval.batch_size=2",
    "eval.max_new_tokens=8",
    "eval.replay=direct",
]


def _pass(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    return table[table.replay == mode].sort_values(["prompt_index", "kind", "sample"]).reset_index(drop=True)


@pytest.mark.slow
def test_eval_replay_rows_metrics_cost_and_the_offline_replay_path(run_recipe, tmp_path):
    """eval.replay=direct on grpo_tiny for one step: eval_replay/* logged at steps 0 and 1, the replay rows in
    the step parquets, the step-0 replay a no-op (the base is the step-0 policy), and the step-1 replay rows the
    completions `make_generate_fn` / rlx/evaluate.py give for the saved final model with the same seeds."""
    from rlx.config.loader import load_config
    from rlx.eval_loop import _sample_seed, summarize
    from rlx.evaluate import main as evaluate_main
    from rlx.generation import generate_texts
    from rlx.models import load_causal_lm, load_tokenizer_for
    from rlx.replay import make_generate_fn
    from rlx.tasks import get_task

    run = run_recipe("grpo_tiny", *REPLAY_RUN)
    rows = merged_rows(run)
    evaluated = sorted(s for s, r in rows.items() if "eval_replay/greedy_accuracy" in r)
    assert evaluated == [0, 1]
    tables = {s: pd.read_parquet(run / "diagnostics" / "eval" / f"step_{s:06d}.parquet") for s in evaluated}
    for step, table in tables.items():
        assert len(table) == 2 * (4 + 4 * 3) and set(table.replay) == {"off", "direct"}
        plain, replayed = _pass(table, "off"), _pass(table, "direct")
        assert (
            (plain[["prompt_index", "kind", "sample"]] == replayed[["prompt_index", "kind", "sample"]])
            .all()
            .all()
        )
        r = rows[step]
        for prefix, part in (("eval", plain), ("eval_replay", replayed)):
            ours = summarize(part.to_dict("records"), [1, 3])
            assert set(ours) == {
                "greedy_accuracy",
                "greedy_mean_reward",
                "pass@1",
                "pass@3",
                "sample_mean_reward",
            }
            samples = part[part.kind == "sample"]
            for k in (1, 3):  # against math.comb on the saved samples
                hand = sum(hand_pass_at_k(list(g.correct), k) for _, g in samples.groupby("prompt_index")) / 4
                assert r[f"{prefix}/pass@{k}"] == pytest.approx(hand, abs=1e-12)
            for key, value in ours.items():
                assert r[f"{prefix}/{key}"] == pytest.approx(value, abs=1e-12), (step, prefix, key)
        for key in ("greedy_accuracy", "pass@1", "pass@3", "sample_mean_reward"):
            assert r[f"eval_replay/gain_{key}"] == pytest.approx(r[f"eval_replay/{key}"] - r[f"eval/{key}"])
        # 4 prompts prepared for greedy (2 batches) and 4 for samples (1 call each): every prefill injected
        assert r["eval_replay/prompts"] == 8 and r["eval_replay/prefills_injected"] == 6
        assert "eval_replay/loss_first" not in r  # learnable only
        assert 0 < r["eval_replay/seconds"] < r["eval/seconds"] and r["eval/cpu_seconds"] > 0
    # step 0: the policy is the base, so direct replay (base entropy strictly below the policy's) replaces nothing
    assert rows[0]["eval_replay/selected_fraction"] == 0
    assert list(_pass(tables[0], "direct").completion) == list(_pass(tables[0], "off").completion)
    # step 1: replay replaced positions and changed completions (so the comparison below can tell)
    assert rows[1]["eval_replay/selected_fraction"] > 0
    plain1, replay1 = _pass(tables[1], "off"), _pass(tables[1], "direct")
    assert list(replay1.completion) != list(plain1.completion)

    # the offline replay path on the saved final model (the step-1 policy), base = its default (the warm start)
    cfg = load_config([f"recipe={run / 'config.yaml'}", "replay.mode=direct"])
    final = str(run / "final")
    tok, model = load_tokenizer_for(final), load_causal_lm(final, cfg)
    fn = make_generate_fn(model, tok, cfg)
    info = json.loads((run / "run_info.json").read_text())
    assert fn.base_model == info["base_model"] == info["eval_cost"]["replay_base_model"]
    prompts = list(get_task(cfg.task).eval_dataset()["prompt"])[:4]
    greedy = generate_texts(model, tok, prompts, max_new_tokens=8, batch_size=2, generate_fn=fn)
    assert [g[0] for g in greedy] == list(replay1[replay1.kind == "greedy"].completion)
    for i, prompt in enumerate(prompts):
        texts = generate_texts(
            model,
            tok,
            [prompt],
            max_new_tokens=8,
            num_samples=3,
            do_sample=True,
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            batch_size=1,
            seed=_sample_seed(cfg.seed, 1, i),
            generate_fn=fn,
        )[0]
        got = replay1[(replay1.kind == "sample") & (replay1.prompt_index == i)].completion
        assert texts == list(got), i
    # and rlx/evaluate.py itself (greedy: its batches are the in-training ones on one process)
    evaluate_main([f"run_dir={run}", f"output={tmp_path}", "replay=direct", "eval.num_samples=0"])
    offline = [
        json.loads(line) for line in (tmp_path / "samples.replay-direct.jsonl").read_text().splitlines()
    ]
    assert [s["greedy"] for s in offline] == list(replay1[replay1.kind == "greedy"].completion)
    summary = json.loads((tmp_path / "eval.replay-direct.json").read_text())
    assert summary["greedy_accuracy"] == rows[1]["eval_replay/greedy_accuracy"]

    # the cost: run_info.json's totals are the logged per-evaluation numbers, summed
    cost = info["eval_cost"]
    assert cost["replay"] == "direct" and cost["evaluations"] == 2
    for key, metric in [
        ("seconds", "eval/seconds"),
        ("cpu_seconds", "eval/cpu_seconds"),
        ("replay_seconds", "eval_replay/seconds"),
        ("replay_cpu_seconds", "eval_replay/cpu_seconds"),
    ]:
        assert cost[key] == pytest.approx(sum(rows[s][metric] for s in evaluated), rel=1e-9), key
    assert 0 < cost["fraction"] <= 1 and cost["seconds"] <= cost["loop_seconds"]

    # the analysis side: plain curves from the plain rows only, replay curves beside them, the passk command
    from analysis.__main__ import main as analysis_main
    from analysis.loader import Run
    from analysis.measures.passk import eval_over_steps, passk_curves, replay_curves, replay_gain

    loaded = Run(run)
    plain_curves, replayed = passk_curves(loaded), replay_curves(loaded)
    assert set(replayed.replay) == {"direct"} and len(plain_curves) == len(replayed) == 2 * 3
    for curves, part in ((plain_curves, plain1), (replayed, replay1)):
        samples = part[part.kind == "sample"]
        for k in (1, 2, 3):
            hand = sum(hand_pass_at_k(list(g.correct), k) for _, g in samples.groupby("prompt_index")) / 4
            got = curves[(curves.step == 1) & (curves.k == k)]["pass_at_k"].item()
            assert got == pytest.approx(hand, abs=1e-12)
    gain = replay_gain(plain_curves, replayed)
    assert (gain["gain"] == gain["with_replay"] - gain["plain"]).all() and len(gain) == 6
    assert "eval_replay/gain_pass@1" in set(eval_over_steps(loaded).metric)
    assert analysis_main(["passk", str(run)]) == 0 and (run / "passk.png").stat().st_size > 0


def test_eval_replay_config_is_checked_before_the_run(monkeypatch):
    from rlx.config.loader import load_config
    from rlx.errors import UserError
    from rlx.run import check_trainer_numbers

    def check(*args):
        check_trainer_numbers(load_config(["recipe=grpo_tiny", *args]))

    check("eval.replay=off")  # YAML reads off as a boolean: still off
    check("eval.replay=direct", "eval.every=5")
    with pytest.raises(UserError, match="set eval.every=N as well"):
        check("eval.replay=learnable")
    with pytest.raises(UserError, match="expected one of off, learnable, direct"):
        check("eval.replay=replay", "eval.every=5")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="does not run under FSDP"):
        check("eval.replay=direct", "eval.every=5")
    check("eval.every=5")  # the plain evaluation runs under FSDP (in lockstep)


def test_eval_replay_base_is_the_run_start_unless_set():
    from rlx.config.loader import load_config
    from rlx.eval_loop import replay_base_path, replay_mode

    cfg = load_config(["recipe=grpo_tiny", "model.name_or_path=/models/sft", "eval.replay=off"])
    assert replay_mode(cfg) == "off" and replay_base_path(cfg, "/models/sft") == "/models/sft"
    cfg = load_config(
        ["recipe=grpo_tiny", "model.name_or_path=RUN/checkpoint-100", "replay.base_model=/base"]
    )
    assert replay_base_path(cfg, "RUN/checkpoint-100") == "/base"


def test_cost_metrics_and_replay_stats_over_ranks():
    from rlx.replay import ReplayStats

    assert is_cost_metric("eval/seconds") and is_cost_metric("eval_replay/cpu_seconds")
    assert not is_cost_metric("eval/pass@1") and not is_cost_metric("train/seconds")
    a, b = (
        ReplayStats(prompts=3, selected=0.6, injections=[4, 0]),
        ReplayStats(prompts=1, selected=0.2, injections=[4]),
    )
    a.absorb(b)
    s = a.summary()
    assert s["replay_prompts"] == 4 and s["replay_selected_fraction"] == pytest.approx(0.2)
    assert s["replay_prefills_injected"] == 2


def test_passk_readers_take_schema_1_files_as_plain(tmp_path):
    """Runs written before the `replay` column: every row is the plain evaluation, no replay curves."""
    from analysis.loader import Run
    from analysis.measures.passk import eval_samples, passk_curves, replay_curves, replay_modes
    from analysis.synthetic import make_run
    from rlx.storage import DiagnosticsWriter

    run = make_run(tmp_path / "run", steps=2)
    w = DiagnosticsWriter(run, rank=0, world_size=1)
    for step, version, extra in ((0, 1, {}), (2, 2, {"replay": "off"})):
        rows = [
            {
                "step": step,
                "prompt_index": i,
                "kind": "sample",
                "sample": j,
                "completion": "",
                "reward": 1.0,
                "correct": (i + j + step) % 2 == 0,
                **extra,
            }
            for i in range(3)
            for j in range(2)
        ]
        if version == 2:
            rows += [dict(r, replay="direct", correct=True) for r in rows]
        w.write_parquet(
            f"eval/step_{step:06d}.parquet",
            rows,
            schema_version=version,
            instrument="eval",
            description="test",
        )
    loaded = Run(run)
    assert set(eval_samples(loaded, replay=None).replay) == {"off", "direct"} and replay_modes(loaded) == [
        "direct"
    ]
    curves = passk_curves(loaded)
    assert sorted(curves.step.unique()) == [0, 2] and (curves.num_prompts == 3).all()
    replayed = replay_curves(loaded)
    assert set(replayed.step) == {2} and (replayed.pass_at_k == 1.0).all()
