"""REINFORCE++ (`algo: reinforce_pp`): PPO's clipped surrogate without a critic, on TRL's GRPO machinery like rlx's
PPO (Hu 2025, "REINFORCE++", arXiv 2501.03262, Eqs. 8-10).

Advantage, the registered estimator `rlx.algorithms.advantages.reinforce_plus_plus_advantages`, per completion
token t of every completion of the rollout (T = its last token, score = weighted sum of the reward functions):

    r_t = -beta * KL_t + 1[t = T] * score        KL_t = k1/k2/k3(log pi_old(a_t), log pi_ref(a_t))  (`kl_estimator`)
    G_t = sum_{k >= t} gamma^(k - t) r_k         (reward-to-go; gamma = 1: G_t = score - beta * sum_{k >= t} KL_k)
    A_t = (G_t - mu) / sqrt(sigma^2 + 1e-8)      (mu, sigma^2: mean and sample variance of G over every completion
                                                  token of the generation batch, all ranks)

No critic and no group baseline: the global whitening is the baseline. The KL is in the reward, not the loss. The
loss is TRL GRPO's own (`trainer.loss_type`, default `dapo`: token mean over the generation batch) on these (B, C)
advantages with its k3 KL term turned off:

    L = - sum_t min(rho_t A_t, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A_t) / #tokens,   rho_t = pi / pi_old

What is reused unchanged: GRPO's rollout (prompts, `num_generations` samples each, rewards, reference log-probs,
`num_iterations` passes over `steps_per_generation` minibatches, vLLM), rlx's PPO rollout reading
(`rlx.trainers.ppo.kl_shaped_rollout`: scores, log pi_old, KL against the reference; `global_moments`), TRL's loss
and metrics. Every instrument sees the (B, C) advantages through the seam as on PPO (ReLaX averages them per
completion for its mask). GRPO's group advantages (`scale_rewards`) are computed by TRL and replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig

from rlx.algorithms.advantages import advantage_estimator
from rlx.algorithms.stats import KL_ESTIMATORS
from rlx.instruments.base import log_metrics
from rlx.trainers.grpo import RLXGRPOTrainer, build_grpo_trainer
from rlx.trainers.ppo import global_moments, kl_shaped_rollout


@dataclass
class ReinforcePPConfig(GRPOConfig):
    """`GRPOConfig` (generation, reward functions, clip range `epsilon`/`epsilon_high`, `loss_type`,
    `num_iterations`, `steps_per_generation`, vLLM) plus REINFORCE++'s reward shaping. `beta` keeps GRPO's name
    but is the KL coefficient of the *reward*; GRPO's `scale_rewards` is unused (the advantage is whitened over the
    batch)."""

    beta: float = field(
        default=0.01,
        metadata={
            "help": "KL coefficient of the reward r_t = score * 1[t = last] - beta * KL_t(pi_old || pi_ref) (not a "
            "loss term). 0 disables the KL penalty and the reference model."
        },
    )
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator in the reward: k1 (log pi - log pi_ref), k2 or k3."},
    )
    gamma: float = field(
        default=1.0, metadata={"help": "Discount of the reward-to-go over completion tokens."}
    )

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        super().__post_init__()


class RLXReinforcePPTrainer(RLXGRPOTrainer):
    """GRPO's rollout and loss with REINFORCE++'s token-level advantages (constructor as `RLXGRPOTrainer`, `args` a
    `ReinforcePPConfig`)."""

    rlx_algo = "reinforce_pp"
    _tag_names = ["trl", "reinforce_pp", "rlx"]

    def __init__(self, *args: Any, **kwargs: Any):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, ReinforcePPConfig):
            raise TypeError(f"REINFORCE++ needs a ReinforcePPConfig, got {type(config).__name__}")
        super().__init__(*args, **kwargs)

    def reinforce_pp_advantages(self, scores, kl, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) scores, (B, C) KL and mask of this rank -> (A (B, C), G (B, C)), whitened over every rank's tokens."""
        estimate = advantage_estimator("reinforce_plus_plus")
        beta, gamma = float(self.beta), self.args.gamma
        _, returns = estimate(scores, kl, mask, beta, gamma)  # G alone; its moments over all ranks whiten it
        moments = global_moments(self.accelerator, returns, mask)
        advantages, returns = estimate(scores, kl, mask, beta, gamma, moments=moments)
        return advantages, returns

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        rollout = kl_shaped_rollout(self, out, self.args.kl_estimator)
        advantages, returns = self.reinforce_pp_advantages(rollout.scores, rollout.kl, rollout.mask)
        with torch.no_grad():
            ret_mean, ret_var = global_moments(self.accelerator, returns, rollout.mask)
            seq_kl = self.accelerator.gather(rollout.kl.sum(1)).mean()
        # already global (reduced over ranks above)
        log_metrics(
            self, {"kl": seq_kl, "returns/mean": ret_mean, "returns/std": ret_var.sqrt()}, reduce="none"
        )
        # In place: the rollout dump queued by RLXGRPOTrainer holds this dict.
        out["advantages"] = advantages
        out["old_per_token_logps"] = rollout.old_logps
        return out

    def _compute_loss(self, model, inputs):
        """TRL's GRPO loss (through the seam) without its `beta` * k3 KL term: here beta shapes the reward. TRL
        reads `self.beta` both to score the reference at rollout time and to add the term, so it is 0 only here."""
        beta, self.beta = self.beta, 0.0
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.beta = beta


def build_reinforce_pp_trainer(
    cfg: Any, run: Any, model_dir: str, task: Any, common: dict[str, Any]
) -> RLXReinforcePPTrainer:
    """`algo: reinforce_pp`: built as GRPO is (policy, reference when beta != 0, prompts, reward functions)."""
    return build_grpo_trainer(cfg, run, model_dir, task, common, RLXReinforcePPTrainer)
