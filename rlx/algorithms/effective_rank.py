"""Effective rank of hidden-state trajectories and its differences over response prefixes (the `hidden_rank`
monitor, rlx/instruments/hidden_rank.py; docs/probes.md).

A trajectory is the (T, d) matrix X of a response's last-layer states, one row per response token. With
singular values s_1 >= ... >= s_r of X (centred over its rows by default: X - 1 mean(X)),

    p_j = s_j / sum_k s_k,        H(X) = -sum_j p_j log p_j   (nats, 0 log 0 = 0),
    erank(X) = exp(H(X))          (form="exp", Roy & Vetterli's effective rank; in [1, r])
             = H(X)               (form="entropy", the entropy itself; in [0, log r]).

Prefixes follow the hidden-state RLVR code (hf618/VERL, `verl/trainer/metrics_utils.py`): with stride s the
windows are the first j*s + 1 tokens, j = 1, 2, ... while j*s < T (the whole response is a window only when
s divides T - 1). Over the prefix values e_1, e_2, ... of one trajectory:

    running_mean (theirs):  d1_j = e_j - mean(e_1 .. e_{j-1})       (j >= 2)
    consecutive:            d1_j = e_j - e_{j-1}                    (j >= 2)
    both:                   d2_j = d1_j - d1_{j-1}                  (j >= 3)

and a trajectory's d1 (d2) is the mean of its d1_j (d2_j): NaN when it has none (their code writes 0 there).

Every function is batched over trajectories with a ragged (B, T) mask; padding never changes a value.
Spectra are computed in float64 from the smaller Gram matrix (X X^T or X^T X: eigenvalues s_j^2), with
eigenvalues below n * eps_64 * lambda_max (n the Gram size) set to 0, so padding rows and round-off add no mass.
An all-zero matrix (no valid row; one row once centred) has no spectrum: its value is NaN.
"""

from __future__ import annotations

import torch

FORMS = ("exp", "entropy")
"""exp: erank = exp(H) (default, the reference code's "Effective Rank"); entropy: H itself (the issue's wording,
their "Log Effective Rank")."""
DIFFS = ("running_mean", "consecutive")
"""How a prefix value is compared with the earlier ones (module docstring): running_mean is the reference code's."""


def singular_values(x: torch.Tensor, mask: torch.Tensor | None = None, center: bool = True) -> torch.Tensor:
    """(..., T, d) states, (..., T) mask -> (..., min(T, d)) singular values of each masked (and, with `center`,
    row-centred) matrix, descending, float64; padding rows count as absent.

    Centring subtracts the mean of the valid rows only; padding rows are zero afterwards.
    """
    x = x.detach().double()
    if mask is None:
        m = torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
    else:
        m = mask.detach().to(device=x.device, dtype=torch.float64)
    m = m.unsqueeze(-1)
    x = x * m
    if center:
        n = m.sum(-2, keepdim=True).clamp_min(1.0)
        x = (x - x.sum(-2, keepdim=True) / n) * m
    t, d = x.shape[-2:]
    gram = x @ x.mT if t <= d else x.mT @ x
    lam = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)
    tol = lam[..., :1] * gram.shape[-1] * torch.finfo(torch.float64).eps
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    return lam.sqrt()


def spectral_entropy(s: torch.Tensor) -> torch.Tensor:
    """(..., r) non-negative singular values -> (...,) Shannon entropy (nats) of p = s / sum(s); NaN where
    sum(s) = 0."""
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    h = -torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(s.dtype).tiny)), torch.zeros_like(p)).sum(
        -1
    )
    return torch.where(total.squeeze(-1) > 0, h, torch.full_like(h, float("nan")))


def effective_rank(
    x: torch.Tensor, mask: torch.Tensor | None = None, center: bool = True, form: str = "exp"
) -> torch.Tensor:
    """(..., T, d) states, (..., T) mask -> (...,) exp(H) (form="exp") or H (form="entropy") of the normalised
    singular values; NaN for an all-zero matrix."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    h = spectral_entropy(singular_values(x, mask, center))
    return torch.exp(h) if form == "exp" else h


def compact(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the front, in order: (B, T, d), (B, T) -> the same shapes and the
    lengths (B,). The mask is then `arange(T) < lengths`."""
    valid = mask.detach().bool()
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x, valid.sum(1)


