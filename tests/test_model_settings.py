"""Every `model.*` field reaches every model a trainer builds: policy, reference, PPO critic, ReLaX's reference.

Checked on the built trainer (what TRL actually trains), not on the config: parameter dtype and
`config._attn_implementation`, for each algorithm, in bfloat16 + eager against the float32 + sdpa default.
"""

from __future__ import annotations

import pytest
import torch

SETTINGS = {
    "bf16_eager": (["model.dtype=bfloat16", "model.attn_implementation=eager"], torch.bfloat16, "eager"),
    "fp32_sdpa": (["model.dtype=float32", "model.attn_implementation=sdpa"], torch.float32, "sdpa"),
}
ALGOS = {
    "grpo": ["recipe=grpo_tiny", "trainer.beta=0.04"],  # beta > 0: TRL keeps a reference model
    "dpo": ["recipe=dpo_tiny", "preference.num_pairs=8"],
    "sft": ["recipe=sft_tiny"],
    "ppo": ["recipe=ppo_tiny"],  # beta 0.02: reference; plus the critic
}


def _build(tmp_path, model_dir, overrides):
    from rlx.config.loader import load_config
    from rlx.run import make_run_context
    from rlx.trainers.build import build_trainer

    cfg = load_config([*overrides, f"model.name_or_path={model_dir}", f"output_dir={tmp_path / 'run'}"])
    return build_trainer(cfg, make_run_context(cfg, tmp_path / "run")).trainer


def _dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_model_settings_reach_every_model(tmp_path, tiny_model_dir, algo, setting):
    overrides, dtype, attn = SETTINGS[setting]
    trainer = _build(tmp_path, tiny_model_dir, [*ALGOS[algo], *overrides])
    models = {"policy": trainer.model}
    if algo in ("grpo", "dpo", "ppo"):
        assert trainer.ref_model is not None, f"{algo} must hold a reference model in this test"
        models["reference"] = trainer.ref_model
    if algo == "ppo":
        from rlx.trainers.ppo import CRITIC_ATTR

        critic = getattr(trainer.model, CRITIC_ATTR)
        models["critic"] = critic.backbone
        # the policy's own parameters, without the critic attached to it
        models["policy"] = torch.nn.ModuleList(
            [m for n, m in trainer.model.named_children() if n != CRITIC_ATTR]
        )
        models["policy"].config = trainer.model.config
        assert _dtypes(critic.v_head) == {dtype}
    for name, model in models.items():
        assert _dtypes(model) == {dtype}, f"{algo} {name}: {_dtypes(model)} != {dtype}"
        assert model.config._attn_implementation == attn, (
            f"{algo} {name}: {model.config._attn_implementation}"
        )


def test_relax_lazy_reference_follows_the_policy(tmp_path, tiny_model_dir):
    """ReLaX's own reference (trainer.beta=0) is loaded with the policy's dtype and attention."""
    from rlx.instruments.reference import LazyReference

    trainer = _build(
        tmp_path,
        tiny_model_dir,
        ["recipe=grpo_relax_tiny", "model.dtype=bfloat16", "model.attn_implementation=eager"],
    )
    assert trainer.ref_model is None
    ref = LazyReference()._load(trainer.model)
    assert _dtypes(ref) == {torch.bfloat16} and ref.config._attn_implementation == "eager"


def test_grpo_trains_and_saves_bf16(run_recipe):
    """model.dtype=bfloat16 is what GRPO trains and saves (it was float32 whatever the setting)."""
    import json

    run_dir = run_recipe(
        "grpo_tiny",
        "model.dtype=bfloat16",
        "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=16",
        "eval.before_after=false",
    )
    cfg = json.loads((run_dir / "final" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
