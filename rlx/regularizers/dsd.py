"""Dynamic Spectral Dispersion (ReLaX, arXiv 2512.07558, Eq. 6).

    DSD(x) = Var(|Lambda|),   K Phi = Phi Lambda                  (paper Eq. 6: eigenvalue moduli)

The authors' code uses the singular values s_j of K instead (real, with stable gradients), a smoothed
modulus r_j = sqrt(s_j^2 + eps) (eps = 1e-3) and the unbiased variance over the m values:

    DSD = 1/(m-1) sum_j (r_j - mean(r))^2

`spectrum="svd"` (default, authors' code) or `"eig"` (paper). Only singular *values* are differentiated,
so repeated singular values (e.g. constant trajectories) keep finite gradients; eigenvalue gradients are
not stable at repeated eigenvalues.
"""

from __future__ import annotations

import torch

SPECTRA = ("svd", "eig")


def spectrum_moduli(koopman: torch.Tensor, spectrum: str = "svd") -> torch.Tensor:
    """(B, m, m) operators -> (B, m) singular values (svd, descending) or eigenvalue moduli (eig)."""
    if spectrum == "svd":
        return torch.linalg.svdvals(koopman)
    if spectrum == "eig":
        return torch.linalg.eigvals(koopman).abs()
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")


def dynamic_spectral_dispersion(
    koopman: torch.Tensor, spectrum: str = "svd", eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSD per trajectory. koopman (B, m, m) -> (dsd (B,), moduli (B, m)) with r_j = sqrt(s_j^2 + eps)."""
    s = spectrum_moduli(koopman, spectrum)
    r = torch.sqrt(s.square() + eps)
    return r.var(dim=-1, correction=1), s
