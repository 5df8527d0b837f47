"""Shared fixtures: the warm-started embedded model (cached across tests and runs) and a recipe runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The default warm-started embedded model (the one grpo_tiny/dpo_tiny/sft_tiny train from)."""
    from rlx.config.loader import load_config
    from rlx.embedded import ensure_warm_started

    return ensure_warm_started(load_config(["recipe=grpo_tiny"]), progress=False)


@pytest.fixture(scope="session")
def run_recipe(tmp_path_factory, tiny_model_dir):
    """run_recipe(recipe, *overrides) -> run dir: trains in-process with the given overrides."""

    def _run(recipe: str, *overrides: str) -> Path:
        from rlx.train import main

        out = tmp_path_factory.mktemp(recipe)
        run_dir = main([f"recipe={recipe}", f"output_dir={out}", *overrides])
        return Path(run_dir)

    return _run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def record_step1_batches(monkeypatch, instrument_cls) -> list[dict]:
    """Patch `instrument_cls.on_loss` to keep the token ids and sample ids of step 1's training micro-batches (the
    warm-started model's rollouts), so a test can recompute the instrument's values with an independent forward.
    Returns the list the batches are appended to."""
    seen: list[dict] = []
    original = instrument_cls.on_loss

    def recording(self, ctx):
        if int(ctx.trainer.state.global_step) == 0 and ctx.trainer.model.training:
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            seen.append(
                {k: ctx.inputs[k].detach().cpu() for k in keys} | {"ids": ctx.extras["sample_ids"].cpu()}
            )
        return original(self, ctx)

    monkeypatch.setattr(instrument_cls, "on_loss", recording)
    return seen
