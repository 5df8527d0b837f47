"""ReLaX policy-loss terms (arXiv 2512.07558, Eqs. 9-11), as the authors' code implements them.

Advantage-shaped exploration loss over a set G of responses (Eq. 10; minimised, so it raises A+ * DSD):

    L_xp = log( 1/|G| sum_{i in G} exp(-z_i) ),   z_i = max(A_i, 0) * DSD_i

with z_i detached where DSD_i > xi (no further push once over the cap; authors' README and code). Its
gradient is the softmin  dL_xp/dDSD_i = -(1/R) a_i exp(-a_i d_i) / mean_j exp(-a_j d_j), which
saturates as a*d grows; a_i = 0 trajectories get no gradient but still count in the mean.

Adaptive KL (Eq. 11, the set I = {i : DSD_i > xi}; code: only positive-advantage trajectories):

    KL_adapt = token-mean over all completion tokens of  M_i * clamp(k3_{i,t}, -10, 10),
    M_i = [A_i > 0 and DSD_i > xi],   k3 = exp(ref - logp) - (ref - logp) - 1

The denominator counts every completion token of the micro-batch, masked or not (authors' code).
"""

from __future__ import annotations

import torch

from rlx.algorithms.stats import kl_k3


def positive_advantage(
    advantages: torch.Tensor, lengths: torch.Tensor | None = None, max_length: int | None = None
) -> torch.Tensor:
    """a_i = max(A_i, 0); with `lengths` and `max_length` (code_compat) a_i = max(A_i, 0) * L_i / L_max."""
    a = advantages.float().clamp_min(0.0)
    if lengths is not None and max_length:
        a = a * lengths.float() / float(max_length)
    return a


def kl_mask(a: torch.Tensor, dsd: torch.Tensor, xi: float) -> torch.Tensor:
    """M_i = [a_i > 0 and DSD_i > xi], (B,) bool."""
    return (a > 0) & (dsd.detach() > xi)


def exploration_loss(
    dsd: torch.Tensor, a: torch.Tensor, group_ids: torch.Tensor | None, xi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_xp averaged over sets, each weighted by its share of the batch.

    dsd (B,) in the graph, a (B,) >= 0, group_ids (B,) ints (None = the whole micro-batch is one set).
    Returns (loss scalar, z (B,) after the stop-gradient). For equal-size groups this is the plain mean
    of the per-group log-mean-exp; a batch of one group reduces exactly to Eq. 10.
    """
    mask = kl_mask(a, dsd, xi)
    z = a * torch.where(mask, dsd.detach(), dsd)
    if group_ids is None:
        group_ids = torch.zeros_like(z, dtype=torch.long)
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    # log-mean-exp per group, stabilised by the group max of -z.
    neg = -z
    gmax = torch.full((n_groups,), -torch.inf, dtype=neg.dtype, device=neg.device)
    gmax = gmax.scatter_reduce(0, inv, neg.detach(), reduce="amax")
    sums = torch.zeros(n_groups, dtype=neg.dtype, device=neg.device).index_add(
        0, inv, torch.exp(neg - gmax[inv])
    )
    lme = torch.log(sums / counts.to(neg.dtype)) + gmax
    weights = counts.to(neg.dtype) / z.numel()
    return (weights * lme).sum(), z


def adaptive_kl(
    logps: torch.Tensor, ref_logps: torch.Tensor, token_mask: torch.Tensor, traj_mask: torch.Tensor
) -> torch.Tensor:
    """token-mean(M_i * clamp(k3, -10, 10)). logps, ref_logps, token_mask (B, C); traj_mask (B,) bool."""
    kl = kl_k3(logps.float(), ref_logps.float()).clamp(-10.0, 10.0)
    w = token_mask.float() * traj_mask.float().unsqueeze(1)
    return (kl * w).sum() / token_mask.float().sum().clamp_min(1.0)
