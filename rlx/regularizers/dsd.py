"""Dynamic Spectral Dispersion (ReLaX, arXiv 2512.07558, Eq. 6).

    DSD(x) = Var(|Lambda|),   K Phi = Phi Lambda                  (paper Eq. 6: eigenvalue moduli)

The authors' code uses the singular values s_j of K instead (real, with stable gradients), a smoothed
modulus r_j = sqrt(s_j^2 + eps) (eps = 1e-3) and the unbiased variance over the m values:

    DSD = 1/(m-1) sum_j (r_j - mean(r))^2

`spectrum="svd"` (default, authors' code) or `"eig"` (paper). With `eig`, eps = 0 gives Eq. 6 exactly,
r_j = |lambda_j| (no smoothing; the gradient of |lambda| at 0 is taken as 0); eps > 0 smooths the moduli
like the svd path. Only singular *values* are differentiated, so repeated singular values (e.g. constant
trajectories) keep finite gradients; eigenvalue gradients are not stable at repeated eigenvalues.
"""

from __future__ import annotations

import torch

SPECTRA = ("svd", "eig")


def spectrum_moduli(koopman: torch.Tensor, spectrum: str = "svd") -> torch.Tensor:
    """(B, m, m) operators -> (B, m) squared singular values s_j^2 (svd, descending) or |eigenvalues| (eig).

    s_j^2 are the eigenvalues of K^T K (symmetric eigensolver): the same numbers as squared SVD values at a
    fraction of the cost, and their gradient V diag(g) V^T stays finite at repeated values.
    """
    if spectrum == "svd":
        return torch.linalg.eigvalsh(koopman.transpose(-1, -2) @ koopman).flip(-1).clamp_min(0.0)
    if spectrum == "eig":
        return torch.linalg.eigvals(koopman).abs()
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")


def _dispersion(sq: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(sq + eps).var(dim=-1, correction=1)


def dynamic_spectral_dispersion(
    koopman: torch.Tensor, spectrum: str = "svd", eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSD per trajectory. koopman (B, m, m) -> (dsd (B,), moduli (B, m)), r_j = sqrt(s_j^2 + eps).

    moduli are the singular values s_j (svd) or eigenvalue moduli |lambda_j| (eig), descending for svd.
    For eig with eps = 0, r_j = |lambda_j| (paper Eq. 6), computed without a square root so that zero
    eigenvalues keep a finite gradient.
    """
    if spectrum == "svd":
        sq = spectrum_moduli(koopman, "svd")
        return _dispersion(sq, eps), sq.detach().sqrt()
    mod = spectrum_moduli(koopman, spectrum)
    if eps == 0:
        return mod.var(dim=-1, correction=1), mod.detach()
    return _dispersion(mod.square(), eps), mod.detach()


@torch.no_grad()
def dispersion_from_features(
    features: torch.Tensor, mask: torch.Tensor | None, ridge: float = 1e-3, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-free singular-value DSD straight from lifted states (B, T, m); same values as
    `dynamic_spectral_dispersion(koopman_operator(...))`, in float64.

    With n = T-1 < m transitions, K = Px^T M (M = (Z + lambda I)^-1 Py, Z = Px Px^T) has rank <= n and
    the nonzero s_j^2 are the eigenvalues of the n x n matrix Z^1/2 M M^T Z^1/2; the other m - n are 0.
    """
    from rlx.regularizers.koopman import koopman_operator, transition_mask

    x = features.detach().double()
    m = x.shape[-1]
    n = x.shape[1] - 1
    if n >= m:
        k = koopman_operator(x, None if mask is None else mask.double(), ridge)
        dsd, s = dynamic_spectral_dispersion(k, "svd", eps)
        return dsd.to(features.dtype), s.to(features.dtype)
    px, py = x[:, :-1], x[:, 1:]
    if mask is not None:
        v = transition_mask(mask.double()).unsqueeze(-1)
        px, py = px * v, py * v
    z = px @ px.transpose(1, 2)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    mm = torch.linalg.solve(z + ridge * eye, py)
    evals, evecs = torch.linalg.eigh(z)
    zh = evecs @ torch.diag_embed(evals.clamp_min(0.0).sqrt()) @ evecs.transpose(1, 2)
    sq = torch.linalg.eigvalsh(zh @ (mm @ mm.transpose(1, 2)) @ zh).flip(-1).clamp_min(0.0)
    sq = torch.cat([sq, sq.new_zeros(sq.shape[0], m - n)], 1)
    return _dispersion(sq, eps).to(features.dtype), sq.sqrt().to(features.dtype)
