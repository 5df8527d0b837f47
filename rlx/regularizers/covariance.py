"""Token covariance of log-prob and advantage (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs",
arXiv 2505.22617, Sec. 4 and Eqs. 11-12), and the token selections of Clip-Cov and KL-Cov.

For the valid tokens of a batch, with means taken over those tokens,

    Cov_t = (log pi(y_t) - mean log pi) * (A_t - mean A)

Entropy change under policy gradient is driven by the batch mean of Cov_t (their Eq. 7-8). Clip-Cov
detaches the gradient of a random `clip_ratio` fraction of tokens with Cov_t in (lb, ub); KL-Cov puts
kl_coef * |log pi - log pi_old| on the top max(1, int(kl_ratio * n)) tokens by Cov_t. Selections follow
verl `core_algos.compute_policy_loss_{clip_cov,kl_cov}`.
"""

from __future__ import annotations

import torch

from rlx.algorithms.stats import masked_mean


def token_covariance(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t (B, C), zero off-mask. logps (B, C); advantages (B,) or (B, C); mask (B, C). Detached."""
    logps = logps.detach().float()
    mask = mask.float()
    adv = advantages.detach().float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand_as(logps)
    cov = (logps - masked_mean(logps, mask)) * (adv - masked_mean(adv, mask))
    return cov * mask


def clip_cov_selection(
    cov: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    lb: float,
    ub: float,
    generator: torch.Generator | None = None,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip-Cov: (B, C) bool of at most max(int(ratio * n_valid), 1) random tokens with lb < Cov_t < ub.

    `eligible` excludes tokens (verl excludes those the PPO clip already cut).
    """
    cand = (cov > lb) & (cov < ub) & (mask > 0)
    if eligible is not None:
        cand &= eligible
    idx = cand.reshape(-1).nonzero().squeeze(1)
    n = min(max(int(ratio * float(mask.sum())), 1), idx.numel())
    sel = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if n > 0:
        perm = torch.randperm(idx.numel(), generator=generator).to(idx.device)
        sel[idx[perm[:n]]] = True
    return sel.view_as(cov)


def kl_cov_selection(
    cov: torch.Tensor, mask: torch.Tensor, ratio: float, at_least_one: bool = False
) -> torch.Tensor:
    """KL-Cov: (B, C) bool of the k valid tokens with the largest Cov_t, k = int(ratio * n_valid).

    `at_least_one` (verl's rule): k = max(1, int(ratio * n_valid)) whenever ratio > 0 and a token is valid.
    """
    valid = mask.reshape(-1) > 0
    n_valid = int(valid.sum())
    k = int(ratio * n_valid)
    if at_least_one and ratio > 0:
        k = max(k, 1)
    n = min(k, n_valid)
    sel = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if n > 0:
        scores = torch.where(valid, cov.reshape(-1), torch.full_like(cov.reshape(-1), -torch.inf))
        sel[torch.topk(scores, n).indices] = True
    return sel.view_as(cov)
