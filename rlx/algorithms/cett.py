"""H-Neurons math (arXiv 2512.01797; reference code thunlp/H-Neurons): CETT features of MLP neurons, the "3-vs-1"
labelling, an L1-regularised logistic regression, the selected set, set overlap against chance, and the share of a
gradient that falls on a set of neurons. Pure functions over tensors; the instrument is rlx/instruments/h_neurons.py.

Notation: L decoder blocks, MLP width m, model width d. In block l, z_t in R^m is the input of `mlp.down_proj` at
token t (the neuron activations), W = W_down in R^{d x m} its weight and u_t = W z_t (+ bias) its output. Neurons
are numbered flat over the model, j_flat = l * m + j (l 0-based), which is how sets and probe weights are indexed.

CETT (the neuron's share of the MLP output norm):

    CETT_{j,t} = ||W[:, j] z_{j,t}|| / ||u_t|| = |z_{j,t}| * ||W[:, j]|| / ||u_t||

normalised, as in the reference code, by the norm of the `down_proj` output itself (bias included when there is
one), plus `CETT_EPS`. Per rollout the CETT of every neuron is averaged over its answer tokens (x_ans in R^{L m})
and over its other real tokens (x_oth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CETT_EPS = 1e-8
"""Added to ||u_t|| in the denominator (the reference code's constant)."""


# ---- CETT ---------------------------------------------------------------------------------------------------


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, j]|| for a `down_proj` weight W of shape (d, m) (nn.Linear's (out, in)): (m,), float32 (float64 for
    a float64 weight)."""
    w = weight.detach()
    return w.norm(dim=0) if w.dtype == torch.float64 else w.float().norm(dim=0)


def cett(z: torch.Tensor, u: torch.Tensor, col_norms: torch.Tensor, eps: float = CETT_EPS) -> torch.Tensor:
    """CETT_{j,t} = |z_{j,t}| * ||W[:, j]|| / (||u_t|| + eps).

    z: (..., m) `down_proj` inputs, u: (..., d) its outputs at the same tokens, col_norms: (m,). Returns (..., m).
    """
    return z.abs() * col_norms / (u.norm(dim=-1, keepdim=True) + eps)


def pooled_cett(
    z: torch.Tensor,
    u: torch.Tensor,
    col_norms: torch.Tensor,
    answer: torch.Tensor,
    other: torch.Tensor,
    eps: float = CETT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout means of CETT over its answer tokens and over its other tokens, for one layer.

    z: (B, S, m), u: (B, S, d), col_norms: (m,), answer / other: (B, S) bool (disjoint). Returns x_ans, x_oth, each
    (B, m) in z's dtype: x_ans[b] = mean over t with answer[b, t] of CETT[b, t], NaN rows where the region is empty.
    Only the tokens of the two regions are computed (padding never enters, not even as 0 * NaN).
    """
    answer, other = answer.bool(), other.bool()
    if answer.shape != z.shape[:2] or other.shape != z.shape[:2]:
        raise ValueError(
            f"masks {tuple(answer.shape)} / {tuple(other.shape)} do not match z {tuple(z.shape[:2])}"
        )
    real = answer | other
    b, t = real.nonzero(as_tuple=True)
    c = cett(z[b, t], u[b, t], col_norms.to(z.device, z.dtype), eps)  # (N, m)
    is_ans = answer[b, t]
    out = []
    for sel in (is_ans, ~is_ans):
        n = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype).index_add_(
            0, b[sel], torch.ones_like(b[sel], dtype=z.dtype)
        )
        s = torch.zeros(z.shape[0], z.shape[-1], device=z.device, dtype=z.dtype).index_add_(0, b[sel], c[sel])
        out.append(torch.where(n[:, None] > 0, s / n.clamp_min(1)[:, None], torch.nan))
    return out[0], out[1]


# ---- token regions ------------------------------------------------------------------------------------------


