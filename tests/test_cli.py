"""The `rlx` command and the entries' --help and print_config: what a user types first."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from rlx.cli import COMMANDS
from rlx.cli import main as rlx_main
from rlx.config.loader import (
    ACCELERATE_CONFIGS_DIR,
    RECIPES_DIR,
    available_recipes,
    recipe_summary,
    validate_trainer_args,
)
from rlx.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def _effective(stdout: str) -> dict:
    """The effective_trainer_args block that print_config prints after the run config."""
    return yaml.safe_load(stdout[stdout.index("effective_trainer_args:") :])["effective_trainer_args"]


def test_every_recipe_has_a_one_line_summary():
    for name in available_recipes():
        line = recipe_summary(name)
        assert 10 < len(line) <= 120, (name, line)
        assert not line.endswith((",", "(", ";")), (name, line)


def test_shipped_dirs_are_the_checkout_ones_here():
    assert RECIPES_DIR == REPO / "recipes" and ACCELERATE_CONFIGS_DIR == REPO / "accelerate_configs"


@pytest.mark.parametrize(
    "cmd", [[sys.executable, "rlx/train.py", "--help"], [sys.executable, "-m", "rlx.train", "--help"]]
)
def test_train_help_lists_recipes_and_print_config(cmd):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: rlx train")
    assert "print_config=true" in out.stdout and "accelerate launch" in out.stdout
    for name in available_recipes():
        assert f"  {name}  " in out.stdout and recipe_summary(name) in out.stdout


def test_rlx_help_and_subcommand_help(capsys):
    assert rlx_main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(f"  {c} " in top for c in COMMANDS)
    assert rlx_main(["train", "--help"]) == 0
    assert "usage: rlx train" in capsys.readouterr().out
    assert rlx_main(["eval", "--help"]) == 0
    assert "usage: rlx eval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # argparse's --help
        rlx_main(["report", "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_rlx_recipes_and_configs(capsys):
    rlx_main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"recipes ({RECIPES_DIR}):"
    assert [line.split()[0] for line in lines[1:]] == available_recipes()
    rlx_main(["configs"])
    assert str(ACCELERATE_CONFIGS_DIR / "zero3.yaml") in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        rlx_main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'trian'") and "'train'" in err and "\n" == err[-1]


def test_print_config_shows_the_trainer_arguments_rlx_sets(tmp_path, capsys):
    out_dir = tmp_path / "never_created"
    assert train_main(["recipe=grpo_tiny", "print_config=true", f"output_dir={out_dir}"]) is None
    stdout = capsys.readouterr().out
    assert "trainer:" in stdout and "GRPOConfig the trainer receives" in stdout
    args = _effective(stdout)
    assert args["report_to"] == ["tensorboard"]
    assert args["logging_steps"] == 1
    assert args["use_cpu"] is True  # CPU-only test machine
    assert args["bf16"] is False
    assert args["max_completion_length"] == 5  # arithmetic task: 2 digits + sign, carry, eos
    assert args["generation_batch_size"] == 512  # derived by GRPOConfig.__post_init__
    assert args["activation_checkpointing"] is False
    assert args["output_dir"] == str(out_dir)
    assert not out_dir.exists()


def test_print_config_gpu_recipe_checkpointing_without_deprecation(tmp_path, capsys):
    # the recipe says gradient_checkpointing: true; rlx passes it as activation_checkpointing (transformers 5.23)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_main(["recipe=grpo_qwen3_gsm8k", "print_config=true", f"output_dir={tmp_path / 'x'}"])
    args = _effective(capsys.readouterr().out)
    assert args["activation_checkpointing"] is True and args["bf16"] is True
    assert args["max_completion_length"] == 768 and args["per_device_train_batch_size"] == 16
    assert not [w for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]


def test_deprecated_trainer_names_are_renamed():
    assert validate_trainer_args("grpo", {"gradient_checkpointing": True}) == {
        "activation_checkpointing": True
    }
    both = {"gradient_checkpointing": True, "activation_checkpointing": False}
    assert validate_trainer_args("sft", both) == {"activation_checkpointing": False}


@pytest.mark.slow
def test_accelerate_launch_module(tmp_path, tiny_model_dir):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    run_dir = tmp_path / "run"
    cmd = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "rlx.train", "recipe=grpo_tiny", "trainer.max_steps=2"]
    cmd += ["eval.before_after=false", f"output_dir={run_dir}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
    assert (run_dir / "final" / "config.json").exists()
