"""task=jsonl with plug-in rewards (task.reward): loading, failure reports, splits, and a GRPO run that uses them."""

from __future__ import annotations

import json
import math
import sys

import pytest

from rlx.errors import UserError

REWARDS = """
calls = []

def exact(prompts, completions, answer, **kw):
    calls.append(sorted(kw))
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]

def length_penalty(prompts, completions, **kw):
    return [-0.01 * len(c) for c in completions]

def broken(prompts, completions, **kw):
    raise KeyError("level")

def short(prompts, completions, **kw):
    return [1.0]

def sometimes_nan(prompts, completions, **kw):
    return [float("nan")] + [0.0] * (len(completions) - 1)
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "myrewards.py"
    path.write_text(REWARDS)
    return path


def test_load_reward_from_a_file_and_a_module(reward_file, monkeypatch):
    from rlx.tasks.rewards import load_reward

    fn = load_reward(f"{reward_file}:exact")
    assert fn(prompts=["1+1="], completions=["2"], answer=["2"]) == [1.0]
    monkeypatch.chdir(reward_file.parent)
    monkeypatch.syspath_prepend(str(reward_file.parent))
    sys.modules.pop("myrewards", None)
    assert load_reward("myrewards:length_penalty")(prompts=["p"], completions=["abc"]) == [-0.03]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("exact", "expected 'module:function'"),
        ("nowhere.py:exact", "no file nowhere.py"),
        ("no_such_module_rlx:exact", "cannot import module 'no_such_module_rlx'"),
        ("{file}:missing", "has no function 'missing'"),
    ],
)
def test_bad_reward_specs_say_what_is_wrong(reward_file, spec, match):
    from rlx.tasks.rewards import load_reward

    with pytest.raises(UserError, match=match):
        load_reward(spec.format(file=reward_file))


def test_failing_rewards_are_reported_with_the_function_and_the_sample(reward_file, capsys):
    from rlx.tasks.rewards import checked, load_reward

    batch = dict(prompts=["7+5="], completions=["13"], answer=["12"])
    with pytest.raises(UserError) as e:
        checked(load_reward(f"{reward_file}:broken"), "myrewards.py:broken")(**batch)
    assert "reward function myrewards.py:broken raised KeyError" in str(e.value)
    assert "prompt='7+5='" in str(e.value) and "completion='13'" in str(e.value)
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        checked(load_reward(f"{reward_file}:short"), "short")(prompts=["a", "b"], completions=["x", "y"])
    nan = checked(load_reward(f"{reward_file}:sometimes_nan"), "nan_fn")
    out = nan(prompts=["a", "b"], completions=["x", "y"])
    assert math.isnan(out[0]) and out[1] == 0.0
    nan(prompts=["a", "b"], completions=["x", "y"])
    err = capsys.readouterr().err
    assert err.count("reward function nan_fn returned None/NaN for 1 of 2") == 1  # reported once
    assert checked(load_reward(f"{reward_file}:exact"), "e").__name__ == "exact"  # TRL's metric name


def _write_problems(path, n=40):
    rows = [
        {"prompt": f"{a}+{b}=", "target": str(a + b), "level": a % 3}
        for a, b in zip(range(n), range(3, n + 3))
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_jsonl_task_splits_and_columns(tmp_path):
    from rlx.config.schema import TaskConfig
    from rlx.tasks import get_task

    rows = _write_problems(tmp_path / "p.jsonl")
    task = get_task(
        TaskConfig(name="jsonl", dataset=str(tmp_path / "p.jsonl"), answer_column="target", num_eval=8)
    )
    train, held = task.train_dataset(), task.eval_dataset()
    assert len(train) == 32 and len(held) == 8
    assert not set(train["prompt"]) & set(held["prompt"])  # disjoint
    assert {"prompt", "answer", "solution", "level"} <= set(train.column_names)
    by_prompt = {r["prompt"]: r["target"] for r in rows}
    assert all(by_prompt[p] == a for p, a in zip(held["prompt"], held["answer"]))
    assert task.score("43", "43") == 1.0 and task.score("41", "43") == 0.0  # math-verify / last number
    with pytest.raises(UserError, match="lacks column"):
        get_task(TaskConfig(name="jsonl", dataset=str(tmp_path / "p.jsonl"))).train_dataset()
    with pytest.raises(UserError, match="needs task.dataset"):
        get_task(TaskConfig(name="jsonl")).train_dataset()


@pytest.mark.slow
def test_grpo_trains_on_a_jsonl_task_with_weighted_plugin_rewards(tmp_path, tiny_model_dir, reward_file):
    from rlx.train import main

    _write_problems(tmp_path / "p.jsonl", n=64)
    run = main(
        [
            "recipe=grpo_tiny",
            "task.name=jsonl",
            f"task.dataset={tmp_path / 'p.jsonl'}",
            "task.answer_column=target",
            f"task.reward=[{reward_file}:exact,{reward_file}:length_penalty]",
            "trainer.reward_weights=[1.0,0.5]",
            f"model.name_or_path={tiny_model_dir}",
            "trainer.max_steps=2",
            "trainer.per_device_train_batch_size=16",
            "trainer.max_completion_length=8",
            "eval.num_prompts=8",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2
    for r in steps:  # TRL's weighted sum of the two plug-ins (no NaN here)
        expected = r["rewards/exact/mean"] + 0.5 * r["rewards/length_penalty/mean"]
        assert r["reward"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert r["rewards/length_penalty/mean"] < 0
    mod = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(reward_file))
    # training calls get every other dataset column (held-out scoring passes prompts/completions/answer only)
    assert any({"level", "solution"} <= set(kw) for kw in mod.calls)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["global_step"] == 2 and run


@pytest.mark.slow
def test_a_reward_that_raises_mid_run_exits_2_naming_it(tmp_path, tiny_model_dir, reward_file, capsys):
    from rlx.train import main

    _write_problems(tmp_path / "p.jsonl")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "recipe=grpo_tiny",
                "task.name=jsonl",
                f"task.dataset={tmp_path / 'p.jsonl'}",
                "task.answer_column=target",
                f"task.reward=[{reward_file}:broken]",
                f"model.name_or_path={tiny_model_dir}",
                "trainer.max_completion_length=8",
                "trainer.max_steps=2",
                "trainer.per_device_train_batch_size=16",
                "eval.before_after=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: reward function") and "broken raised KeyError" in last
