"""Recipe loading, composition, overrides and every user error (messages and exit code 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from rlx.config.loader import available_recipes, load_config
from rlx.errors import UserError
from tests.conftest import REPO


def test_recipe_then_overrides_merge_in_order():
    cfg = load_config(["recipe=grpo_tiny", "trainer.max_steps=7", "seed=3", "task.max_digits=3"])
    assert cfg.recipe == "grpo_tiny" and cfg.algo == "grpo"
    assert cfg.trainer.max_steps == 7 and cfg.seed == 3 and cfg.task.max_digits == 3
    assert cfg.trainer.num_generations == 8  # from the recipe
    assert cfg.model.name_or_path == "embedded"  # schema default


def test_defaults_list_composes(tmp_path):
    (tmp_path / "base.yaml").write_text("algo: dpo\nseed: 5\ntrainer:\n  beta: 0.2\n")
    (tmp_path / "child.yaml").write_text("defaults: [base]\nseed: 9\n")
    cfg = load_config(["recipe=child", "trainer.max_steps=2"], recipes_dir=tmp_path)
    assert (cfg.algo, cfg.seed, cfg.trainer.beta, cfg.trainer.max_steps) == ("dpo", 9, 0.2, 2)


def test_regularizers_list_shorthand():
    cfg = load_config(["recipe=grpo_tiny", "regularizers=[entropy]", "regularizers.entropy.coef=0.5"])
    assert list(cfg.regularizers.enabled) == ["entropy"] and cfg.regularizers.entropy.coef == 0.5


def test_every_recipe_resolves():
    names = available_recipes()
    assert {"grpo_tiny", "dpo_tiny", "sft_tiny", "grpo_qwen3_gsm8k", "dpo_qwen3_ultrafeedback"} <= set(names)
    for name in names:
        cfg = load_config([f"recipe={name}"])
        assert OmegaConf.to_yaml(cfg)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["recipe=does_not_exist"], ["unknown recipe 'does_not_exist'", "grpo_tiny", "dpo_tiny"]),
        (
            ["recipe=grpo_tiny", "trainer.lerning_rate=1e-5"],
            ["unknown config key 'trainer.lerning_rate'", "trainer.learning_rate"],
        ),
        (
            ["recipe=grpo_tiny", "task.max_digts=3"],
            ["unknown config key 'task.max_digts'", "task.max_digits"],
        ),
        (["recipe=grpo_tiny", "seed=abc"], ["wrong type for config key 'seed'", "int", "abc"]),
        (
            ["recipe=grpo_tiny", "warmstart.teacher_bug_rate=abc"],
            ["wrong type for config key 'warmstart.teacher_bug_rate'", "expected float", "abc"],
        ),
        (
            ["recipe=grpo_tiny", "model.embedded.hidden_size=big"],
            ["wrong type for config key 'model.embedded.hidden_size'", "expected int", "big"],
        ),
        (
            ["recipe=grpo_tiny", "trainer.max_steps=ten"],
            ["wrong type for config key 'trainer.max_steps'", "int", "ten"],
        ),
        (["recipe=grpo_tiny", "algo=reinforce"], ["unknown algo 'reinforce'", "grpo"]),
        (["recipe=grpo_tiny", "nonsense"], ["cannot parse argument 'nonsense'", "key=value"]),
    ],
)
def test_user_errors_name_the_problem(argv, fragments):
    with pytest.raises(UserError) as e:
        load_config(argv)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_unreadable_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("algo: grpo\ntrainer:\n  max_steps: [1, 2\n  lr: 3\n")
    with pytest.raises(UserError) as e:
        load_config([f"recipe={bad}"])
    assert str(bad) in str(e.value) and ":4:" in str(e.value) or ":5:" in str(e.value)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["recipe=does_not_exist"], "unknown recipe"),
        (["recipe=grpo_tiny", "trainer.lerning_rate=1e-5"], "trainer.learning_rate"),
        (["recipe=grpo_tiny", "warmstart.teacher_bug_rate=1.5"], "teacher_bug_rate=1.5 is not a probability"),
    ],
)
def test_cli_exits_2_without_traceback(args, expect):
    p = subprocess.run(
        [sys.executable, "rlx/train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0  # one line


def test_print_config_prints_and_exits(tmp_path):
    out = tmp_path / "never"
    p = subprocess.run(
        [sys.executable, "rlx/train.py", "recipe=dpo_tiny", "print_config=true", f"output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    cfg = OmegaConf.create(p.stdout)
    assert cfg.algo == "dpo" and cfg.trainer.beta == 0.1
    assert not out.exists()


def test_readme_lists_every_recipe():
    readme = (REPO / "README.md").read_text()
    missing = [r for r in available_recipes() if f"`{r}`" not in readme]
    assert not missing, f"recipes missing from README.md: {missing}"


def test_yaml_boolean_words_reach_string_fields():
    # YAML 1.1 reads `no` as False; TRL's save_strategy wants the string "no".
    cfg = load_config(["recipe=grpo_tiny", "trainer.save_strategy=no"])
    from rlx.config.loader import validate_trainer_args

    assert (
        validate_trainer_args("grpo", {"save_strategy": cfg.trainer.save_strategy})["save_strategy"] == "no"
    )
    assert validate_trainer_args("grpo", {"bf16": False})["bf16"] is False


def test_existing_run_dir_is_refused_and_left_intact(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (tmp_path / "config.yaml").write_text("algo: dpo\n")
    p = subprocess.run(
        [sys.executable, "rlx/train.py", "recipe=grpo_tiny", f"output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (
        p.returncode == 2
        and "already holds a run that did not finish (metrics.jsonl)" in p.stderr
        and "Traceback" not in p.stderr
    )
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    assert (tmp_path / "config.yaml").read_text() == "algo: dpo\n"
