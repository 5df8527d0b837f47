"""Pure math of the `correctness_probe` monitor (rlx/instruments/correctness_probe.py; docs/probes.md).

A linear read-out of "is this answer correct" from the residual stream at the answer-final token, fitted on the
rollout groups of one training step (the RepE / LAT reading at the final token, arXiv 2512.07404). With h_i the
state of rollout i at a chosen layer, y_i = [reward_i >= threshold], and the prompt groups G split into a fit half
and a held-out half (`group_split`):

- difference of means over mixed groups M (groups with both outcomes) of the fit half:
      v_dm = 1/|M| sum_{g in M} ( mean_{i in g, y_i=1} h_i - mean_{i in g, y_i=0} h_i );
- L2-regularised logistic regression (optional) on the group-centred states h_i - mean_{j in g} h_j of the same
  mixed groups, features divided by one scalar s (their per-coordinate RMS) so that `l2` does not depend on the
  scale of the residual stream:
      min_{w,b} 1/n sum_i log(1 + exp(-(2 y_i - 1)(<x_i/s, w> + b))) + l2/2 |w|^2,
  solved exactly (Newton with backtracking, float64) in the span of the centred states (the optimum lies there);
- the direction is v / |v|; a rollout's score is s_i = <h_i, v>; read-out quality on the held-out half: AUROC of
  s against y, next to the AUROC of the policy's own mean token log-prob, and the within-group pairwise accuracy
  P[s(i+) > s(i-)] over (correct, wrong) pairs of one prompt.

Every function takes and returns CPU tensors (float64 where it computes) and has no state.
"""

from __future__ import annotations

import math

import torch

from rlx.algorithms.probing import auroc

DIRECTIONS = ("diff_means", "logistic")
"""How the direction is fitted: difference of group means (default) or logistic regression."""


