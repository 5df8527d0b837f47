"""Bad input and bad places: exit 2 with one line, and nothing that existed before is changed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO

SHORT = ["trainer.max_steps=2", "trainer.per_device_train_batch_size=16", "eval.before_after=false"]


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (and root itself when it is a file) with a hash of its content."""
    if root.is_file():
        return {str(root): hashlib.sha256(root.read_bytes()).hexdigest()}
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def fails_with(capsys, argv: list[str], match: str, code: int = 2) -> str:
    from rlx.train import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:" if code == 2 else "stopped:"), err
    assert match in err[-1], err[-1]
    return err[-1]


def test_output_dir_that_is_a_file(tmp_path, capsys, tiny_model_dir):
    f = tmp_path / "notes.txt"
    f.write_text("my notes")
    before = tree(f)
    fails_with(capsys, ["recipe=grpo_tiny", f"output_dir={f}", *SHORT], "is a file, not a directory")
    assert tree(f) == before


def test_read_only_file_system(tmp_path, capsys, tiny_model_dir):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mounting a read-only tmpfs is not allowed here")
    try:
        fails_with(capsys, ["recipe=grpo_tiny", f"output_dir={mnt}/run", *SHORT], "read-only")
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "trainer.per_device_train_batch_size=0",
            "trainer.per_device_train_batch_size=0: expected an integer >= 1",
        ),
        ("trainer.max_steps=-5", "trainer.max_steps=-5: expected a number of optimizer steps > 0, or -1"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("trainer.gradient_accumulation_steps=0", "gradient_accumulation_steps=0"),
        ("trainer.report_to=[wandb]", "the wandb package is not installed"),
        ("regularizers=[nope]", "unknown regularizer 'nope'"),
        (
            "diagnostics.grad_alignment.enabled=true diagnostics.grad_alignment.every=0",
            "grad_alignment.every=0",
        ),
        ("eval.every=-1", "eval.every=-1: expected 0 (off)"),
        ("trainer.eval_strategy=steps", "Use eval.every=N"),
    ],
)
def test_config_errors_leave_no_run_dir(tmp_path, capsys, tiny_model_dir, override, match):
    pytest.importorskip("tensorboard")
    if "wandb" in override and __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    out = tmp_path / "run"
    fails_with(capsys, ["recipe=grpo_tiny", f"output_dir={out}", *SHORT, *override.split()], match)
    assert not out.exists()


