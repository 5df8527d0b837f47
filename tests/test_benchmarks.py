"""The benchmark harness's statistics, gating and plumbing on synthetic timings (no timing is asserted), and
one tiny real run of the harness (slow)."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import pytest

from benchmarks import bench_alignment, bench_overhead, bench_probes, bench_relax, bench_versions, harness
from benchmarks.harness import Arm, Budget


def test_spread_and_paired_ratios():
    assert harness.spread([3.0, 1.0, 2.0]) == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0}
    assert harness.spread([])["n"] == 0 and math.isnan(harness.spread([])["median"])
    assert harness.paired_ratios([2.0, 3.0, 4.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 1.0]
    # a missing or zero denominator drops the round, never divides by zero
    assert harness.paired_ratios([2.0, None, 4.0], [1.0, 2.0, 0.0]) == [2.0]


def test_noise_floor_is_the_largest_deviation_of_the_control():
    assert harness.noise_floor([1.01, 0.97, 1.02]) == pytest.approx(0.03)
    assert math.isnan(harness.noise_floor([]))


def test_judge_gates_the_median_and_flags_noise_above_the_margin():
    quiet = [1.0, 1.005, 0.996, 1.002, 0.999]
    ok = harness.judge([1.01, 1.07, 1.03, 1.2, 1.05], 1.08, quiet)
    assert ok["ratio"] == 1.05 and ok["min"] == 1.01 and ok["max"] == 1.2
    assert ok["verdict"] == "PASS" and ok["pass"] and ok["conclusive"]
    assert ok["noise_floor"] == pytest.approx(0.005)
    bad = harness.judge([1.09, 1.10, 1.07], 1.08, quiet)
    assert bad["verdict"] == "FAIL" and not bad["pass"]
    at_limit = harness.judge([1.08], 1.08, quiet)
    assert at_limit["pass"]
    noisy = harness.judge([1.01, 1.0, 1.02], 1.02, [1.1, 0.9, 1.0])
    assert noisy["pass"] and not noisy["conclusive"]
    empty = harness.judge([], 1.03, quiet)
    assert empty["verdict"] == "NO DATA" and not empty["pass"]
    assert harness.judge([], None, quiet)["pass"]
    reported = harness.judge([3.0], None, quiet)
    assert reported["verdict"] == "REPORTED" and reported["pass"] and reported["conclusive"]


def test_exit_code_follows_gated_budgets_only():
    passed = {"limit": 1.02, "pass": True}
    failed = {"limit": 1.02, "pass": False}
    reported = {"limit": None, "pass": True}
    assert harness.exit_code([passed, reported]) == 0
    assert harness.exit_code([passed, failed]) == 1
    assert harness.exit_code([]) == 0


def test_arm_order_rotates_every_arm_through_every_position():
    arms = ["a", "a~", "b"]
    orders = [harness.arm_order(arms, r) for r in range(3)]
    assert orders == [["a", "a~", "b"], ["a~", "b", "a"], ["b", "a", "a~"]]
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == sorted(arms)


def _run(cpu: float, steps: list[float], wall_factor: float = 2.0) -> dict:
    return {
        "cpu": cpu,
        "wall": wall_factor * cpu,
        "train_cpu": cpu,
        "steps": [{"step": i + 1, "cpu": c, "wall": wall_factor * c} for i, c in enumerate(steps)],
        "max_rss_mb": 1.0,
        "diagnostics_bytes": 0,
    }


def test_evaluate_budget_run_and_step_metrics():
    runs = {
        "off": [_run(10.0, [5.0, 1.0, 1.0, 1.0, 1.0]), _run(20.0, [5.0, 2.0, 2.0, 2.0, 2.0])],
        "off~": [_run(11.0, [5.0, 1.1, 1.1, 1.1, 1.1]), _run(19.0, [5.0, 1.9, 1.9, 1.9, 1.9])],
        # logs at steps 2 and 4 (3x an off step), steps 3 and 5 cost as off
        "align": [_run(12.0, [9.0, 3.0, 1.0, 3.0, 1.0]), _run(26.0, [9.0, 6.0, 2.0, 6.0, 2.0])],
    }
    whole = harness.evaluate_budget(Budget("w", "align", 1.15), "off", runs)
    assert whole["per_round"] == pytest.approx([1.2, 1.3])
    assert whole["ratio"] == pytest.approx(1.25) and whole["verdict"] == "FAIL"
    assert whole["control_per_round"] == pytest.approx([1.1, 0.95])
    assert whole["noise_floor"] == pytest.approx(0.1)

    def logged(s):
        return s > 1 and s % 2 == 0

    step = harness.evaluate_budget(
        Budget("l", "align", 3.0, metric="step", arm_steps=logged, base_steps=harness.all_steps),
        "off",
        runs,
    )
    assert step["per_round"] == pytest.approx([3.0, 3.0]) and step["pass"]
    quiet = harness.evaluate_budget(
        Budget("n", "align", 1.03, metric="step", arm_steps=lambda s: s > 1 and not logged(s)), "off", runs
    )
    assert quiet["ratio"] == pytest.approx(1.0) and quiet["pass"]
    # step 1 is never part of a step metric: its 5 s and 9 s do not enter
    assert harness.step_median(runs["align"][0], harness.all_steps) == 2.0
    # wall: reported next to the CPU ratio, never gated
    wall = harness.evaluate_budget(Budget("w", "align", 1.15), "off", runs, key="wall")
    assert wall["limit"] is None and wall["ratio"] == pytest.approx(1.25)


def test_budget_with_another_denominator_keeps_the_base_control():
    runs = {"off": [_run(10.0, [1.0])], "off~": [_run(10.5, [1.0])], "trl": [_run(9.0, [1.0])]}
    b = harness.evaluate_budget(Budget("rlx / TRL", "off", None, base="trl"), "off", runs)
    assert b["ratio"] == pytest.approx(10 / 9) and b["base"] == "trl"
    assert b["noise_floor"] == pytest.approx(0.05)


def _fake_run_fn(cpu_of: dict[str, float]):
    calls = []

    def run_fn(arm: Arm, r: int, settings: dict) -> dict:
        calls.append((r, arm.name, arm.kind, tuple(arm.overrides)))
        c = cpu_of[arm.name.rstrip("~")] * (1 + 0.001 * r)
        return _run(c, [c / 4] * 4)

    return run_fn, calls


def test_run_bench_interleaves_controls_and_writes_json(tmp_path, capsys):
    bench = bench_relax.make()
    run_fn, calls = _fake_run_fn({"off": 10.0, "relax": 10.5})
    settings = {"rounds": 3, "steps": 4, "overrides": ["seed=1"], "workdir": str(tmp_path / "w")}
    out = tmp_path / "r.json"
    harness.run_bench(bench, settings, str(out), run_fn=run_fn, prepare_fn=None)
    # every round runs base, control and arm once, in rotated order
    assert [c[:2] for c in calls] == [
        (0, "off"), (0, "off~"), (0, "relax"),
        (1, "off~"), (1, "relax"), (1, "off"),
        (2, "relax"), (2, "off"), (2, "off~"),
    ]  # fmt: skip
    assert {c[3] for c in calls if c[1] == "relax"} == {("regularizers=[relax]",)}
    assert {c[3] for c in calls if c[1] in ("off", "off~")} == {()}
    saved = json.loads(out.read_text())
    assert saved["pass"] and saved["budgets"][0]["ratio"] == pytest.approx(1.05)
    assert saved["budgets"][0]["noise_floor"] == pytest.approx(0.0)
    assert set(saved["runs"]) == {"off", "off~", "relax"} and len(saved["runs"]["off"]) == 3
    assert saved["arms"]["off"]["cpu"]["n"] == 3
    text = capsys.readouterr().out
    assert "relax / off" in text and "noise floor" in text and "PASS" in text


def test_bench_main_exits_1_over_the_limit(monkeypatch, tmp_path):
    """A benchmark's main (what `python -m benchmarks.bench_x` exits with) fails when a gated ratio is over."""
    for slow, code in ((1.10, 1), (1.05, 0)):
        run_fn, _ = _fake_run_fn({"off": 10.0, "relax": 10.0 * slow})
        monkeypatch.setattr(harness, "run_in_subprocess", run_fn)
        monkeypatch.setattr(harness, "prepare_in_subprocess", lambda arms, settings: None)
        argv = ["--rounds", "2", "--steps", "2", "--json", str(tmp_path / "r.json")]
        assert bench_relax.main(argv) == code
    run_fn, _ = _fake_run_fn({"trl": 10.0, "rlx": 10.3})
    monkeypatch.setattr(harness, "run_in_subprocess", run_fn)
    assert bench_overhead.main(["--rounds", "2", "--json", str(tmp_path / "o.json")]) == 1


