"""Exact resume: a run killed with SIGKILL and resumed is the same run as one that was never interrupted.

Every kill here is a real SIGKILL of the training subprocess, at a point chosen with `RLX_FAULT`
(rlx/checkpoint.py::fault_point), so the test does not depend on timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

# Keys that measure wall time (or summarise one `train()` call) and legitimately differ between runs.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")

GRPO = [
    "recipe=grpo_tiny",
    "regularizers=[relax]",
    "diagnostics.grad_alignment.enabled=true",
    "diagnostics.grad_alignment.every=2",
    "diagnostics.grad_alignment.target_size=16",
    "trainer.per_device_train_batch_size=32",
    "trainer.steps_per_generation=2",  # each rollout feeds two optimizer steps: resume mid-buffer
    "trainer.max_steps=6",
    "trainer.save_steps=3",
    "eval.before_after=false",
    "trainer.report_to=[]",
]
PPO = [
    "recipe=ppo_tiny",
    "trainer.per_device_train_batch_size=32",
    "trainer.max_steps=6",
    "trainer.save_steps=2",
    "eval.before_after=false",
    "trainer.report_to=[]",
]
DDP = [
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
]


def train(out: Path, args: list[str], fault: str | None = None, launcher: list[str] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLX_FAULT", None)
    if fault:
        env["RLX_FAULT"] = fault
    cmd = [sys.executable, *(launcher or []), str(REPO / "rlx" / "train.py"), *args, f"output_dir={out}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_rows(run: Path) -> dict[int, dict]:
    """Per-step metric rows (the closing summary row of a `train()` call excluded); fails on a duplicate step."""
    out: dict[int, dict] = {}
    for r in rows(run):
        if "train_runtime" in r:
            continue
        assert r["step"] not in out, f"step {r['step']} logged twice in {run}/metrics.jsonl"
        out[r["step"]] = {k: v for k, v in r.items() if not any(k.endswith(t) for t in TIMING)}
    return out


def assert_same_metrics(a: Path, b: Path, rtol: float = 1e-5) -> None:
    ra, rb = step_rows(a), step_rows(b)
    assert sorted(ra) == sorted(rb)
    for step in ra:
        assert set(ra[step]) == set(rb[step]), f"step {step}: {set(ra[step]) ^ set(rb[step])}"
        for k, va in ra[step].items():
            vb = rb[step][k]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), f"step {step} {k}: nan vs {vb}"
            elif isinstance(va, (int, float)):
                assert vb == pytest.approx(va, rel=rtol, abs=1e-7), f"step {step} {k}: {va} vs {vb}"
            else:
                assert va == vb, f"step {step} {k}"


def assert_same_weights(a: Path, b: Path, file: str = "final/model.safetensors") -> None:
    wa, wb = load_file(a / file), load_file(b / file)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def killed_and_resumed(tmp: Path, args: list[str], faults: list[str], launcher=None) -> Path:
    run = tmp / "resumed"
    for fault in faults:
        extra = ["trainer.resume_from_checkpoint=true"] if (run / "metrics.jsonl").exists() else []
        p = train(run, [*args, *extra], fault=fault, launcher=launcher)
        assert p.returncode != 0, f"the fault {fault} did not kill the run:\n{p.stderr[-3000:]}"
    p = train(run, [*args, "trainer.resume_from_checkpoint=true"], launcher=launcher)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resuming" in p.stdout
    return run


@pytest.mark.slow
def test_grpo_relax_alignment_resume_equals_straight(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    p = train(straight, GRPO)
    assert p.returncode == 0, p.stderr[-4000:]
    run = killed_and_resumed(tmp_path, GRPO, ["after_log:4"])
    assert_same_metrics(straight, run)
    assert_same_weights(straight, run)
    # the instruments' tables hold each logged step once, with the same values
    import pandas as pd

    for table in ("grad_alignment.parquet",):
        a, b = pd.read_parquet(straight / "diagnostics" / table), pd.read_parquet(run / "diagnostics" / table)
        pd.testing.assert_frame_equal(
            a.drop(columns=[c for c in a if "time" in c]),
            b.drop(columns=[c for c in b if "time" in c]),
            rtol=1e-5,
        )
    info = json.loads((run / "run_info.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-3") and info["global_step"] == 6


@pytest.mark.slow
def test_ppo_resume_equals_straight(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    p = train(straight, PPO)
    assert p.returncode == 0, p.stderr[-4000:]
    run = killed_and_resumed(tmp_path, PPO, ["after_log:5"])
    assert_same_metrics(straight, run)
    assert_same_weights(straight, run)
    assert_same_weights(straight, run, "checkpoint-6/critic/model.safetensors")
