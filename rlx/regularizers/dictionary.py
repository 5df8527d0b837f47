"""Learning the Koopman dictionary W (ReLaX, arXiv 2512.07558, Eq. 8 and Alg. 1; ResKoopNet arXiv 2501.00701).

Paper (Eq. 8): W = argmin 1/(B R) || (V+ - K V) Phi ||_F^2 with Phi the eigenvectors of K, i.e. the
residual of the Koopman eigenpairs (ResDMD). The authors' code uses a real-valued surrogate, which is
the default here: per minibatch of trajectories one shared K is fitted (ridge, all valid transitions),
K = U S Vh, and

    loss = || Py Vh - Px Vh diag(S) ||_F / n_trajectories          (norm not squared, Vh as returned)

trained with Adam for one epoch on detached last-layer states (first 512 completion positions) of the
first rollout batch. W is initialised Kaiming-uniform with a = sqrt(7) (bound sqrt(0.75 / d)) from a
private generator (the authors reset the global seed; we do not), then frozen for RL.
"""

from __future__ import annotations

import math

import torch

from rlx.regularizers.koopman import dictionary_features, transition_mask


def init_dictionary(dict_size: int, hidden_size: int, seed: int = 42) -> torch.Tensor:
    """W (m, d), Kaiming-uniform with a = sqrt(7): U(-sqrt(0.75 / d), sqrt(0.75 / d))."""
    gen = torch.Generator().manual_seed(seed)
    bound = math.sqrt(0.75 / hidden_size)
    return (torch.rand(dict_size, hidden_size, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def shared_koopman(features: torch.Tensor, mask: torch.Tensor, ridge: float) -> tuple[torch.Tensor, ...]:
    """One K for all valid transitions of a batch. features (N, T, m), mask (N, T) -> (K, Px, Py, valid)."""
    v = transition_mask(mask).reshape(-1).bool()
    m = features.shape[-1]
    px = features[:, :-1].reshape(-1, m)[v]
    py = features[:, 1:].reshape(-1, m)[v]
    eye = torch.eye(m, dtype=features.dtype, device=features.device)
    k = torch.linalg.solve(px.t() @ px + ridge * eye, px.t() @ py)
    return k, px, py


def residual_loss(
    weight: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, ridge: float
) -> torch.Tensor:
    """SVD-surrogate ResKoopNet residual ||Py Vh - Px Vh diag(S)||_F / N for hidden (N, T, d), mask (N, T)."""
    feats = dictionary_features(hidden, weight)
    k, px, py = shared_koopman(feats, mask, ridge)
    _, s, vh = torch.linalg.svd(k)
    resid = py @ vh - (px @ vh) * s
    return torch.linalg.norm(resid) / hidden.shape[0]


def fit_dictionary(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    dict_size: int = 50,
    ridge: float = 1e-3,
    lr: float = 1e-3,
    batch_size: int = 64,
    epochs: int = 1,
    max_positions: int = 512,
    seed: int = 42,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Fit W on detached trajectories hidden (N, T, d) with mask (N, T); returns (W (m, d), losses per step).

    Minibatches of `batch_size` trajectories in a seeded random order; trajectories with no valid
    transition are dropped. `init` continues from an existing W (refits).
    """
    hidden = hidden.detach().float()[:, :max_positions]
    mask = mask.detach().float()[:, :max_positions]
    keep = transition_mask(mask).sum(1) > 0
    hidden, mask = hidden[keep], mask[keep]
    w0 = (
        init.detach().clone().float()
        if init is not None
        else init_dictionary(dict_size, hidden.shape[-1], seed)
    )
    weight = torch.nn.Parameter(w0)
    if hidden.shape[0] == 0:
        return weight.detach(), []
    opt = torch.optim.Adam([weight], lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(hidden.shape[0], generator=gen)
            for start in range(0, hidden.shape[0], batch_size):
                idx = order[start : start + batch_size]
                loss = residual_loss(weight, hidden[idx], mask[idx], ridge)
                opt.zero_grad()
                loss.backward()
                if not (torch.isfinite(loss) and torch.isfinite(weight.grad).all()):
                    continue  # singular-vector grads blow up at repeated singular values: skip, keep W sane
                opt.step()
                losses.append(float(loss.detach()))
    return weight.detach(), losses
