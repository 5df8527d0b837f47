"""Advantage estimators as registered pure functions over tensors (no TRL import).

One function per estimator, registered by name with `@register_adv_est(name)` (verl's pattern); a trainer looks
its estimator up with `advantage_estimator(name)`. Each takes what its equation needs, so the signatures differ:

- `grpo`: group baseline, scaled by the group (or batch) std, as TRL 1.16 `GRPOTrainer` computes it
  (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, Sec. 4.1.2);
- `rloo`: leave-one-out baseline, as TRL 1.16 `RLOOTrainer` (Ahmadian et al. 2024, "Back to Basics", arXiv
  2402.14740, Eq. 5);
- `reinforce_plus_plus`: reward-to-go of the KL-shaped per-token reward, whitened over every token of the batch
  (Hu 2025, "REINFORCE++", arXiv 2501.03262, Eqs. 8-10);
- `gae`: generalized advantage estimation with a critic (`rlx.algorithms.ppo.gae`, registered here).

Conventions: N completions; the grouped estimators take rewards (N,) laid out as TRL lays out a generation batch,
`num_generations` consecutive completions per prompt. Token-level ones take (B, C) tensors with a (B, C) completion
mask, right-padded (rows may be ragged); padded positions of their outputs are 0. Computed without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rlx.algorithms.ppo import gae, token_level_rewards
from rlx.algorithms.stats import masked_whiten

ADV_ESTIMATORS: dict[str, Callable[..., object]] = {}
"""Name -> estimator, filled by `register_adv_est`."""

TRL_STD_EPS = 1e-4
"""TRL's GRPO and RLOO divide by (std + 1e-4)."""


def register_adv_est(name: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Decorator: register an advantage estimator under `name` (a second function under a taken name is an error)."""

    def deco(fn: Callable[..., object]) -> Callable[..., object]:
        if name in ADV_ESTIMATORS and ADV_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator '{name}' is registered twice")
        ADV_ESTIMATORS[name] = fn
        return fn

    return deco


def advantage_estimator(name: str) -> Callable[..., object]:
    """The estimator registered as `name`; an unknown name raises KeyError naming the registered ones."""
    if name not in ADV_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator '{name}': expected one of {', '.join(ADV_ESTIMATORS)}")
    return ADV_ESTIMATORS[name]


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample std (Bessel's correction, N - 1) over the non-NaN entries; NaN with fewer than two (TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * n / (n - 1)
    var = torch.where(n > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


@register_adv_est("grpo")
def grpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = TRL_STD_EPS,
) -> torch.Tensor:
    """Group-baseline advantage (GRPO, as TRL 1.16 computes it with `multi_objective_aggregation="sum_then_normalize"`):

    A_i = (r_i - mean_{j in g(i)} r_j) / (s + eps)

    with s = std_{j in g(i)} r_j ("group"), std over all N rewards ("batch"), or no division ("none"); stds are
    sample stds (N - 1). A group of one has s = 0. NaN rewards (unscorable completions) are left out of the means
    and stds, and their advantage is 0.

    Shapes: rewards (N,), N a multiple of `num_generations` -> (N,).
    """
    with torch.no_grad():
        grouped = rewards.view(-1, num_generations)
        baseline = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
        advantages = rewards - baseline
        if scale_rewards == "group":
            std = _nanstd(grouped, dim=1) if num_generations > 1 else rewards.new_zeros(grouped.shape[0])
            advantages = advantages / (std.repeat_interleave(num_generations) + eps)
        elif scale_rewards == "batch":
            std = _nanstd(rewards) if rewards.numel() > 1 else rewards.new_zeros(())
            advantages = advantages / (std + eps)
        elif scale_rewards != "none":
            raise ValueError(f"scale_rewards={scale_rewards!r}: expected group, batch or none")
        return torch.nan_to_num(advantages, nan=0.0)


@register_adv_est("rloo")
def rloo_advantages(
    rewards: torch.Tensor, num_generations: int, normalize: bool = False, eps: float = TRL_STD_EPS
) -> torch.Tensor:
    """Leave-one-out baseline (RLOO, as TRL 1.16 `RLOOTrainer` computes it):

    b_i = (sum_{j in g(i)} r_j - r_i) / (k - 1),   A_i = r_i - b_i  (= k / (k - 1) * (r_i - mean_g r))

    with k the number of scorable completions of the group. With `normalize`, then A_i <- (A_i - mean A) /
    (std A + eps) over the whole batch (sample std). NaN rewards are left out of the sums and get advantage 0; a
    group of one (k = 1) gets 0. Any KL penalty belongs in `rewards` (TRL: r_i - beta * sum_t KL_t per sequence).

    Shapes: rewards (N,), N a multiple of `num_generations` -> (N,).
    """
    with torch.no_grad():
        if num_generations < 2:
            return torch.zeros_like(rewards)
        grouped = rewards.view(-1, num_generations)
        k = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).to(rewards.dtype)
        baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (k - 1)
        advantages = rewards - baseline.view(-1)
        if normalize:
            advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + eps)
        return torch.nan_to_num(advantages, nan=0.0)


@register_adv_est("reinforce_plus_plus")
def reinforce_plus_plus_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, Eqs. 8-10): KL-shaped reward per token, reward-to-go, whitened over the batch:

    r_t   = -beta * KL_t + 1[t = T] * score          (T = last completion token; `ppo.token_level_rewards`)
    G_t   = sum_{k >= t} gamma^(k - t) r_k           (reward-to-go over the row's completion tokens)
    A_t   = (G_t - mu) / sqrt(sigma^2 + 1e-8)        (mu, sigma^2: mean and sample variance of G over every
                                                      completion token of the batch, or the given `moments`,
                                                      e.g. reduced across ranks)

    With gamma = 1, G_t = score - beta * sum_{k >= t} KL_k (Eq. 8). G is GAE with V = 0 and lambda = 1, which is
    how it is computed here. Whitening follows `stats.masked_whiten` (sample variance, eps inside the root).

    Shapes: scores (B,), kl (B, C), mask (B, C) -> (advantages (B, C), returns G (B, C)).
    """
    with torch.no_grad():
        rewards = token_level_rewards(scores, kl, mask, beta)
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
        return masked_whiten(returns, mask.to(returns.dtype), moments=moments), returns


register_adv_est("gae")(gae)