def group_split(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (fit, heldout) over rollouts: the distinct group ids in increasing order, the even-ranked ones
    (1st, 3rd, ...) to the fit half and the odd-ranked ones to the held-out half (analysis/measures/correctness.py
    splits probe prompts the same way). A group is never split between the halves."""
    g = groups.detach().long().flatten().cpu()
    uniq = torch.unique(g)  # sorted
    fit_ids = uniq[0::2]
    fit = torch.isin(g, fit_ids)
    return fit, ~fit


def mixed_groups(correct: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Sorted ids of the groups that hold at least one correct and one wrong rollout."""
    y = correct.detach().bool().flatten().cpu()
    g = groups.detach().long().flatten().cpu()
    uniq = torch.unique(g)
    has_c = torch.tensor([bool(y[g == u].any()) for u in uniq.tolist()], dtype=torch.bool)
    has_w = torch.tensor([bool((~y[g == u]).any()) for u in uniq.tolist()], dtype=torch.bool)
    return uniq[has_c & has_w]


def _fit_inputs(
    h: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states float64 (N, d), correct bool (N,), group ids long (N,), the mixed groups' ids), all detached on CPU:
    what both direction fits start from."""
    y = correct.detach().bool().flatten().cpu()
    g = groups.detach().long().flatten().cpu()
    return h.detach().double().cpu(), y, g, mixed_groups(y, g)


def diff_of_means(
    h: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor | None, int]:
    """(v_dm, number of mixed groups): the mean over mixed groups of (mean correct state - mean wrong state), not
    normalised, float64 (d,); None when no group is mixed."""
    x, y, g, mixed = _fit_inputs(h, correct, groups)
    if len(mixed) == 0:
        return None, 0
    diffs = []
    for u in mixed.tolist():
        sel = g == u
        diffs.append(x[sel & y].mean(0) - x[sel & ~y].mean(0))
    return torch.stack(diffs).mean(0), len(mixed)


def _logistic_newton(z: torch.Tensor, t: torch.Tensor, l2: float, max_iter: int, tol: float) -> torch.Tensor:
    """argmin_{w,b} mean_i softplus(-t_i (<z_i, w> + b)) + l2/2 |w|^2 for t in {-1, +1}: Newton steps with
    backtracking on the strictly convex objective (b unpenalised); returns w (float64)."""
    n, r = z.shape
    theta = torch.zeros(r + 1, dtype=torch.float64)  # (w, b)
    za = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)
    pen = torch.full((r + 1,), float(l2), dtype=torch.float64)
    pen[-1] = 0.0

    def objective(th: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-t * (za @ th)).mean() + 0.5 * (pen * th * th).sum()

    f = objective(theta)
    for _ in range(max_iter):
        m = t * (za @ theta)
        p = torch.sigmoid(-m)  # d softplus(-m)/d(-m)
        grad = -(za * (t * p)[:, None]).mean(0) + pen * theta
        if float(grad.abs().max()) < tol:
            break
        wgt = p * (1 - p)
        hess = (za * wgt[:, None]).T @ za / n + torch.diag(pen)
        hess = hess + 1e-12 * torch.eye(r + 1, dtype=torch.float64)  # b's row when every p is 0 or 1
        step = torch.linalg.solve(hess, grad)
        lr = 1.0
        while True:
            cand = theta - lr * step
            fc = objective(cand)
            if fc <= f - 1e-4 * lr * float(grad @ step) or lr < 1e-10:
                break
            lr *= 0.5
        theta, f = cand, fc
    return theta[:-1]


def logistic_direction(
    h: torch.Tensor,
    correct: torch.Tensor,
    groups: torch.Tensor,
    l2: float = 1e-2,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[torch.Tensor | None, int]:
    """(w, number of mixed groups): the weight vector of the L2-regularised logistic regression of `correct` on
    the group-centred states of the mixed groups (module docstring), float64 (d,) in the units of h, not
    normalised; None when no group is mixed."""
    if l2 <= 0:
        raise ValueError(
            f"logistic_direction: l2={l2}, expected > 0 (the fit is unbounded on separable data)"
        )
    x, y, g, mixed = _fit_inputs(h, correct, groups)
    if len(mixed) == 0:
        return None, 0
    keep = torch.isin(g, mixed)
    x, y, g = x[keep], y[keep], g[keep]
    centred = x.clone()
    for u in mixed.tolist():
        sel = g == u
        centred[sel] = x[sel] - x[sel].mean(0)
    n, d = centred.shape
    scale = float(centred.pow(2).sum(1).mean().div(d).sqrt())
    if not math.isfinite(scale) or scale == 0:
        return None, len(mixed)
    x = centred / scale
    # the optimum lies in the row span of x (the L2 term kills any orthogonal part): solve in that basis
    _, s_, vt = torch.linalg.svd(x, full_matrices=False)
    rank = int((s_ > s_.max() * 1e-10).sum())
    basis = vt[:rank].T  # (d, r), orthonormal columns
    z = x @ basis
    w = _logistic_newton(z, y.double() * 2 - 1, l2, max_iter, tol)
    return basis @ w, len(mixed)


def unit(v: torch.Tensor | None) -> torch.Tensor | None:
    """v / |v| (float64); None for None, a zero or a non-finite vector."""
    if v is None:
        return None
    v = v.double()
    n = float(v.norm())
    if not math.isfinite(n) or n == 0:
        return None
    return v / n


def fit_direction(
    h: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor, method: str = "diff_means", l2: float = 1e-2
) -> tuple[torch.Tensor | None, int]:
    """(unit direction or None, number of mixed groups it was fitted on) by `method` in `DIRECTIONS`."""
    if method == "diff_means":
        v, n = diff_of_means(h, correct, groups)
    elif method == "logistic":
        v, n = logistic_direction(h, correct, groups, l2=l2)
    else:
        raise ValueError(f"fit_direction: method={method!r}, expected one of {DIRECTIONS}")
    return unit(v), n


def cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """cos(a, b) in float64; NaN when either is None, zero or not finite."""
    if a is None or b is None:
        return float("nan")
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if not (math.isfinite(na) and math.isfinite(nb)) or na == 0 or nb == 0:
        return float("nan")
    return float(a @ b) / (na * nb)


def pairwise_accuracy(scores: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor) -> tuple[float, int]:
    """(P[s(i+) > s(i-)] + P[tie]/2 over (correct, wrong) pairs of one group, number of pairs); NaN without pairs."""
    s = scores.detach().double().flatten().cpu()
    y = correct.detach().bool().flatten().cpu()
    g = groups.detach().long().flatten().cpu()
    wins, n = 0.0, 0
    for u in torch.unique(g).tolist():
        sel = g == u
        c, w = s[sel & y], s[sel & ~y]
        if len(c) and len(w):
            diff = c[:, None] - w[None, :]
            wins += float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
            n += diff.numel()
    return (wins / n if n else float("nan")), n


def readout(scores: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """auroc, pairwise_acc and n_pairs of `scores` against `correct` (one set of rollouts)."""
    pw, n_pairs = pairwise_accuracy(scores, correct, groups)
    return {"auroc": auroc(scores, correct), "pairwise_acc": pw, "n_pairs": float(n_pairs)}


def answer_final_positions(
    prompt_width: int, completion_mask: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B,), has_token (B,)): the index of each rollout's last completion token in the concatenated
    prompt + completion sequence, P + j_i with j_i the last column where `completion_mask` is 1 (prompts are
    left-padded to the common width P, completions right-padded), minus `offset` tokens (1 = the token before the
    last); 0 with has_token False for a completion shorter than offset + 1 tokens."""
    m = completion_mask.detach() > 0
    c = m.shape[1]
    cols = torch.arange(c, device=m.device).expand_as(m)
    last = torch.where(m, cols, torch.full_like(cols, -1)).max(1).values
    has = last >= int(offset)
    pos = torch.where(has, prompt_width + last - int(offset), torch.zeros_like(last))
    return pos, has


def response_gradient(grad: torch.Tensor, prompt_width: int, completion_mask: torch.Tensor) -> torch.Tensor:
    """sum_i sum_t dL/dh[i, t] over the positions t that predict completion tokens (t = P-1+j for each completion
    column j with mask 1), float64 (d,). `grad` is (B, P + C, d).

    Not the answer-final position itself: the state at the last completion token predicts only what follows the
    completion, which no loss scores, so dL/dh there is exactly zero (causal attention carries it nowhere scored)."""
    p = int(prompt_width)
    c = completion_mask.shape[1]
    g = grad[:, p - 1 : p - 1 + c].double()
    return (g * completion_mask.to(g.dtype).unsqueeze(-1)).sum((0, 1)).cpu()


def mean_logp(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean log-prob over each completion's tokens (NaN for an empty completion), float64."""
    lp, m = logps.detach().double(), mask.detach().double()
    n = m.sum(1)
    return torch.where(n > 0, (lp * m).sum(1) / n.clamp_min(1), torch.full_like(n, float("nan")))
