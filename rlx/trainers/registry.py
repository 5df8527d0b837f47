"""The trainer registry: one `TrainerSpec` per algorithm, holding everything rlx outside the trainer's own module
needs to know about it (verl's `@register_adv_est` / `@register_policy_loss` pattern, for trainers).

The config loader reads the config class, `build_trainer` the build function, and the instruments the facts
(tertile level, row fast path, temperature, KL coefficient, on-policy point, default instruments) through
`LossContext.spec` or `spec_of(trainer)`; nothing else tests an algorithm's name. Specs are cheap to import: the
config class and the build function are named as "module:attribute" and imported on first use, so the config
loader does not import TRL's trainers. The built-in specs are in `rlx/trainers/catalog.py`, which is where they
are looked up (`trainer_spec`, `trainer_names`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

TertileLevel = Literal["pair", "token", "sequence"]

_REGISTRY: dict[str, TrainerSpec] = {}
"""Filled by `register_trainer`; read it through `rlx.trainers.catalog`, which registers the built-in specs first."""


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class TrainerSpec:
    """What rlx knows about one algorithm `algo: NAME`. Every fact an instrument reads has no default: a new
    trainer states it, so none is silently taken from another algorithm."""

    name: str
    """The `algo` value that selects this trainer (also the name in logs and run_info.json)."""
    config_class: str
    """"module:Class" of its training arguments (`trainer.*` is validated against this class's fields)."""
    build: str
    """"module:function" with signature `(cfg, run, model_dir, task, common) -> trainer`: builds the policy (and
    reference, critic, data) and returns the ready trainer; `common` holds the keyword arguments every rlx trainer
    takes (processing_class, callbacks, peft_config, instruments, run, guard)."""
    tertile_level: TertileLevel
    """Unit that gradient alignment ranks into reweighting tertiles: a preference pair, a token (token-level
    advantages) or a whole sequence."""
    row_fast_path: bool
    """w_t has one sign per row (sequence-level advantage, chosen/rejected, SFT), so alignment may read per-row
    gradients off the trainer's own backward (rlx/alignment/rowgrad.py)."""
    samples_completions: bool
    """Generates and scores its own completions from prompts (TRL's GRPO machinery): its config gets the task's
    completion budget as `max_completion_length` unless the recipe sets one."""
    temperature: Callable[[Any], float]
    """trainer -> the temperature its loss divides the logits by (TRL's fused LM head); 1 when it does not."""
    lm_head_fp32: Callable[[Any], bool]
    """trainer -> whether its loss casts the LM head to float32 (TRL's `cast_lm_head_to_fp32`)."""
    kl_coef: Callable[[Any], float]
    """trainer -> beta of a per-token k3 KL(pi || pi_ref) term in the *loss* of TRL GRPO's form (gradient alignment
    and KL-Cov split it off); 0 when the loss has none (PPO folds its KL penalty into the reward)."""
    steps_per_rollout: Callable[[Any], int]
    """trainer.args -> optimizer steps that reuse one rollout. When > 1, gradient alignment logs only the first of
    each rollout, the on-policy point (first epoch, first minibatch: ratio 1); 1 logs steps as they come."""
    default_instruments: tuple[str, ...] = ()
    """Diagnostics on in every run of this algorithm, whatever their config section says."""
    default_alignment_target: str = "heldout_chosen"
    """What `diagnostics.grad_alignment.target=auto` means for this algorithm."""
    hf_eval_dataset: bool = False
    """Passes a held-out dataset to HF's Trainer, so `trainer.eval_strategy` (HF's loss evaluation) can run."""
    config_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Training arguments this algorithm sets unless the recipe's `trainer.*` does (e.g. a trainer on GRPO's config
    class whose algorithm wants another `loss_type`); what the build step and `print_config` both pass."""

    def trainer_config_class(self) -> type:
        """The training-arguments class (imported now)."""
        return _resolve(self.config_class)

    def build_trainer(self, cfg: Any, run: Any, model_dir: str, task: Any, common: dict[str, Any]) -> Any:
        """Build the trainer (imports the trainer module now)."""
        return _resolve(self.build)(cfg, run, model_dir=model_dir, task=task, common=common)

    def trainer_defaults(self, task: Any) -> dict[str, Any]:
        """Training arguments this algorithm defaults from the task (the recipe's `trainer.*` wins)."""
        budget = {"max_completion_length": task.max_completion_length} if self.samples_completions else {}
        return {**budget, **self.config_defaults}


def register_trainer(spec: TrainerSpec) -> TrainerSpec:
    """Make `spec` available as `algo: spec.name`; registering another spec under a taken name is an error."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec:
        raise ValueError(f"trainer '{spec.name}' is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


# ---- facts shared by several specs -----------------------------------------------------------------------


def sampling_temperature(trainer: Any) -> float:
    """TRL's GRPO trainers divide the logits by `trainer.temperature` (the sampling temperature) in the loss."""
    return float(getattr(trainer, "temperature", 1.0) or 1.0)


def unit_temperature(trainer: Any) -> float:
    return 1.0


def cast_lm_head(trainer: Any) -> bool:
    """TRL's GRPO trainers cast the LM head to float32 in the loss when `args.cast_lm_head_to_fp32`."""
    return bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))


def no_cast(trainer: Any) -> bool:
    return False


def trainer_beta(trainer: Any) -> float:
    """TRL's GRPO loss adds `trainer.beta` * k3 KL per token."""
    return float(getattr(trainer, "beta", 0.0) or 0.0)


def no_kl_term(trainer: Any) -> float:
    return 0.0


def one_step_per_rollout(args: Any) -> int:
    return 1