@pytest.mark.parametrize("recipe", ["grpo_qwen3_gsm8k", "ppo_qwen3_gsm8k", "relax_qwen3_4b"])
def test_vllm_recipe_without_vllm_exits_2_in_one_line_before_the_run_dir(tmp_path, capsys, recipe):
    """The real-model recipes generate with vLLM; without it installed: one line, exit 2, no run dir, no download."""
    import importlib.util

    from rlx.train import main

    pytest.importorskip("tensorboard")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([f"recipe={recipe}", f"output_dir={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: trainer.use_vllm=true but vLLM is not installed")
    assert "pip install 'rlx[vllm]'" in err[0] and "set trainer.use_vllm=false" in err[0]
    assert not out.exists()


def test_config_error_in_a_dir_the_user_made_changes_nothing(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("# the user's own file\n")
    before = tree(out)
    fails_with(
        capsys,
        ["recipe=grpo_tiny", f"output_dir={out}", *SHORT, "regularizers=[nope]"],
        "unknown regularizer",
    )
    assert tree(out) == before


def test_a_config_yaml_rlx_did_not_write_is_never_overwritten(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# the user's own file\n")
    before = tree(out)
    fails_with(capsys, ["recipe=grpo_tiny", f"output_dir={out}", *SHORT], "rlx did not write it")
    assert tree(out) == before


def test_empty_dataset_file_names_the_file(tmp_path, capsys, tiny_model_dir):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    fails_with(
        capsys,
        [
            "recipe=grpo_qwen3_gsm8k",
            f"model.name_or_path={tiny_model_dir}",
            f"task.dataset={empty}",
            f"task.eval_dataset={empty}",
            "model.dtype=float32",
            "model.attn_implementation=null",
            "trainer.bf16=false",
            "trainer.gradient_checkpointing=false",
            "trainer.use_vllm=false",
            f"output_dir={out}",
        ],
        f"data file {empty} is empty",
    )
    assert not out.exists()


def test_killed_run_dir_is_refused_with_a_resume_hint(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    env_fault = subprocess.run(
        [
            sys.executable,
            str(REPO / "rlx" / "train.py"),
            "recipe=grpo_tiny",
            f"output_dir={out}",
            *SHORT,
            "trainer.max_steps=3",
            "trainer.save_steps=1",
            "trainer.report_to=[]",
        ],
        cwd=REPO,
        env={**__import__("os").environ, "RLX_FAULT": "after_log:2"},
        capture_output=True,
        text=True,
    )
    assert env_fault.returncode == -9
    before = tree(out)
    line = fails_with(
        capsys, ["recipe=grpo_tiny", f"output_dir={out}", *SHORT, "trainer.max_steps=3"], "did not finish"
    )
    assert "checkpoint at step 1" in line and "trainer.resume_from_checkpoint=true" in line
    assert tree(out) == before


def test_full_disk_during_final_save_leaves_no_partial_final(tmp_path, capsys, tiny_model_dir):
    """A small tmpfs that holds the run and its last checkpoint but not final/: final/ absent, resume completes."""
    args = ["recipe=grpo_tiny", *SHORT, "trainer.report_to=[]", "trainer.save_steps=2"]
    probe = tmp_path / "probe"
    from rlx.train import main

    main([*args, f"output_dir={probe}"])
    used = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file() and "final" not in p.parts)
    final = sum(p.stat().st_size for p in (probe / "final").rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kb = (used + final // 2) // 1024 + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        out = mnt / "run"
        line = fails_with(
            capsys, [*args, f"output_dir={out}"], "no space left on the device while writing the final model"
        )
        assert "checkpoint-2" in line
        assert not (out / "final").exists() and not (out / ".final.tmp").exists()
        assert (out / "checkpoint-2" / "rlx_checkpoint.json").exists()
        subprocess.run(["mount", "-o", f"remount,size={size_kb * 4}k", str(mnt)], check=True)
        run = main([*args, f"output_dir={out}", "trainer.resume_from_checkpoint=true"])
        assert (Path(run) / "final" / "model.safetensors").exists()
        assert json.loads((Path(run) / "run_info.json").read_text())["global_step"] == 2
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_collapse_stops_with_exit_3_and_a_checkpoint(tmp_path, capsys, tiny_model_dir):
    """learning_rate=1e6: entropy pinned at ln|V| for guard.collapse_steps logged steps -> exit 3, checkpoint."""
    out = tmp_path / "run"
    line = fails_with(
        capsys,
        [
            "recipe=grpo_tiny",
            f"output_dir={out}",
            *SHORT,
            "trainer.max_steps=30",
            "trainer.learning_rate=1e6",
        ],
        "uniform maximum ln|V|",
        code=3,
    )
    step = int(line.split("collapsed at step ")[1].split(":")[0])
    assert step < 30 and f"checkpoint-{step}" in line
    assert (out / f"checkpoint-{step}" / "rlx_checkpoint.json").exists() and not (out / "final").exists()


def test_exploded_weights_stop_with_exit_3_naming_the_last_checkpoint(tmp_path, capsys, tiny_model_dir):
    """learning_rate=1e10: sampling meets NaN probabilities -> exit 3 (no traceback), the exploded state not saved."""
    out = tmp_path / "run"
    line = fails_with(
        capsys,
        [
            "recipe=grpo_tiny",
            f"output_dir={out}",
            *SHORT,
            "trainer.max_steps=20",
            "trainer.learning_rate=1e10",
            "trainer.save_steps=1",
        ],
        "non-finite",
        code=3,
    )
    assert "The last complete checkpoint is" in line
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert not (out / f"checkpoint-{step}").exists()


def test_guard_refuses_a_non_finite_gradient_before_the_update():
    from rlx.config.schema import GuardConfig
    from rlx.guard import Diverged, DivergenceGuard

    model = torch.nn.Linear(3, 2)
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(global_step=6), is_deepspeed_enabled=False)
    guard = DivergenceGuard(GuardConfig(), vocab_size=100)
    model.weight.grad = torch.ones_like(model.weight)
    guard.check_gradients(trainer)  # finite: nothing happens
    model.bias.grad = torch.tensor([1.0, float("inf")])
    with pytest.raises(Diverged) as e:
        guard.check_gradients(trainer)
    assert e.value.step == 6 and "step 7" in str(e.value)
    guard.cfg.nonfinite = False
    guard.check_gradients(trainer)


def test_guard_collapse_needs_consecutive_steps():
    import math

    from rlx.config.schema import GuardConfig
    from rlx.guard import Diverged, DivergenceGuard

    guard = DivergenceGuard(GuardConfig(collapse_steps=3), vocab_size=100)
    state = SimpleNamespace(global_step=1)
    hi, lo = 0.99 * math.log(100), 0.5 * math.log(100)
    for e in (hi, hi, lo, hi, hi):  # the streak is broken by a low step
        guard.on_log(None, state, None, logs={"entropy": e})
    with pytest.raises(Diverged, match="collapsed"):
        guard.on_log(None, state, None, logs={"entropy": hi})
    guard = DivergenceGuard(GuardConfig(collapse_steps=2), vocab_size=100)
    nan = {"rewards/a/mean": float("nan"), "rewards/b/mean": float("nan")}
    guard.on_log(None, state, None, logs={**nan, "rewards/b/mean": 0.5})  # one finite reward: not collapsed
    guard.on_log(None, state, None, logs=nan)
    with pytest.raises(Diverged, match="NaN"):
        guard.on_log(None, state, None, logs=nan)


def test_overlong_prompts_are_refused_or_dropped_never_truncated(capsys):
    from datasets import Dataset

    from rlx.embedded import build_tokenizer
    from rlx.errors import UserError
    from rlx.tasks.data import fit_prompts

    tok = build_tokenizer()
    prompts = ["1+2=", "12+34+56+78=", "1+1=" * 10, "3-1="]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    ds = Dataset.from_dict({"prompt": prompts, "answer": ["3", "180", "2", "2"]})
    context, budget = lengths[1] + 8, 8  # row 1 fits exactly, row 2 does not
    with pytest.raises(UserError) as e:
        fit_prompts(ds, tok, context, budget)
    msg = str(e.value)
    assert f"1 of 4 training prompts are longer than {lengths[1]} tokens" in msg
    assert f"row 2, has {lengths[2]} tokens" in msg and "task.overlong_prompts=drop" in msg
    kept = fit_prompts(ds, tok, context, budget, "drop")
    assert kept["prompt"] == [prompts[0], prompts[1], prompts[3]]
    assert "dropped 1 of 4" in capsys.readouterr().out
    assert fit_prompts(ds, tok, None, budget) is ds  # unknown context: nothing checked
    with pytest.raises(UserError, match="leaves no room"):
        fit_prompts(ds, tok, 8, 8)


def test_completion_budget_over_the_context_is_refused_before_the_run_dir(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    fails_with(
        capsys,
        ["recipe=grpo_tiny", f"output_dir={out}", *SHORT, "trainer.max_completion_length=125"],
        "training prompts are longer than 3 tokens",
    )
    assert not out.exists()
