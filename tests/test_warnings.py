"""rlx's own configuration raises no FutureWarning or DeprecationWarning (a default `make demo` log stays clean)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize(
    "recipe", ["grpo_tiny", "dpo_tiny", "sft_tiny", "ppo_tiny", "grpo_qwen3_gsm8k", "relax_qwen3_4b"]
)
def test_trainer_config_from_a_recipe_warns_nothing(recipe, tmp_path):
    from rlx.config.loader import load_config
    from rlx.trainers.build import make_trainer_config

    cfg = load_config(
        [f"recipe={recipe}", f"output_dir={tmp_path}", "trainer.bf16=false", "trainer.use_cpu=true"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = make_trainer_config(cfg, SimpleNamespace(run_dir=Path(tmp_path)))
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == [], [str(w.message) for w in deprecations]
    gpu_recipe = "qwen" in recipe  # they turn checkpointing on (gradient_checkpointing: true, passed renamed)
    assert args.activation_checkpointing is gpu_recipe and args.gradient_checkpointing is gpu_recipe
