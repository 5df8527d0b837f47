"""Every tiny recipe under 2-process CPU DeepSpeed ZeRO-2 and ZeRO-3, with the default before/after eval.

One launch per stage trains all twelve recipes one after the other (tests/distributed/_train_many.py: a launch
costs 10-15 s before its first step), each for one optimizer step on a small batch with a 4-prompt eval; the
tests then read each run's files. What is checked per recipe: both ranks ran the step, the before/after greedy
eval was written (it used to crash or hang on partitioned weights), the *_align recipes logged grad_align/*,
ReLaX with trainer.beta=0 scored rows with its on-demand reference under ZeRO-3, PPO trained and saved its
critic. A third launch checks that a collective one rank never joins fails within trainer.ddp_timeout.
Measured on 2 shared cores: ZeRO-2 ~65 s, ZeRO-3 ~90 s, the timeout launch ~45 s.
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


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model_dir):
    """matrix(stage) -> {recipe: run dir}, all recipes trained in one launch per stage (cached)."""
    cache: dict[str, dict[str, Path]] = {}

    def get(stage: str) -> dict[str, Path]:
        if stage not in cache:
            root = tmp_path_factory.mktemp(f"matrix_{stage}")
            args: list[str] = []
            for recipe, extra in RECIPES.items():
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
            proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=900)
            print(f"[{stage}] {len(RECIPES)} recipes in {time.perf_counter() - t0:.1f}s")
            if proc.returncode != 0:
                pytest.fail(
                    f"{stage} launch failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
                )
            cache[stage] = {recipe: root / recipe for recipe in RECIPES}
        return cache[stage]

    return get


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tiny_recipe_under_zero(matrix, stage, recipe):
    run = matrix(stage)[recipe]
    steps = 2 if recipe == "grpo_relax_tiny" else 1
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == steps
    assert (run / "final" / "config.json").exists()
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
