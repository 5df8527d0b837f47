"""`PPOConfig`: TRL's `GRPOConfig` (generation, reward functions, logging, vLLM) plus the PPO-specific fields.

How PPO's schedule maps onto GRPO's rollout buffer (see docs/ppo.md):

- one rollout = one GRPO *generation batch* = `per_device_train_batch_size * world_size * steps_per_generation`
  completions (`num_generations` per prompt);
- `num_minibatches` optimizer steps per pass over the rollout: `steps_per_generation = num_minibatches *
  gradient_accumulation_steps`;
- `ppo_epochs` passes over the same rollout: `num_iterations = ppo_epochs`.

`beta` keeps GRPO's name but means the KL coefficient of the *reward* (r_t = score 1[t=T] - beta * KL_t), not a
loss term. `epsilon` / `epsilon_high` are GRPO's clip range, reused by the PPO policy loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig


@dataclass
class PPOConfig(GRPOConfig):
    """PPO with a learned critic and GAE, on GRPO's rollout machinery.

    Fields inherited from `GRPOConfig` that PPO uses: `num_generations` (samples per prompt, >= 2),
    `max_completion_length`, `temperature`/`top_p`/`top_k`, `epsilon`, `epsilon_high`, `beta` (reward KL
    coefficient, see below), `use_vllm` and the generation options, `per_device_train_batch_size`
    (minibatch size per device), `gradient_accumulation_steps`, `learning_rate`, `max_grad_norm`.
    GRPO-only fields (`loss_type`, `scale_rewards`, `importance_sampling_level`, `top_entropy_quantile`,
    `num_iterations`, `steps_per_generation`) are ignored or derived.
    """

    beta: float = field(
        default=0.05,
        metadata={
            "help": "Initial KL coefficient of the KL-shaped reward r_t = score * 1[t = last] - beta * KL_t(pi || "
            "pi_ref). 0 disables the KL penalty and the reference model. (In GRPO this is a loss term; in PPO it "
            "is folded into the reward, as in Ziegler et al. 2019.)"
        },
    )
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator in the reward: k1 (log pi - log pi_ref), k2 or k3."},
    )
    adaptive_kl: bool = field(
        default=False,
        metadata={"help": "Adapt beta towards `kl_target` with Ziegler et al.'s proportional controller."},
    )
    kl_target: float = field(
        default=0.1,
        metadata={"help": "Adaptive KL: target mean per-sequence KL(pi_old || pi_ref) in nats."},
    )
    kl_horizon: int = field(
        default=10000,
        metadata={"help": "Adaptive KL: horizon (in samples) of the proportional controller."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE over completion tokens."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (bias-variance trade-off)."})
    whiten_advantages: bool = field(
        default=True,
        metadata={"help": "Whiten GAE advantages over the completion mask of the whole rollout (all ranks)."},
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    cliprange_value: float | None = field(
        default=0.2,
        metadata={
            "help": "Clip range of the value loss around the rollout-time values; None disables value clipping."
        },
    )
    dual_clip: float | None = field(
        default=None,
        metadata={
            "help": "Dual-clip constant c > 1 bounding the loss of negative-advantage tokens at -c * A; None = off."
        },
    )
    ppo_epochs: int = field(
        default=4,
        metadata={"help": "Passes over each rollout (sets GRPO's `num_iterations`)."},
    )
    num_minibatches: int = field(
        default=1,
        metadata={
            "help": "Optimizer steps per pass over a rollout (sets `steps_per_generation = num_minibatches * "
            "gradient_accumulation_steps`)."
        },
    )
    value_model: str | None = field(
        default=None,
        metadata={
            "help": "Path of the critic's initial backbone (an HF causal-LM or base-model directory). None = a copy "
            "of the policy backbone. A fresh scalar head is always added."
        },
    )
    value_head_init_std: float = field(
        default=0.0,
        metadata={
            "help": "Std of the normal init of the critic's scalar head (0 = zeros, so V = 0 at start)."
        },
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the critic's parameters (None = `learning_rate`)."},
    )

    grad_clip: str = field(
        default="separate",
        metadata={
            "help": "How `max_grad_norm` clips the policy and the critic. separate (default, as verl and OpenRLHF, "
            "which hold them in two models): the policy's gradient is clipped to max_grad_norm by its own norm and "
            "the critic's by its own, so a large critic gradient never shrinks the policy step. joint: one norm "
            "over both (the HF Trainer's clip of its one model), so the critic's norm also scales the policy "
            "update. Both norms are logged (grad_norm/policy, grad_norm/value); grad_norm stays the norm of both. "
            "Under DeepSpeed, FSDP or XLA the Trainer's own (joint) clip is used whatever this says: the engine "
            "clips the whole model with `gradient_clipping`."
        },
    )

    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "Passed to DDP. PPO needs False: the critic runs outside the DDP forward, so DDP's unused-parameter "
            "search would mark its parameters unused and then fail when their gradients arrive."
        },
    )

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("ppo_epochs and num_minibatches must be >= 1")
        if self.num_iterations not in (1, self.ppo_epochs):
            raise ValueError(
                f"num_iterations={self.num_iterations} conflicts with ppo_epochs={self.ppo_epochs}; set only ppo_epochs"
            )
        self.num_iterations = self.ppo_epochs
        derived = self.num_minibatches * self.gradient_accumulation_steps
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = derived
        elif self.steps_per_generation not in (None, derived):
            raise ValueError(
                f"steps_per_generation={self.steps_per_generation} conflicts with num_minibatches * "
                f"gradient_accumulation_steps = {derived}; set num_minibatches instead"
            )
        if self.grad_clip not in ("separate", "joint"):
            raise ValueError(f"grad_clip must be separate or joint, got {self.grad_clip!r}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.adaptive_kl and self.beta <= 0:
            raise ValueError(
                "adaptive_kl needs an initial beta > 0 (the reference model is built only when beta > 0)"
            )
        super().__post_init__()
