"""Masked statistics and per-token KL estimators shared by the trainers, regularizers and instruments.

Pure functions over tensors (no TRL import). Conventions: `mask` is (B, C) with 1 on the tokens that count
(ragged rows allowed); reductions never divide by a zero count. KL estimators follow Schulman 2020,
"Approximating KL divergence" (k1/k2/k3).
"""

from __future__ import annotations

import torch

# ---- masked statistics ---------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_t m_t x_t over `dim` (all dims when None). Shapes: x, mask (B, C)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean_m(x) = sum_t m_t x_t / max(sum_t m_t, 1). Shapes: x, mask (B, C); result scalar or reduced over `dim`."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """var_m(x) = sum_t m_t (x_t - mean_m(x))^2 / (N - 1) with N = sum_t m_t (N when `unbiased=False`).

    Scalar over all masked entries of x (B, C). Bessel's correction is applied when N > 1.
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    ss = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if (unbiased and n > 1) else n.clamp(min=1)
    return ss / denom


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Whitening over the mask: x_hat_t = (x_t - mu) / sqrt(sigma^2 + eps), with mu, sigma^2 = masked mean and
    unbiased variance of x over all masked entries (or the given `moments`, e.g. reduced across ranks).

    With `shift_mean=False` the mean is added back: x_hat_t = (x_t - mu) / sqrt(sigma^2 + eps) + mu.
    Shapes: x, mask (B, C) -> (B, C); padded positions are 0.
    """
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---- per-token KL estimators ---------------------------------------------------------------------------
# For a token a_t ~ pi and log r_t = log pi_ref(a_t) - log pi(a_t), each estimates KL(pi || pi_ref) per token.
# Not masked: multiply by the mask before reducing. Shapes: logps, ref_logps (B, C) -> (B, C).


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = -log r_t = log pi(a_t) - log pi_ref(a_t)   (unbiased, can be negative)."""
    return -(ref_logps - logps)


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = (log r_t)^2 / 2   (biased, low variance)."""
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = r_t - 1 - log r_t = exp(ref - logp) - (ref - logp) - 1   (unbiased, >= 0).

    Written as TRL's GRPO loss and verl's `low_var_kl` write it (exp, then subtract), so a k3 computed here
    is the one those losses use, bit for bit in the same dtype.
    """
    log_r = ref_logps - logps
    return torch.exp(log_r) - log_r - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Estimator name -> function, as configs name them (`kl_estimator`)."""


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) with the named estimator: k1, k2 or k3 (`kl_k1`, `kl_k2`, `kl_k3`)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator '{estimator}': expected k1, k2 or k3")
    return KL_ESTIMATORS[estimator](logps, ref_logps)