def answer_token_mask(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    eos_token_id: int | None,
    answer_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C) bool: the answer tokens of each completion.

    Answer tokens = the completion's real tokens (mask 1) from `answer_start[b]` on (0 when None; a start >= C
    means no answer), minus a trailing EOS (the last real token when it is `eos_token_id`).
    """
    mask = completion_mask.bool()
    c = mask.shape[1]
    pos = torch.arange(c, device=mask.device)
    ans = mask.clone()
    if answer_start is not None:
        ans &= pos[None, :] >= answer_start.to(mask.device)[:, None]
    if eos_token_id is not None:
        n = mask.long().sum(1)
        last = (n - 1).clamp_min(0)
        is_eos = (n > 0) & (completion_ids.gather(1, last[:, None]).squeeze(1) == eos_token_id)
        ans &= ~((pos[None, :] == last[:, None]) & is_eos[:, None])
    return ans


def token_regions(
    prompt_mask: torch.Tensor, completion_mask: torch.Tensor, answer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer, other) masks (B, P + C) over the loss forward's input cat(prompt, completion): answer tokens as
    given (B, C); other = the real prompt tokens and the completion's real non-answer tokens (its EOS included)."""
    comp = completion_mask.bool()
    ans = answer.bool() & comp
    zeros = torch.zeros_like(prompt_mask, dtype=torch.bool)
    return torch.cat([zeros, ans], 1), torch.cat([prompt_mask.bool(), comp & ~ans], 1)


def marker_answer_start(token_texts: list[str], marker: str) -> int:
    """Index of the first answer token of a completion given its tokens' texts: the first token that ends after the
    end of the last occurrence of `marker` in their concatenation (a token straddling the marker's end counts as
    answer). len(token_texts) when the marker is absent or nothing follows it."""
    text = "".join(token_texts)
    at = text.rfind(marker) if marker else -1
    if at < 0:
        return len(token_texts)
    end, offset = at + len(marker), 0
    for i, piece in enumerate(token_texts):
        offset += len(piece)
        if offset > end:
            return i
    return len(token_texts)


# ---- labels -------------------------------------------------------------------------------------------------