def test_alignment_budgets_select_logged_and_not_logged_steps():
    b = bench_alignment.make(type("A", (), {"every": 10})())
    logged, not_logged = b.budgets[1].arm_steps, b.budgets[2].arm_steps
    assert [s for s in range(1, 31) if logged(s)] == [10, 20, 30]
    assert not logged(1) and not not_logged(1)
    assert sum(not_logged(s) for s in range(1, 31)) == 26


def test_width_and_length_overrides_are_valid_config():
    from rlx.config.loader import load_config

    cfg = load_config(["recipe=grpo_tiny", *harness.width_overrides(256), *harness.length_overrides(16)])
    assert cfg.model.embedded.hidden_size == 256 and cfg.model.embedded.intermediate_size == 1024
    assert cfg.trainer.max_completion_length == 16
    assert cfg.trainer.generation_kwargs.min_new_tokens == 16
    assert harness.width_overrides(None) == [] and harness.length_overrides(None) == []
    r = harness.coin_reward(["p"] * 4, ["a", "b", "c", "d"])
    assert set(r) <= {0.0, 1.0} and r == harness.coin_reward(["q"] * 4, ["a", "b", "c", "d"])


@pytest.mark.slow
def test_harness_smoke_one_round_two_steps(tmp_path, tiny_model_dir):
    """Real subprocess runs of the alignment bench (every=2): every arm runs whole, steps are clocked."""
    bench = bench_alignment.make(type("A", (), {"every": 2})())
    settings = {"rounds": 1, "steps": 2, "overrides": [], "workdir": str(tmp_path / "w")}
    res = harness.run_bench(bench, settings, str(tmp_path / "r.json"))
    assert set(res["runs"]) == {"off", "off~", "align"}
    for runs in res["runs"].values():
        (r,) = runs
        assert [s["step"] for s in r["steps"]] == [1, 2]
        assert r["cpu"] > r["train_cpu"] > 0 and r["wall"] > 0 and r["process_cpu"] > r["cpu"]
        assert r["diagnostics_bytes"] > 0 and r["metrics_bytes"] > 0
    assert res["runs"]["align"][0]["diagnostics_bytes"] > res["runs"]["off"][0]["diagnostics_bytes"]
    labels = [b["label"] for b in res["budgets"]]
    assert labels == ["align every 2 / off", "logged step / off step", "not-logged step / off step"]
    assert all(b["ratio"] > 0 for b in res["budgets"][:2])  # step 2 is the only step after 1, and it logs
    assert res["budgets"][2]["verdict"] == "NO DATA"  # no step after 1 that does not log
    assert json.loads((tmp_path / "r.json").read_text())["bench"] == "alignment"


