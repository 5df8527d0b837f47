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


def train(out: Path, args: list[str], fault: str | None = None, launcher: list[str] | None = None):
    """Run rlx/train.py in a subprocess (`launcher`: a command that takes the script, e.g. accelerate launch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLX_FAULT", None)
    if fault:
        env["RLX_FAULT"] = fault
    cmd = [*(launcher or [sys.executable]), str(REPO / "rlx" / "train.py"), *args, f"output_dir={out}"]
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


def assert_same_diagnostics(a: Path, b: Path) -> None:
    """Every instrument file (alignment tables and sketches, ReLaX shards and fits, ...) the same in both runs."""
    import pandas as pd

    from rlx.storage import read_manifest

    files_a = {f["path"] for f in read_manifest(a)["files"]}
    assert files_a and files_a == {f["path"] for f in read_manifest(b)["files"]}
    for rel in sorted(files_a):
        pa, pb = a / "diagnostics" / rel, b / "diagnostics" / rel
        if rel.endswith(".parquet"):
            fa, fb = pd.read_parquet(pa), pd.read_parquet(pb)
            drop = [c for c in fa if "time" in c]
            pd.testing.assert_frame_equal(fa.drop(columns=drop), fb.drop(columns=drop), rtol=1e-5, obj=rel)
        elif rel.endswith(".safetensors"):
            assert_same_weights(pa.parent, pb.parent, pa.name)
        elif rel.endswith(".json"):
            assert_close_json(json.loads(pa.read_text()), json.loads(pb.read_text()), rel)


def assert_close_json(a, b, where: str) -> None:
    """Equal JSON values, numbers to rtol 1e-5, wall-time fields ignored."""
    if isinstance(a, dict):
        keys = {k for k in a if "time" not in k and "seconds" not in k}
        assert keys == {k for k in b if "time" not in k and "seconds" not in k}, where
        for k in keys:
            assert_close_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a} vs {b}"


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
    assert_same_diagnostics(straight, run)
    info = json.loads((run / "run_info.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-3") and info["global_step"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo_tiny", "sft_tiny", "grpo_tiny+lora"])
def test_dpo_sft_lora_resume_equals_straight(tmp_path, tiny_model_dir, recipe):
    args = [
        f"recipe={recipe.split('+')[0]}",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=2",
        "diagnostics.grad_alignment.target_size=16",
        "trainer.per_device_train_batch_size=16",
        "trainer.max_steps=6",
        "trainer.save_steps=3",
        "eval.before_after=false",
        "trainer.report_to=[]",
    ]
    if recipe == "dpo_tiny":
        args.append("preference.num_pairs=64")
    if recipe.endswith("+lora"):  # adapters, their optimizer state and the adapter-disabled reference
        args += ["model.lora.enabled=true", "trainer.learning_rate=1e-3"]
    straight = tmp_path / "straight"
    p = train(straight, args)
    assert p.returncode == 0, p.stderr[-4000:]
    run = killed_and_resumed(tmp_path, args, ["after_log:5"])
    assert_same_metrics(straight, run)
    weights = "final/adapter_model.safetensors" if recipe.endswith("+lora") else "final/model.safetensors"
    assert_same_weights(straight, run, weights)


@pytest.mark.slow
def test_ppo_resume_equals_straight(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    p = train(straight, PPO)
    assert p.returncode == 0, p.stderr[-4000:]
    run = killed_and_resumed(tmp_path, PPO, ["after_log:5"])
    assert_same_metrics(straight, run)
    assert_same_weights(straight, run)
    assert_same_weights(straight, run, "checkpoint-6/critic/model.safetensors")


@pytest.mark.slow
def test_three_kills_each_step_once(tmp_path, tiny_model_dir):
    """SIGKILL after a step's log, inside a checkpoint (before its marker) and right after one; resume each time."""
    args = [a.replace("max_steps=6", "max_steps=8").replace("save_steps=3", "save_steps=2") for a in GRPO]
    run = killed_and_resumed(tmp_path, args, ["after_log:3", "in_checkpoint:4", "after_checkpoint:6"])
    steps = [r["step"] for r in rows(run) if "train_runtime" not in r]
    assert steps == list(range(1, 9)), steps
    from rlx.checkpoint import complete_checkpoints

    assert [s for s, _ in complete_checkpoints(run)] == [6, 8]  # save_total_limit=2, rotated after completion

    from rlx.storage import read_manifest, read_table

    manifest = read_manifest(run)
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {
        str(p.relative_to(run / "diagnostics")) for p in (run / "diagnostics").rglob("*") if p.is_file()
    }
    on_disk = {p for p in on_disk if not Path(p).name.startswith(".")} - {"manifest.jsonl"}
    assert listed == on_disk and manifest["torn"] == 0
    table = read_table(run, "grad_alignment")
    assert sorted(set(table["step"])) == [1, 2, 4, 6, 8]
    assert not table.duplicated(["step", "component"]).any()
    p = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-m", "analysis", "summary", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0 and "Warning" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_second_run_on_a_live_run_dir_exits_2(tmp_path, tiny_model_dir):
    import time

    run = tmp_path / "run"
    args = [a.replace("max_steps=6", "max_steps=40") for a in PPO]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, str(REPO / "rlx" / "train.py"), *args, f"output_dir={run}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / ".rlx.lock").exists() or not (run / ".rlx.lock").read_text():
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    t0 = time.time()
    second = train(run, args)
    assert second.returncode == 2
    assert time.time() - t0 < 60
    line = second.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: output_dir")
        and f"PID {first.pid}" in line
        and "Traceback" not in second.stderr
    )
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in rows(run) if "train_runtime" not in r] == list(range(1, 41))
    assert json.loads((run / "run_info.json").read_text())["global_step"] == 40
