"""The built-in trainers' specs (rlx/trainers/registry.py), and the lookups every other module uses.

Cheap to import (no TRL, no trainer module): the config loader validates `algo` and `trainer.*` through it. A new
trainer adds its module (the trainer class and its build function) and one `register_trainer(...)` here.
"""

from __future__ import annotations

from typing import Any

from rlx.errors import UserError
from rlx.trainers.registry import (
    _REGISTRY,
    TrainerSpec,
    cast_lm_head,
    no_cast,
    no_kl_term,
    one_step_per_rollout,
    register_trainer,
    sampling_temperature,
    trainer_beta,
    unit_temperature,
)


def ppo_steps_per_rollout(args: Any) -> int:
    """PPO reuses each rollout for ppo_epochs * num_minibatches optimizer steps (num_iterations *
    steps_per_generation / gradient_accumulation_steps in TRL's GRPO machinery)."""
    ga = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    spg = int(getattr(args, "steps_per_generation", None) or ga)
    return max(1, int(getattr(args, "num_iterations", 1) or 1) * spg // ga)


register_trainer(
    TrainerSpec(
        name="grpo",
        config_class="trl:GRPOConfig",
        build="rlx.trainers.grpo:build_grpo_trainer",
        tertile_level="sequence",
        row_fast_path=True,
        samples_completions=True,
        temperature=sampling_temperature,
        lm_head_fp32=cast_lm_head,
        kl_coef=trainer_beta,
        steps_per_rollout=one_step_per_rollout,
        default_instruments=("entropy_cov",),
    )
)
register_trainer(
    TrainerSpec(
        name="dpo",
        config_class="trl:DPOConfig",
        build="rlx.trainers.dpo:build_dpo_trainer",
        tertile_level="pair",
        row_fast_path=True,
        samples_completions=False,
        temperature=unit_temperature,
        lm_head_fp32=no_cast,
        kl_coef=no_kl_term,
        steps_per_rollout=one_step_per_rollout,
        hf_eval_dataset=True,
    )
)
register_trainer(
    TrainerSpec(
        name="sft",
        config_class="trl:SFTConfig",
        build="rlx.trainers.sft:build_sft_trainer",
        tertile_level="sequence",
        row_fast_path=True,
        samples_completions=False,
        temperature=unit_temperature,
        lm_head_fp32=no_cast,
        kl_coef=no_kl_term,
        steps_per_rollout=one_step_per_rollout,
    )
)
register_trainer(
    TrainerSpec(
        name="ppo",
        config_class="rlx.trainers.ppo_config:PPOConfig",
        build="rlx.trainers.ppo:build_ppo_trainer",
        tertile_level="token",
        row_fast_path=False,  # token-level advantages: a row holds both signs
        samples_completions=True,
        temperature=sampling_temperature,
        lm_head_fp32=cast_lm_head,
        kl_coef=no_kl_term,  # the KL penalty is in the reward (A_t), not a loss term
        steps_per_rollout=ppo_steps_per_rollout,
    )
)
register_trainer(
    TrainerSpec(
        name="rloo",
        config_class="trl:GRPOConfig",  # GRPO's machinery and loss; the advantage is leave-one-out
        build="rlx.trainers.rloo:build_rloo_trainer",
        tertile_level="sequence",
        row_fast_path=True,
        samples_completions=True,
        temperature=sampling_temperature,
        lm_head_fp32=cast_lm_head,
        kl_coef=trainer_beta,
        steps_per_rollout=one_step_per_rollout,
        default_instruments=("entropy_cov",),
        # TRL RLOO's defaults: unnormalised advantages, the loss of summed token log-probs (rlx/trainers/rloo.py)
        config_defaults={"scale_rewards": "none", "loss_type": "dr_grpo"},
    )
)
register_trainer(
    TrainerSpec(
        name="reinforce_pp",
        config_class="rlx.trainers.reinforce_pp:ReinforcePPConfig",
        build="rlx.trainers.reinforce_pp:build_reinforce_pp_trainer",
        tertile_level="token",
        row_fast_path=False,  # token-level advantages: a row holds both signs
        samples_completions=True,
        temperature=sampling_temperature,
        lm_head_fp32=cast_lm_head,
        kl_coef=no_kl_term,  # the KL penalty is in the reward (A_t), not a loss term
        steps_per_rollout=ppo_steps_per_rollout,  # num_iterations * steps_per_generation / GA, as PPO
        default_instruments=("entropy_cov",),
    )
)


def trainer_names() -> tuple[str, ...]:
    """Every registered `algo`, built-in ones first."""
    return tuple(_REGISTRY)


def trainer_spec(name: str) -> TrainerSpec:
    """The spec of `algo: name`; a name nobody registered is a user error naming the registered ones."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise UserError(f"unknown algo '{name}': expected one of {', '.join(_REGISTRY)}.")
    return spec


def spec_of(trainer: Any, default: str = "") -> TrainerSpec:
    """The spec of a built trainer (its `rlx_algo`, else `default`, e.g. the run config's `algo`)."""
    return trainer_spec(getattr(trainer, "rlx_algo", "") or default)
