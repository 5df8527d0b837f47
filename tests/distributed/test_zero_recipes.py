"""Every tiny recipe under 2-process CPU DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, with the default before/after eval.

One launch per stage trains all twelve recipes one after the other (tests/distributed/_train_many.py: a launch
costs 10-15 s before its first step), each for one optimizer step on a small batch with a 4-prompt eval; the
tests then read each run's files. What is checked per recipe: both ranks ran the step, the before/after greedy
eval was written (it used to crash or hang on partitioned weights), the *_align recipes logged grad_align/*,
ReLaX with trainer.beta=0 scored rows with its on-demand reference under ZeRO-3, PPO trained and saved its
critic. FSDP2 runs the recipes without gradient alignment (which refuses FSDP). Another launch checks that a
collective one rank never joins fails within trainer.ddp_timeout.
Measured on 2 shared cores: ZeRO-2 ~70 s, ZeRO-3 ~95 s, FSDP2 ~40 s, the timeout launch ~45 s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GRPO = ["trainer.per_device_train_batch_size=8", "trainer.num_generations=4"]
ALIGN = ["diagnostics.grad_alignment.target_size=8"]
DPO = ["preference.num_pairs=16", "trainer.per_device_train_batch_size=4"]
SFT = ["trainer.per_device_train_batch_size=8"]
# ReLaX: xi=0 puts every A > 0 row under the adaptive KL, so the beta=0 run must load and use its reference;
# two steps without warm-up so the policy has moved from the reference at step 2.
RELAX = [*GRPO, "regularizers.relax.xi=0.0", "trainer.max_steps=2", "trainer.warmup_steps=0"]
RECIPES = {
    "grpo_tiny": GRPO,
    "grpo_relax_tiny": RELAX,
    "grpo_entropy_tiny": GRPO,
    "grpo_clipcov_tiny": GRPO,
    "grpo_klcov_tiny": GRPO,
    "grpo_tiny_align": [*GRPO, *ALIGN],
    "dpo_tiny": DPO,
    "dpo_tiny_align": [*DPO, *ALIGN],
    "sft_tiny": SFT,
    "sft_tiny_align": [*SFT, *ALIGN],
    "ppo_tiny": GRPO,
    "ppo_tiny_align": [*GRPO, *ALIGN],
}
EVAL_PROMPTS = 4

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _launch_cmd(config: str, entry: Path, args: list[str]) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    return [
        accelerate,
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
        "--main_process_port",
        str(port),
        str(entry),
        *args,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


# FSDP2: accelerate 1.15 turns an FSDP config into DDP when there is no GPU, so the launch goes through
# tests/distributed/_fsdp_on_cpu.py (FSDP honoured on CPU; each run asserts its policy is sharded). Gradient
# alignment refuses FSDP (exit 2, tested in tests/test_alignment_instrument.py): no *_align recipe there.
STAGE_RECIPES = {
    "zero2": list(RECIPES),
    "zero3": list(RECIPES),
    "fsdp2": [r for r in RECIPES if not r.endswith("_align")],
}
STAGE_ENV = {"fsdp2": {"RLX_TEST_FSDP_ON_CPU": "1"}}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model_dir):
    """matrix(stage) -> {recipe: run dir}, all recipes trained in one launch per stage (cached)."""
    cache: dict[str, dict[str, Path]] = {}
    logs: dict[str, str] = {}

    def get(stage: str) -> dict[str, Path]:
        if stage not in cache:
            root = tmp_path_factory.mktemp(f"matrix_{stage}")
            args: list[str] = []
            for recipe in STAGE_RECIPES[stage]:
                extra = RECIPES[recipe]
                args += ["--next"] if args else []
                args += [
                    f"recipe={recipe}",
                    f"output_dir={root / recipe}",
                    f"model.name_or_path={tiny_model_dir}",
                    "trainer.max_steps=1",
                    f"eval.num_prompts={EVAL_PROMPTS}",
                    *extra,
                ]
            cmd = _launch_cmd(f"cpu_{stage}.yaml", REPO / "tests" / "distributed" / "_train_many.py", args)
            t0 = time.perf_counter()
            env = {**_env(), **STAGE_ENV.get(stage, {})}
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
            print(f"[{stage}] {len(STAGE_RECIPES[stage])} recipes in {time.perf_counter() - t0:.1f}s")
            if proc.returncode != 0:
                pytest.fail(
                    f"{stage} launch failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
                )
            cache[stage] = {recipe: root / recipe for recipe in STAGE_RECIPES[stage]}
            logs[stage] = proc.stdout
        return cache[stage]

    get.logs = logs
    return get


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "stage, recipe", [(stage, recipe) for stage, recipes in STAGE_RECIPES.items() for recipe in recipes]
)
def test_tiny_recipe_under_zero_and_fsdp2(matrix, tiny_model_dir, stage, recipe):
    from safetensors import safe_open

    run = matrix(stage)[recipe]
    if stage == "fsdp2":  # one [fsdp] line per run: its policy was sharded by FSDP2 when it was saved
        assert matrix.logs[stage].count("[fsdp] ") == len(STAGE_RECIPES[stage])
    steps = 2 if recipe == "grpo_relax_tiny" else 1
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == steps
    shapes = []  # final/ holds whole weights, not one rank's shards: the base model's tensors and shapes
    for path in (tiny_model_dir / "model.safetensors", run / "final" / "model.safetensors"):
        with safe_open(str(path), "pt") as f:
            shapes.append({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert {k: shapes[1].get(k) for k in shapes[0]} == shapes[0]  # (+ lm_head.weight when saved untied)
    rows = [r for r in _rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # the default before/after eval ran on both ranks' shares of the held-out prompts, on gathered weights
    evals = json.loads((run / "eval_before_after.json").read_text())
    for when in ("before", "after"):
        assert evals[when]["num_prompts"] == EVAL_PROMPTS
        assert 0.0 <= evals[when]["greedy_accuracy"] <= 1.0
    assert info["greedy_accuracy_after"] == evals["after"]["greedy_accuracy"]
    if recipe.endswith("_align"):
        assert any(k.startswith("grad_align/") for r in rows for k in r), "alignment logged nothing"
    if recipe == "grpo_relax_tiny":
        assert "beta: 0.0" in (run / "config.yaml").read_text()  # no TRL reference: ReLaX loads its own
        assert all(r["relax/masked_frac"] > 0 for r in rows), "the adaptive KL scored no row"
        assert rows[-1]["relax/kl"] > 0, "the reference was not used once the policy moved"
    if recipe.startswith("ppo_tiny"):
        assert all("loss/value" in r and "loss/policy" in r for r in rows)
        assert (run / "final" / "critic").is_dir()


def test_collective_timeout_fails_with_message(tmp_path, tiny_model_dir):
    """Rank 0 alone runs a forward on the ZeRO-3 partitioned policy: the launch fails within ddp_timeout."""
    timeout_s = 10
    args = [
        "recipe=grpo_tiny",
        f"output_dir={tmp_path / 'run'}",
        f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=1",
        *GRPO,
        f"trainer.ddp_timeout={timeout_s}",
    ]
    cmd = _launch_cmd("cpu_zero3.yaml", REPO / "tests" / "distributed" / "_train_stuck_rank.py", args)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stuck_at, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:  # time from the moment rank 0 enters the collective alone
        lines.append(line)
        if "[stuck_rank]" in line:
            stuck_at = time.perf_counter()
    proc.wait(timeout=300)
    waited = time.perf_counter() - stuck_at if stuck_at else None
    log = "".join(lines)
    print(f"failed {waited:.1f}s after rank 0 entered the collective (ddp_timeout {timeout_s}s)")
    assert stuck_at is not None, log[-4000:]
    assert proc.returncode != 0
    assert "Timed out" in log, log[-4000:]
    assert "error: a collective operation timed out after trainer.ddp_timeout seconds" in log
    assert waited < timeout_s + 30, f"took {waited:.0f}s for a {timeout_s}s timeout"
