"""RLOO (`algo: rloo`): REINFORCE with a leave-one-out baseline, on TRL's GRPO machinery like rlx's PPO.

Advantage (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740, Eq. 5), the registered estimator
`rlx.algorithms.advantages.rloo_advantages` over the weighted sum of the reward functions:

    A_i = r_i - 1/(k - 1) * sum_{j in g(i), j != i} r_j        (k completions of the prompt)

optionally normalised over the batch, (A - mean A) / (std A + 1e-4), which is TRL 1.16 `RLOOConfig`'s
`normalize_advantages`; here that is `trainer.scale_rewards: batch` (`none` by default, the spec's
`config_defaults` in rlx/trainers/catalog.py; `group` is refused: RLOO has no per-group scaling). Unscorable
completions (every reward function returned None) are left out of the baseline and get advantage 0, as in TRL.

Why `RLXGRPOTrainer` and not `trl.RLOOTrainer`: TRL's RLOOTrainer is a separate copy of the GRPO machinery whose
loss takes one importance ratio per *sequence* (exp of the summed log-ratio) and whose rollout carries only summed
`old_logps`, no per-token old or reference log-probs. Subclassed, it would need its own copies of what
`RLXGRPOTrainer` already has (resumable sampler, rollout dumps, prompt-group and sample ids, exact-resume state),
and gradient alignment's loss split (rlx/alignment/functional.py: per-token ratio, clip, k3 KL) and ReLaX's
reference scoring would need an RLOO branch. On `RLXGRPOTrainer` the only change is the advantage, one override of
`_generate_and_score_completions` that calls `super()`: every instrument, dump and the eval loop run as on GRPO,
and the spec's facts are GRPO's.

What differs from `trl.RLOOTrainer`: the loss is TRL GRPO's `trainer.loss_type`. With `loss_type: dr_grpo` (RLOO's
default) and one optimizer step per rollout (ratio 1) its gradient is -1/(B * L) sum_i A_i grad sum_t
log pi(y_it), i.e. TRL RLOO's -1/B sum_i A_i grad log pi(y_i) up to the constant 1/L (`max_completion_length`);
with several steps per rollout the clip is per token (GRPO's) rather than per sequence. `trainer.beta` is GRPO's
per-token k3 KL term in the loss, not TRL RLOO's k1 KL folded into the reward.
"""

from __future__ import annotations

from typing import Any

import torch

from rlx.algorithms.advantages import advantage_estimator
from rlx.errors import UserError
from rlx.instruments.base import log_metrics
from rlx.trainers.grpo import RLXGRPOTrainer, build_grpo_trainer


class RLXRLOOTrainer(RLXGRPOTrainer):
    """GRPO's rollout and loss with the leave-one-out advantage (constructor and `args` as `RLXGRPOTrainer`)."""

    rlx_algo = "rloo"
    _tag_names = ["trl", "rloo", "rlx"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.scale_rewards not in ("none", "batch"):
            raise UserError(
                f"trainer.scale_rewards={self.scale_rewards!r} with algo=rloo: expected none (plain leave-one-out "
                "advantages) or batch (normalised over the batch, TRL's normalize_advantages)."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise UserError(
                f"trainer.multi_objective_aggregation={self.multi_objective_aggregation!r} with algo=rloo: RLOO "
                "scores the weighted sum of the reward functions; use sum_then_normalize."
            )

    def rloo_advantages(self, rewards_per_func: torch.Tensor, num_generations: int) -> torch.Tensor:
        """(N, n_funcs) rewards of the whole generation batch (all ranks) -> (N,) advantages, by the registered
        `rloo` estimator on the weighted sum (NaN where every function returned None, as TRL)."""
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        w = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        estimate = advantage_estimator("rloo")
        return estimate(rewards, num_generations, normalize=self.scale_rewards == "batch")

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        k = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = self.rloo_advantages(self._rlx_rewards_per_func, k)
        n = out["completion_ids"].size(0)
        i0 = self.accelerator.process_index * n
        # In place: the rollout dump queued by RLXGRPOTrainer holds this dict.
        out["advantages"] = advantages[i0 : i0 + n].to(out["advantages"].dtype)
        logged = self._logs["advantages"]  # TRL's completions table: GRPO's values -> the ones the loss uses
        for _ in range(min(len(logged), advantages.numel())):
            logged.pop()
        logged.extend(advantages.tolist())
        # the advantages of every rank's completions: already global
        log_metrics(self, {"rloo/advantage_abs_mean": advantages.abs().mean()}, reduce="none", mode=mode)
        return out


def build_rloo_trainer(
    cfg: Any, run: Any, model_dir: str, task: Any, common: dict[str, Any]
) -> RLXRLOOTrainer:
    """`algo: rloo`: built as GRPO is (RLOO's training-argument defaults are the spec's `config_defaults`)."""
    return build_grpo_trainer(cfg, run, model_dir, task, common, RLXRLOOTrainer)