def consistent_groups(wrong: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rollouts of groups (prompts) whose valid rollouts, at least two, are all wrong or all right (the
    paper's consistency filter; in GRPO, the zero-advantage groups). Invalid rollouts are never kept."""
    wrong, valid = wrong.bool(), valid.bool()
    _, inv = torch.unique(group_ids, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    n = torch.zeros(k, dtype=torch.long).index_add_(0, inv, valid.long())
    n_wrong = torch.zeros(k, dtype=torch.long).index_add_(0, inv, (valid & wrong).long())
    ok = (n >= 2) & ((n_wrong == 0) | (n_wrong == n))
    return valid & ok[inv]


def three_vs_one(
    x_ans: torch.Tensor, x_oth: torch.Tensor, wrong: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "3-vs-1" training set from N rollouts: X (2N', p), y (2N',).

    y = 1 only for the answer-token features of wrong rollouts; y = 0 for the answer-token features of right ones
    and for the other-token features of every rollout, so a neuron is picked when it is high on answer tokens
    exactly when the answer is wrong. Rollouts whose answer or other features are missing (NaN) are dropped.
    Rows: the N' answer rows, then the N' other rows, in rollout order.
    """
    ok = torch.isfinite(x_ans).all(1) & torch.isfinite(x_oth).all(1)
    xa, xo, w = x_ans[ok], x_oth[ok], wrong[ok].to(x_ans.dtype)
    return torch.cat([xa, xo]), torch.cat([w, torch.zeros_like(w)])


# ---- L1-regularised logistic regression ---------------------------------------------------------------------


@dataclass
class L1LogisticFit:
    """A fitted L1 logistic regression; `coef`/`intercept` are in the units of the features given to the fit."""

    coef: torch.Tensor
    """(p,) float64 weights theta."""
    intercept: float
    C: float
    objective: float
    """||scale * theta||_1 + C * sum_i loss_i at the solution."""
    kkt_violation: float
    """Largest violation of the optimality conditions, relative to lambda (0 at the exact optimum)."""
    n_iter: int
    converged: bool
    scale: torch.Tensor
    """(p,) the per-feature penalty weights used (feature std with `standardize`, else ones)."""


def logistic_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample -[y log sigma(s) + (1 - y) log(1 - sigma(s))] = softplus(s) - y s, stable for any s."""
    return torch.nn.functional.softplus(logits) - y * logits


def l1_logistic_kkt(
    X: torch.Tensor,
    y: torch.Tensor,
    coef: torch.Tensor,
    intercept: float,
    C: float,
    scale: torch.Tensor | None = None,
) -> float:
    """Largest violation of the optimality conditions of min ||scale * theta||_1 + C sum_i loss_i, relative to the
    per-sample penalty lambda = 1 / (C n). With g = the gradient of the mean loss (1/n) sum_i loss_i:
    |g_j + lambda s_j sign(theta_j)| for theta_j != 0, max(|g_j| - lambda s_j, 0) for theta_j = 0, |g_b| for the
    intercept (unpenalised)."""
    X, y, w = X.double(), y.double(), coef.double().to(X.device)
    n = X.shape[0]
    lam = 1.0 / (C * n)
    s = torch.ones_like(w) if scale is None else scale.double().to(X.device)
    r = torch.sigmoid(X @ w + intercept) - y
    g = X.T @ r / n
    nz = w != 0
    v = torch.where(nz, (g + lam * s * torch.sign(w)).abs(), (g.abs() - lam * s).clamp_min(0))
    return float(max(v.max().item() if v.numel() else 0.0, abs(float(r.mean()))) / lam)


def _fista(
    X: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """FISTA on min_{v, c} (1/n) sum_i loss(y_i, X_i . v + c) + sum_j lam_j |v_j| from (v, c), X centred.

    Backtracking on the Lipschitz constant from a power-iteration estimate of ||[X 1]||^2 / (4 n), and
    O'Donoghue-Candes adaptive restart. Returns (v, c, iterations, KKT violation / lam); stops when the violation
    (checked every 10 iterations) is <= tol."""
    n, p = X.shape
    dev = X.device

    def f_only(v: torch.Tensor, c: torch.Tensor) -> float:
        return float(logistic_loss(X @ v + c, y).mean())

    def f_and_grad(v: torch.Tensor, c: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        z = X @ v + c
        r = torch.sigmoid(z) - y
        return float(logistic_loss(z, y).mean()), X.T @ r / n, r.mean()

    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(p + 1, generator=gen, dtype=torch.float64).to(dev)
    for _ in range(30):
        a = X @ q[:p] + q[p]
        q = torch.cat([X.T @ a, a.sum().reshape(1)])
        q = q / q.norm().clamp_min(1e-300)
    lip = max(float((X @ q[:p] + q[p]).norm()) ** 2 / (4 * n), 1e-12)
    v_y, c_y, t, viol, it = v.clone(), c.clone(), 1.0, float("inf"), 0
    for it in range(1, max_iter + 1):
        fy, gy, gcy = f_and_grad(v_y, c_y)
        while True:
            step = 1.0 / lip
            w = v_y - step * gy
            v_new = torch.sign(w) * (w.abs() - step * lam).clamp_min(0)
            c_new = c_y - step * gcy
            dv, dc = v_new - v_y, c_new - c_y
            quad = fy + float(gy @ dv) + float(gcy * dc) + 0.5 * lip * (float(dv @ dv) + float(dc * dc))
            if f_only(v_new, c_new) <= quad + 1e-12 * max(1.0, abs(fy)):
                break
            lip *= 2.0
        if float((v_y - v_new) @ (v_new - v)) + float((c_y - c_new) * (c_new - c)) > 0:
            t, v_y, c_y = 1.0, v_new.clone(), c_new.clone()  # restart: the momentum pointed uphill
        else:
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            beta = (t - 1) / t_new
            v_y, c_y, t = v_new + beta * (v_new - v), c_new + beta * (c_new - c), t_new
        v, c = v_new, c_new
        if it % 10 == 0 or it == max_iter:
            _, g, gc = f_and_grad(v, c)
            viol = _kkt_violation(v, g, gc, lam)
            if viol <= tol:
                break
    return v, c, it, viol


def _kkt_violation(v: torch.Tensor, g: torch.Tensor, gc: torch.Tensor, lam: torch.Tensor) -> float:
    """max over the optimality conditions of min (1/n) sum loss + sum_j lam_j |v_j|, each divided by its lam_j
    (the intercept's by the smallest lam_j)."""
    viol = torch.where(v != 0, (g + lam * torch.sign(v)).abs(), (g.abs() - lam).clamp_min(0)) / lam
    return float(max(float(viol.max()) if viol.numel() else 0.0, abs(float(gc)) / float(lam.min())))


def l1_logistic_regression(
    X: torch.Tensor,
    y: torch.Tensor,
    C: float,
    *,
    standardize: bool = False,
    tol: float = 1e-4,
    max_iter: int = 5000,
    device: torch.device | str | None = None,
) -> L1LogisticFit:
    """Solve min_{theta, b} ||s * theta||_1 + C sum_i loss(y_i, theta . x_i + b) in float64.

    X: (n, p), y: (n,) in {0, 1}. C follows scikit-learn's convention (C = 1/lambda on the *summed* loss, the
    reference code's liblinear); the intercept b is not penalised (liblinear penalises it slightly). s = 1 by
    default (the paper: raw CETT units); with `standardize`, s_j = the feature's standard deviation, i.e. the
    penalty of a fit on standardised features, reported back in raw units (a constant feature keeps weight 0).

    Method: the features are centred (exact: the unpenalised intercept absorbs the shift); the mean-loss problem
    with lambda = 1/(C n) is solved by FISTA (`_fista`) on a working set of columns, which grows by the columns
    that violate their optimality condition (|gradient| > lambda) at the working set's solution until none does:
    the solution of the full problem, at the cost of iterations over a few columns. Stops when
    `l1_logistic_kkt` <= tol (relative to lambda) over all columns, or after `max_iter` FISTA iterations in all.
    """
    if C <= 0:
        raise ValueError(f"C={C}: expected > 0")
    dev = torch.device(device) if device is not None else X.device
    X = X.to(dev, torch.float64)
    y = y.to(dev, torch.float64)
    n, p = X.shape
    if n == 0:
        raise ValueError("l1_logistic_regression: no samples")
    mu = X.mean(0)
    sd = (X - mu).pow(2).mean(0).sqrt()
    live = sd > 0  # a constant column is zero once centred: its weight stays 0
    # Solved in standardised coordinates v_j = theta_j sd_j (better conditioned, same problem): the penalty
    # lam0 * s_j |theta_j| becomes lam0 * s_j / sd_j * |v_j|.
    sd1 = torch.where(live, sd, torch.ones_like(sd))
    Xc = (X - mu) / sd1
    scale = sd1 if standardize else torch.ones(p, dtype=torch.float64, device=dev)
    lam0 = 1.0 / (C * n)
    lam = lam0 * scale / sd1
    ybar = float(y.mean().clamp(1e-6, 1 - 1e-6))
    v = torch.zeros(p, dtype=torch.float64, device=dev)
    c = torch.tensor(math.log(ybar / (1 - ybar)), dtype=torch.float64, device=dev)
    work = torch.zeros(p, dtype=torch.bool, device=dev)
    total, viol = 0, float("inf")
    while True:
        r = torch.sigmoid(Xc @ v + c) - y
        g, gc = Xc.T @ r / n, r.mean()
        viol = _kkt_violation(v[live], g[live], gc, lam[live]) if bool(live.any()) else abs(float(gc)) / lam0
        if viol <= tol or total >= max_iter:
            break
        excess = torch.where(work | ~live, torch.zeros_like(g), (g.abs() - lam) / lam)
        k = int((excess > tol).sum())
        if k:  # add the worst violators (at least 10, at most as many as the set holds), then re-solve
            grow = max(10, int(work.sum()))
            work[torch.topk(excess, min(k, grow)).indices] = True
        idx = work.nonzero().flatten()
        vw, c, it, _ = _fista(Xc[:, idx], y, lam[idx], v[idx], c, tol, max_iter - total)
        v = torch.zeros_like(v).index_copy_(0, idx, vw)
        total += it
        if not k and it <= 10:  # nothing to add and the working set is already solved: the intercept's
            break  # condition alone fails, which FISTA on the set would have fixed; stop rather than loop
    theta = v / sd1
    coef = theta.cpu()
    intercept = float(c) - float(theta @ mu)
    f_final = float(logistic_loss(Xc @ v + c, y).mean())
    objective = float((coef.abs() * scale.cpu()).sum()) + C * n * f_final
    return L1LogisticFit(coef, intercept, float(C), objective, viol, total, viol <= tol, scale.cpu())


def top_variance(X: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted) of the k columns of X with the largest variance (all columns when k <= 0 or k >= p)."""
    p = X.shape[1]
    if k <= 0 or k >= p:
        return torch.arange(p)
    var = X.double().var(0, unbiased=False)
    return torch.topk(var.cpu(), k).indices.sort().values


def selected_set(coef: torch.Tensor) -> torch.Tensor:
    """H = the neurons with a positive weight (the paper's H-Neurons): sorted flat indices (long)."""
    return (coef > 0).nonzero().flatten().long().cpu()


# ---- set comparisons ----------------------------------------------------------------------------------------


def set_overlap(a: torch.Tensor, b: torch.Tensor, universe: int) -> dict[str, float]:
    """Overlap of two index sets of a universe of N items, against two random sets of the same sizes.

    jaccard = |A n B| / |A u B|; overlap = |A n B| / min(|A|, |B|); chance intersection E|A n B| = |A||B| / N
    (hypergeometric mean); jaccard_chance = E / (|A| + |B| - E) and overlap_chance = E / min(|A|, |B|) (plug-in).
    Ratios with an empty denominator are NaN."""
    sa, sb = set(int(i) for i in a.tolist()), set(int(i) for i in b.tolist())
    na, nb, inter = len(sa), len(sb), len(sa & sb)
    union = na + nb - inter
    e = na * nb / universe if universe > 0 else float("nan")
    nan = float("nan")
    return {
        "intersection": float(inter),
        "jaccard": inter / union if union else nan,
        "overlap": inter / min(na, nb) if min(na, nb) else nan,
        "intersection_chance": e,
        "jaccard_chance": e / (na + nb - e) if (na + nb - e) > 0 else nan,
        "overlap_chance": e / min(na, nb) if min(na, nb) else nan,
    }


def layer_matched_random_sets(
    idx: torch.Tensor, num_layers: int, width: int, n_sets: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """`n_sets` control sets with as many neurons in each layer as `idx` (flat indices l * width + j), drawn
    uniformly among the layer's neurons outside `idx` (among all of the layer's when too few remain)."""
    idx = idx.long().cpu()
    layer = idx // width
    out = []
    for _ in range(n_sets):
        parts = []
        for lyr in range(num_layers):
            k = int((layer == lyr).sum())
            if k == 0:
                continue
            pool = torch.arange(lyr * width, (lyr + 1) * width)
            outside = pool[~torch.isin(pool, idx)]
            src = outside if len(outside) >= k else pool
            parts.append(src[torch.randperm(len(src), generator=generator)[:k]])
        out.append(torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long))
    return out


def activation_matched_sets(
    idx: torch.Tensor,
    activity: torch.Tensor,
    width: int,
    n_sets: int,
    generator: torch.Generator,
    pool: int = 10,
) -> list[torch.Tensor]:
    """`n_sets` control sets matched to `idx` neuron by neuron: for each member j (in order), a neuron of the same
    layer outside `idx`, drawn uniformly among the `pool` ones whose `activity` (e.g. mean CETT, (L width,)) is
    closest to j's and not yet drawn for this set. A control for quantities that scale with activity: the
    gradient of W_down[:, j] is proportional to z_j."""
    idx = idx.long().cpu()
    act = activity.double().cpu()
    members = set(idx.tolist())
    out = []
    for _ in range(n_sets):
        used: set[int] = set()
        chosen = []
        for j in idx.tolist():
            lyr = j // width
            cand = [k for k in range(lyr * width, (lyr + 1) * width) if k not in members and k not in used]
            if not cand:
                continue
            cand_t = torch.tensor(cand)
            near = cand_t[torch.argsort((act[cand_t] - act[j]).abs(), stable=True)[:pool]]
            k = int(near[torch.randint(len(near), (1,), generator=generator)])
            used.add(k)
            chosen.append(k)
        out.append(torch.tensor(sorted(chosen), dtype=torch.long))
    return out


# ---- gradient on a set of neurons ---------------------------------------------------------------------------


def neuron_gradient_energy(
    down_grad: torch.Tensor, up_grad: torch.Tensor | None = None, gate_grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron squared gradient norms of one MLP: (down, mlp), each (m,) float64.

    down_j = ||dL/dW_down[:, j]||^2 (W_down is (d, m): column j); mlp_j = down_j + ||dL/dW_up[j, :]||^2 +
    ||dL/dW_gate[j, :]||^2 (rows j of the (m, d) up / gate projections, those given)."""
    down = down_grad.detach().double().pow(2).sum(0)
    mlp = down.clone()
    for g in (up_grad, gate_grad):
        if g is not None:
            mlp = mlp + g.detach().double().pow(2).sum(1)
    return down, mlp


def set_share(energy: torch.Tensor, idx: torch.Tensor) -> float:
    """g_H = sum_{j in H} e_j / sum_j e_j over a flat per-neuron energy vector (L m,); NaN when the total is 0."""
    total = float(energy.sum())
    if total <= 0 or not math.isfinite(total):
        return float("nan")
    return float(energy[idx.long()].sum()) / total
