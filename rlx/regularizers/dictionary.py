"""Learning the Koopman dictionary W (ReLaX, arXiv 2512.07558, Eq. 8 and Alg. 1; ResKoopNet arXiv 2501.00701).

Paper (Eq. 8): W = argmin 1/(B R) || (V+ - K V) Phi ||_F^2 with Phi the eigenvectors of K, i.e. the
residual of the Koopman eigenpairs (ResDMD). The authors' code uses a real-valued surrogate, which is
the default here: per minibatch of trajectories one shared K is fitted (ridge, all valid transitions),
K = U S Vh, and

    loss = || Py Vh - Px Vh diag(S) ||_F / n_trajectories          (norm not squared, Vh as returned)

trained with Adam on detached last-layer states (first 512 completion positions) of a rollout batch
gathered from every rank. The authors run one epoch, which is 16-128 Adam steps at their batch sizes;
rlx takes a fixed step budget (`steps`, default 128 in the config), revisiting the trajectories in seeded
shuffled epochs when there are fewer than steps x batch_size of them, so a small batch is still fitted
rather than nudged by a handful of steps. W is initialised Kaiming-uniform with a = sqrt(7) (bound
sqrt(0.75 / d)) from a private generator (the authors reset the global seed; we do not), then frozen for RL
until the next refit.
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


def dataset_loss(
    weight: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, ridge: float, batch_size: int
) -> float:
    """Mean `residual_loss` over consecutive minibatches of `batch_size` trajectories (fixed order, no grad):
    the fit objective on the whole fitting set, comparable before and after a fit."""
    vals = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch_size):
            v = residual_loss(
                weight, hidden[start : start + batch_size], mask[start : start + batch_size], ridge
            )
            if torch.isfinite(v):
                vals.append(float(v))
    return sum(vals) / len(vals) if vals else float("nan")


def usable_trajectories(
    hidden: torch.Tensor, mask: torch.Tensor, max_positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached fp32 states truncated to `max_positions`, without the trajectories that have no transition."""
    hidden = hidden.detach().float()[:, :max_positions]
    mask = mask.detach().float()[:, :max_positions]
    keep = transition_mask(mask).sum(1) > 0
    return hidden[keep], mask[keep]


def fit_dictionary(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    dict_size: int = 50,
    ridge: float = 1e-3,
    lr: float = 1e-3,
    batch_size: int = 64,
    epochs: int = 1,
    steps: int = 0,
    max_positions: int = 512,
    seed: int = 42,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Fit W on detached trajectories hidden (N, T, d) with mask (N, T); returns (W (m, d), losses per step).

    Minibatches of `batch_size` trajectories in a seeded random order (a fresh permutation per epoch);
    trajectories with no valid transition are dropped. `steps` > 0 takes exactly that many minibatches
    (as many epochs as needed, the last one cut short); `steps` = 0 runs `epochs` full epochs instead (the
    authors' one epoch). `init` continues from an existing W (refits). `losses[k]` is the minibatch residual
    at step k, before that step's update; a step whose gradient is not finite (repeated singular values)
    is skipped and leaves no entry.
    """
    hidden, mask = usable_trajectories(hidden, mask, max_positions)
    w0 = (
        init.detach().clone().float()
        if init is not None
        else init_dictionary(dict_size, hidden.shape[-1], seed)
    )
    weight = torch.nn.Parameter(w0)
    n = hidden.shape[0]
    if n == 0:
        return weight.detach(), []
    per_epoch = math.ceil(n / batch_size)
    total = int(steps) if steps > 0 else int(epochs) * per_epoch
    opt = torch.optim.Adam([weight], lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    order = torch.randperm(n, generator=gen)
    with torch.enable_grad():
        for k in range(total):
            j = k % per_epoch
            if j == 0 and k > 0:
                order = torch.randperm(n, generator=gen)
            idx = order[j * batch_size : (j + 1) * batch_size]
            loss = residual_loss(weight, hidden[idx], mask[idx], ridge)
            opt.zero_grad()
            loss.backward()
            if not (torch.isfinite(loss) and torch.isfinite(weight.grad).all()):
                continue  # singular-vector grads blow up at repeated singular values: skip, keep W sane
            opt.step()
            losses.append(float(loss.detach()))
    return weight.detach(), losses