def test_run_all_passes_harness_options_to_harness_benchmarks_only(monkeypatch):
    """`benchmarks.run all --rounds 7` hands --rounds to the harness benchmarks, not to storage or replay
    (which take options of their own and reject it), and exits with the worst status."""
    from benchmarks import run as runner

    seen: dict[str, list[str]] = {}

    def fake_import(module: str):
        name = next(n for n, (m, _) in runner.BENCHMARKS.items() if m == module)

        def main(args):
            seen[name] = list(args)
            return 1 if name == "relax" else 0

        return types.SimpleNamespace(main=main)

    monkeypatch.setattr(runner.importlib, "import_module", fake_import)
    status = runner.main(["all", "--rounds", "7"])
    assert set(seen) == set(runner.BENCHMARKS) - runner.NOT_IN_ALL
    for name, args in seen.items():
        assert args == (["--rounds", "7"] if name in runner.HARNESS else []), name
    assert status == 1  # relax "failed"
    seen.clear()
    runner.main(["storage", "--x"])
    assert seen == {"storage": ["--x"]}


def test_an_arm_on_another_tree_runs_there_and_its_control_too(monkeypatch, tmp_path):
    """`Arm.tree` (benchmarks.run versions): the child runs with that tree as cwd and first on PYTHONPATH, the
    A-vs-A control inherits the tree, and a child that imported rlx from elsewhere is an error."""
    tree = tmp_path / "old"
    (tree / "rlx").mkdir(parents=True)
    seen = []

    def fake_run(cmd, cwd, env, stdout, stderr):
        seen.append((Path(cwd), env.get("PYTHONPATH", "")))
        out = Path(cmd[-1])
        rlx_file = (
            str(Path(cwd) / "rlx" / "__init__.py") if "elsewhere" not in str(out) else "/x/rlx/__init__.py"
        )
        out.write_text(
            json.dumps({"cpu": 1.0, "wall": 1.0, "train_cpu": 1.0, "steps": [], "rlx_file": rlx_file})
        )
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    settings = {
        "recipe": "grpo_tiny",
        "steps": 2,
        "overrides": [],
        "workdir": str(tmp_path / "w"),
        "keep": True,
    }
    (tmp_path / "w").mkdir()
    harness.run_in_subprocess(harness.Arm("before", tree=str(tree)), 0, settings)
    harness.run_in_subprocess(harness.Arm("after"), 0, settings)
    assert seen[0][0] == tree and seen[0][1].split(os.pathsep)[0] == str(tree)
    assert seen[1][0] == harness.REPO and str(tree) not in seen[1][1]
    with pytest.raises(RuntimeError, match="not from its tree"):
        harness.run_in_subprocess(harness.Arm("elsewhere", tree=str(tree)), 0, settings)

    bench = bench_versions.make(tree, with_trl=True, limit=None, rev="HEAD~1")
    run_fn, calls = _fake_run_fn({"before": 10.0, "after": 9.0, "trl": 8.0})
    trees = {}

    def record(arm, r, settings):
        trees[arm.name] = arm.tree
        return run_fn(arm, r, settings)

    res = harness.run_bench(
        bench, {"rounds": 2, "steps": 2, "overrides": []}, str(tmp_path / "v.json"), record, None
    )
    assert trees == {"before": str(tree), "before~": str(tree), "after": None, "trl": None}
    ratios = {b["label"]: b["ratio"] for b in res["budgets"]}
    assert ratios["after / before (HEAD~1)"] == pytest.approx(0.9, rel=1e-2)
    assert ratios["before / TRL"] == pytest.approx(1.25, rel=1e-2)


