"""Koopman operator of a hidden-state trajectory by EDMD with ridge (ReLaX, arXiv 2512.07558, Sec. 3.2).

A trajectory is the sequence of last-layer states h_0 .. h_{T-1} (one per completion position). It is
lifted by a frozen dictionary psi(h) = sigmoid(W h) (W: (m, d), no bias; ResKoopNet arXiv 2501.00701),
and the linear operator that best advances the lifted states one step is fitted per trajectory:

    Px = [psi(h_0); ..; psi(h_{T-2})],  Py = [psi(h_1); ..; psi(h_{T-1})]      (rows: valid transitions)
    K  = (Px^T Px + lambda I)^-1 Px^T Py                                      (Py ~ Px K)

The paper's Eq. 5 is the pseudo-inverse DMD solution; the ridge solve is the authors' code (lambda 1e-3).
Only transitions whose two ends are real completion positions enter the sums, so padding never matters.
"""

from __future__ import annotations

import torch


def dictionary_features(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """psi(h) = sigmoid(W h). hidden (..., d), weight W (m, d) -> (..., m), in fp32 (fp64 stays fp64)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return torch.sigmoid(hidden.to(dtype) @ weight.to(dtype).t())


def transition_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position mask -> (B, T-1) float mask of transitions t -> t+1 with both ends valid."""
    m = mask.float()
    return m[:, :-1] * m[:, 1:]


def koopman_operator(
    features: torch.Tensor, mask: torch.Tensor | None = None, ridge: float = 1e-3
) -> torch.Tensor:
    """Batched per-trajectory EDMD operator K_i = (Px_i^T Px_i + lambda I)^-1 Px_i^T Py_i.

    features: (B, T, m) lifted states psi(h); mask: (B, T) valid positions (None = all valid).
    Returns K: (B, m, m) with Py ~ Px K. A trajectory without a valid transition gets K = 0.
    With fewer transitions than features (T-1 < m) the identical push-through form
    K = Px^T (Px Px^T + lambda I)^-1 Py is solved instead ((T-1)-sized system, much cheaper).
    """
    px, py = features[:, :-1], features[:, 1:]
    if mask is not None:
        v = transition_mask(mask).unsqueeze(-1)
        px, py = px * v, py * v  # zero rows drop out of every sum
    n, m = px.shape[1], px.shape[2]
    if n < m:
        eye = torch.eye(n, dtype=px.dtype, device=px.device)
        return px.transpose(1, 2) @ torch.linalg.solve(px @ px.transpose(1, 2) + ridge * eye, py)
    eye = torch.eye(m, dtype=px.dtype, device=px.device)
    return torch.linalg.solve(px.transpose(1, 2) @ px + ridge * eye, px.transpose(1, 2) @ py)
