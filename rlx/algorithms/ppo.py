"""PPO math as pure functions over tensors (no TRL import).

References: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv 1707.06347, Eq. 7 clipped
surrogate); Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation" (arXiv 1506.02438, Eq. 16); Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (arXiv 1909.08593, Eq. 2 KL-shaped reward, adaptive KL controller); Ye et al. 2020, "Mastering
Complex Control in MOBA Games with Deep RL" (arXiv 1912.09729, dual clip). Masked statistics (`masked_mean`,
`masked_whiten`) and the KL estimators (`kl_estimate`) are in rlx/algorithms/stats.py.

Conventions: B sequences, C completion positions, right-padded. `mask` is (B, C) with 1 on completion tokens
(it may be ragged: each row has its own length). Every reduction goes through the mask; padded positions of
every returned per-token tensor are 0 unless stated otherwise. Functions never divide by a zero count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlx.algorithms.stats import masked_var

# ---- rewards ------------------------------------------------------------------------------------------


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask (B, C) -> (B,) long; 0 for an empty row."""
    c = mask.shape[1]
    pos = torch.arange(c, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL-shaped per-token reward (Ziegler et al. 2019, Eq. 2):

    r_t = -beta * kl_t + 1[t = T] * score,   T = last completion token of the sequence.

    Shapes: scores (B,), kl (B, C), mask (B, C) -> (B, C); padded positions are 0. A row with an empty mask
    receives no score.
    """
    r = -beta * kl * mask
    last = last_token_index(mask)
    has_tokens = mask.sum(1) > 0
    bonus = torch.zeros_like(r)
    bonus[torch.arange(r.shape[0], device=r.device), last] = scores.to(r.dtype) * has_tokens.to(r.dtype)
    return r + bonus


# ---- advantages ----------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the completion mask (Schulman et al. 2016, Eq. 16):

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V(s_t)                     (the value target, "returns")

    where t+1 is the next *masked* position of the row; after the last completion token the episode ends
    (EOS or truncation), so V(s_{T+1}) = 0 and A_{T+1} = 0. Positions with mask 0 are skipped (their
    reward and value do not enter), which also handles holes in the mask.

    Shapes: rewards, values, mask (B, C) -> advantages (B, C), returns (B, C); padded positions are 0.
    Computed without gradient in the dtype of `values`.
    """
    with torch.no_grad():
        m = mask.to(values.dtype)
        rewards = rewards.to(values.dtype) * m
        values = values * m
        b, c = values.shape
        next_value = values.new_zeros(b)
        next_adv = values.new_zeros(b)
        adv = torch.zeros_like(values)
        for t in reversed(range(c)):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            a_t = delta + gamma * lam * next_adv
            mt = m[:, t]
            adv[:, t] = a_t * mt
            next_adv = mt * a_t + (1 - mt) * next_adv
            next_value = mt * values[:, t] + (1 - mt) * next_value
        returns = (adv + values) * m
    return adv, returns


# ---- losses --------------------------------------------------------------------------------------------


@dataclass
class PolicyLossOutput:
    """Per-token pieces of the clipped policy loss, all (B, C)."""

    loss: torch.Tensor
    """Per-token loss L_t (in the graph). Reduce with `masked_mean(loss, mask)`."""
    ratio: torch.Tensor
    """rho_t = pi_theta / pi_old (in the graph)."""
    clipped: torch.Tensor
    """Float 1 where the clipped branch is active (the token has no gradient from the surrogate)."""
    dual_clipped: torch.Tensor
    """Float 1 where the dual-clip bound -c * A_t is active (A_t < 0 only)."""


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7) with asymmetric range and optional dual clip:

    rho_t = exp(log pi_theta(a_t) - log pi_old(a_t))
    L_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - epsilon, 1 + epsilon_high))
    dual clip (c > 1, Ye et al. 2020), for A_t < 0 only:  L_t = min(L_t, -c * A_t)

    epsilon_high defaults to epsilon. Shapes: logps, old_logps, advantages (B, C) (advantages may be (B, 1)).
    Returns per-token values; reduce them with the mask (`masked_mean`).
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_hi)
    loss = torch.maximum(unclipped, clipped_obj)
    is_clipped = (clipped_obj > unclipped).to(logps.dtype)
    dual = torch.zeros_like(loss)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (got {dual_clip}); use None to disable it")
        bound = -dual_clip * advantages
        neg = (advantages < 0).expand_as(loss)
        dual = (neg & (loss > bound)).to(logps.dtype)
        loss = torch.where(neg, torch.minimum(loss, bound), loss)
    return PolicyLossOutput(loss=loss, ratio=ratio, clipped=is_clipped, dual_clipped=dual)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped value loss (as in OpenAI baselines ppo2 / Ziegler et al. 2019):

    V^clip_t = V_old,t + clip(V_t - V_old,t, -c, c)
    L^V_t    = 1/2 * max((V_t - R_t)^2, (V^clip_t - R_t)^2)

    With `cliprange_value=None` the loss is 1/2 (V_t - R_t)^2. Shapes: (B, C) -> (per-token loss (B, C) in the
    graph, float indicator (B, C) of tokens where the clipped branch is active).
    """
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)


def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    variances: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """EV = 1 - Var_m[R - V] / Var_m[R] over masked tokens (1 = perfect critic, 0 = constant, < 0 = worse).

    `variances` = (Var_m[R - V], Var_m[R]) given instead of computed from the tensors (e.g. reduced across
    ranks). Shapes: (B, C) -> scalar; NaN when Var_m[R] = 0.
    """
    if variances is None:
        variances = (masked_var(returns - values, mask), masked_var(returns, mask))
    var_res, var_r = variances
    if var_r.item() == 0:
        return torch.tensor(float("nan"), dtype=values.dtype)
    return 1.0 - var_res / var_r


# ---- KL coefficient ------------------------------------------------------------------------------------


class FixedKLController:
    """beta stays constant."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: D401 - same interface as adaptive
        """No-op."""


class AdaptiveKLController:
    """Adaptive beta (Ziegler et al. 2019, Sec. 2.2):

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    where KL_t is the mean per-sequence KL of the last rollout batch and n_steps the number of samples it held.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