def test_versions_refuses_a_revision_that_is_not_a_commit(capsys):
    with pytest.raises(SystemExit) as e:
        bench_versions.worktree("no-such-revision-xyz")
    assert e.value.code == 2 and "not a commit" in capsys.readouterr().err


def test_probes_bench_turns_each_monitor_on_in_its_own_arm_with_a_real_probe_file():
    """One arm per monitor, each with only its own switch; the probes arm reads a probe that rlx's own loader takes
    (the model width of the runs), and every monitor is gated at 1.10 over whole runs."""
    from types import SimpleNamespace

    from rlx.instruments.probes import load_probe

    bench = bench_probes.make(SimpleNamespace(width=256))
    arms = {a.name: a.overrides for a in bench.arms}
    assert set(arms) == {"correctness", "h_neurons", "hidden_rank", "probes"}
    assert arms["h_neurons"] == ("diagnostics.h_neurons.enabled=true",)
    path = arms["probes"][1].split("=[", 1)[1].rstrip("]")
    probe = load_probe(path)
    assert probe.direction.shape == (256,)
    gated = {b.arm: b.limit for b in bench.budgets if b.metric == "run"}
    assert gated == dict.fromkeys(arms, 1.10)


def test_best_of_rounds_is_the_ratio_of_each_arms_fastest_run():
    """Interference only adds time: one disturbed round moves the median of per-round ratios but not min/min."""
    assert harness.best_of_rounds([10.0, 12.0, 30.0], [9.0, 8.0, 20.0]) == pytest.approx(10.0 / 8.0)
    assert harness.best_of_rounds([None, 5.0], [4.0, None]) == pytest.approx(5.0 / 4.0)
    assert math.isnan(harness.best_of_rounds([], [1.0])) and math.isnan(harness.best_of_rounds([1.0], [0.0]))
    runs = {
        "off": [_run(10.0, [1.0]), _run(10.0, [1.0]), _run(10.0, [1.0])],
        "off~": [_run(10.2, [1.0]), _run(10.1, [1.0]), _run(14.0, [1.0])],
        "arm": [_run(10.5, [1.0]), _run(13.0, [1.0]), _run(10.4, [1.0])],
    }
    b = harness.evaluate_budget(Budget("arm / off", "arm", 1.1), "off", runs)
    assert b["best"] == pytest.approx(1.04) and b["best_control"] == pytest.approx(1.01)
    assert b["ratio"] == pytest.approx(1.05)  # the gate stays the median of per-round ratios