def prefix_lengths(length: int, stride: int) -> list[int]:
    """Window lengths j*stride + 1 for j = 1, 2, ... while j*stride < `length` (the reference code's prefixes)."""
    if stride < 1:
        raise ValueError(f"stride={stride}: expected >= 1")
    return [j * stride + 1 for j in range(1, (max(int(length), 1) - 1) // stride + 1)]


def prefix_effective_ranks(
    x: torch.Tensor, mask: torch.Tensor, stride: int, center: bool = True, form: str = "exp"
) -> torch.Tensor:
    """(B, T, d) states, (B, T) mask -> (B, J) effective rank of each trajectory's prefix windows
    (`prefix_lengths`: prefix j has j*stride + 1 valid tokens), NaN past a trajectory's last window.

    Windows count valid tokens: a mask with holes is compacted first (`compact`)."""
    x, lengths = compact(x, mask)
    n_max = int(lengths.max()) if lengths.numel() else 0
    ends = prefix_lengths(n_max, stride)
    out = torch.full((x.shape[0], len(ends)), float("nan"), dtype=torch.float64, device=x.device)
    for j, k in enumerate(ends):
        active = (lengths >= k).nonzero().squeeze(1)
        if active.numel():
            out[active, j] = effective_rank(x[active, :k], None, center, form)
    return out


def prefix_differences(values: torch.Tensor, mode: str = "running_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, J) prefix values (NaN = absent) -> first and second differences d1, d2, (B, J) each, NaN where
    undefined (module docstring). A non-finite value is left out: it gets no d1 and is not in later running
    means."""
    if mode not in DIFFS:
        raise ValueError(f"mode={mode!r}: expected one of {DIFFS}")
    v = values.double()
    ok = torch.isfinite(v)
    nan = torch.full_like(v, float("nan"))
    d1 = nan.clone()
    if v.shape[1] >= 2:
        if mode == "running_mean":
            sums = torch.cumsum(torch.where(ok, v, torch.zeros_like(v)), 1)
            counts = torch.cumsum(ok.double(), 1)
            prev_sum, prev_n = sums[:, :-1], counts[:, :-1]
            base = prev_sum / prev_n.clamp_min(1.0)
            d1[:, 1:] = torch.where(ok[:, 1:] & (prev_n > 0), v[:, 1:] - base, nan[:, 1:])
        else:
            d1[:, 1:] = torch.where(ok[:, 1:] & ok[:, :-1], v[:, 1:] - v[:, :-1], nan[:, 1:])
    d2 = nan.clone()
    if v.shape[1] >= 3:
        d2[:, 2:] = d1[:, 2:] - d1[:, 1:-1]  # NaN wherever either is
    return d1, d2


def row_nanmean(v: torch.Tensor) -> torch.Tensor:
    """(B, J) -> (B,) mean of each row's finite entries; NaN for a row without any."""
    ok = torch.isfinite(v)
    n = ok.sum(1)
    s = torch.where(ok, v, torch.zeros_like(v)).sum(1)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


def trajectory_ranks(
    x: torch.Tensor,
    mask: torch.Tensor,
    stride: int,
    center: bool = True,
    form: str = "exp",
    diff: str = "running_mean",
    max_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """Per trajectory of (B, T, d) states under a (B, T) mask, float64 (B,) tensors (with `max_tokens` > 0 only
    each trajectory's first `max_tokens` valid tokens count, everywhere below):

    - `erank`: effective rank of the whole response (all valid tokens);
    - `d1`, `d2`: means of the first / second prefix differences (NaN when the response has fewer than 2 / 3
      prefix windows, i.e. fewer than 2*stride + 1 / 3*stride + 1 tokens);
    - `n_prefixes`: the number of prefix windows.
    """
    x, lengths = compact(x, mask)
    if max_tokens and max_tokens > 0:
        x, lengths = x[:, : int(max_tokens)], lengths.clamp_max(int(max_tokens))
    full = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
    erank = effective_rank(x, full, center, form)
    prefixes = prefix_effective_ranks(x, full, stride, center, form)
    d1, d2 = prefix_differences(prefixes, diff)
    return {
        "erank": erank,
        "d1": row_nanmean(d1),
        "d2": row_nanmean(d2),
        "n_prefixes": (lengths - 1).clamp_min(0) // int(stride),
    }
