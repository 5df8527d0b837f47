"""Gradient alignment, pure functions (arXiv 2512.00778, "What Is Preference Optimization Doing, and Why?").

Notation (the definitions are restated for users in docs/gradient_alignment.md):

- l_t = log pi_theta(a_t | s_t), the per-token log-probs the trainer's loss L consumes, (B, T).
- w_t = dL/dl_t. Since L depends on theta only through l_t, grad L = sum_t w_t grad l_t.
- g_T = grad R_T, R_T = token-mean NLL of a fixed target set D'.
- G(L) = <g_T, grad L> = sum_t w_t <g_T, grad l_t>. One SGD step theta -= eta grad L changes R_T by
  about -eta G, so G > 0 means a descent step moves the model toward D'.
- Components: positive learning {t: w_t < 0} (descent raises l_t), negative learning {t: w_t > 0},
  reweighting |w_t|; a KL loss term is a third component with its own weights. By linearity
  G_pos + G_neg + G_kl = G_total, and G_top + G_mid + G_bot = G_total for the reweighting tertiles.

G_c is computed as <g_T, grad sum_t (w_t m_c,t) l_t>: one backward of the weighted log-probs per component
(`weighted_grad`) dotted with g_T in float64 (`dot`). Nothing here imports TRL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch

from rlx.algorithms.stats import kl_k3

Vec = list[torch.Tensor]
"""A gradient-shaped vector: one tensor per trainable parameter, in a fixed order."""


# ---- token weights and components -----------------------------------------------------------------------


def kl_token_weights(
    w: torch.Tensor,
    mask: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    beta: float,
    old_logps: torch.Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    bias_correction: bool = False,
    return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """The part of w_t that comes from a k3 KL term beta * KL_t in a clipped policy-gradient loss.

    Per token the loss is c_i (p_t + beta K_t) with p_t = -M_t rho_t A_t (the PPO-clip surrogate, rho_t =
    exp(l_t - old_t), M_t the not-clipped mask) and k3_t = exp(r_t - l_t) - (r_t - l_t) - 1. Without bias
    correction K_t = k3_t; with it (TRL's `use_bias_correction_kl`, its default) K_t = rho_t k3_t, the
    importance-weighted KL whose gradient is the unbiased reverse-KL gradient. So w_t = c_i (p'_t + beta q_t)
    with p'_t = -M_t rho_t A_t and q_t = dK_t/dl_t = 1 - exp(r_t - l_t), or rho_t (1 - exp(r_t - l_t) + k3_t)
    with bias correction. The normaliser c_i (loss type, grad accumulation, world size) is constant within a
    sequence for the TRL loss types this models; it is recovered by least squares per sequence,
    c_i = sum w u / sum u^2 with u = p' + beta q, which is exact when the model holds. Returns w_kl = c_i beta q_t,
    (B, C); w - w_kl is the policy-gradient part. With `return_residual`, also ||w - c u|| / ||w|| over the
    masked tokens: round-off (~1e-7) when the loss is of this form, large when it is not (another loss type,
    an importance-sampling or entropy mask, ...), which the caller must then not split.

    Shapes: w, mask, logps, ref_logps, old_logps (B, C); advantages (B,) or (B, C).
    """
    w, mask = w.double(), mask.double()
    logps, ref = logps.detach().double(), ref_logps.detach().double()
    adv = advantages.detach().double()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(w)
    if old_logps is None:
        rho = torch.ones_like(w)
    else:
        rho = torch.exp(logps - old_logps.detach().double())
    not_clipped = torch.ones_like(w)
    if old_logps is not None and eps_low is not None and eps_high is not None:
        not_clipped = ((adv >= 0) & (rho <= 1 + eps_high)) | ((adv < 0) & (rho >= 1 - eps_low))
        not_clipped = not_clipped.double()
    q = 1.0 - torch.exp(ref - logps)
    if bias_correction:
        q = rho * (q + kl_k3(logps, ref))
    u = (-not_clipped * rho * adv + beta * q) * mask
    c = (w * u * mask).sum(-1) / (u * u).sum(-1).clamp_min(1e-300)
    w_kl = (c[:, None] * beta * q * mask).to(torch.float32)
    if not return_residual:
        return w_kl
    scale = float((w * mask).norm())
    residual = float(((w - c[:, None] * u) * mask).norm()) / scale if scale > 0 else 0.0
    return w_kl, residual


def component_weights(
    w: torch.Tensor, mask: torch.Tensor, w_kl: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Split w_t into positive learning (w < 0), negative learning (w > 0) and, if given, the KL part.

    `w_kl` is subtracted first, so the sign split applies to the policy-gradient part pg = w - w_kl only.
    Because w_kl is a least-squares fit, pg is round-off (not zero) on tokens whose advantage is zero. The
    rule: a token is positive learning iff pg_t < -tol and negative learning iff pg_t > tol, with
    tol = 1e-5 * max_t |w_t| over the masked tokens, i.e. **relative to w itself**, not to pg. A tolerance
    relative to pg would rescale with the round-off: in a micro-batch whose advantages are all zero, pg is
    round-off everywhere and its own maximum would label half of it positive and half negative learning.
    Tokens under the tolerance stay in the KL part, so the three components still sum exactly to
    `w * mask`. Without `w_kl` the split is exact (no tolerance). Shapes (B, T).
    """
    w = w * mask
    if w_kl is None:
        zero = torch.zeros_like(w)
        return {"pos": torch.where(w < 0, w, zero), "neg": torch.where(w > 0, w, zero)}
    pg = w - w_kl * mask
    tol = 1e-5 * float(w.abs().max()) if w.numel() else 0.0
    zero = torch.zeros_like(pg)
    pos, neg = torch.where(pg < -tol, pg, zero), torch.where(pg > tol, pg, zero)
    return {"pos": pos, "neg": neg, "kl": w - pos - neg}


def reweighting_units(level: str, mask: torch.Tensor, pair_index: torch.Tensor | None = None) -> torch.Tensor:
    """Unit id per token for the tertile split: `token` (PPO), `sequence` (GRPO, SFT), `pair` (DPO).

    Returns (B, T) int64; tokens outside `mask` get -1. For `pair`, `pair_index` (B,) maps each row to its pair.
    """
    B, T = mask.shape
    if level == "token":
        ids = torch.arange(B * T, device=mask.device).view(B, T)
    elif level == "sequence":
        ids = torch.arange(B, device=mask.device)[:, None].expand(B, T)
    elif level == "pair":
        if pair_index is None:
            raise ValueError("reweighting level 'pair' needs pair_index (B,)")
        ids = pair_index.to(mask.device).long()[:, None].expand(B, T)
    else:
        raise ValueError(f"unknown reweighting level {level!r}: expected token, sequence or pair")
    return torch.where(mask > 0, ids, torch.full_like(ids, -1))


def token_tiers(
    w: torch.Tensor,
    units: torch.Tensor,
    gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
) -> torch.Tensor:
    """(B, T) reweighting tier of each token: 0 top, 1 mid, 2 bot, -1 unscored (see `tertile_weights`)."""
    valid = units >= 0
    uid, inv = torch.unique(units[valid], return_inverse=True)
    n = uid.numel()
    absw = w[valid].abs().double()
    score = torch.zeros(n, dtype=torch.float64, device=w.device).index_add_(0, inv, absw)
    count = torch.zeros(n, dtype=torch.float64, device=w.device).index_add_(0, inv, torch.ones_like(absw))
    score = score / count.clamp_min(1)
    all_scores, offset = (score, 0) if gather is None else gather(score)
    tier = _tiers(all_scores.to(score.device))[offset : offset + n]
    token_tier = torch.full_like(units, -1)
    token_tier[valid] = tier[inv]
    return token_tier


def tertile_weights(
    w: torch.Tensor,
    units: torch.Tensor,
    gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Split w_t into equal thirds of units ranked by their reweighting score.

    The score of a unit is its mean |w_t| over scored tokens (for sigmoid DPO this is beta * omega_i / B; for
    GRPO it is proportional to |A_i| / |o_i|; per token it is |w_t|). Units are sorted by score, descending,
    ties broken by unit id, and cut into three parts whose sizes differ by at most one (the top third gets the
    extra unit). Returns {"top", "mid", "bot"}: (B, T) weights that sum exactly to w on scored tokens.
    `gather(scores) -> (all_scores, offset)` ranks this batch's units among several (e.g. all ranks'), the
    local units sitting at `offset` in `all_scores`.
    """
    tt = token_tiers(w, units, gather)
    zero = torch.zeros_like(w)
    return {name: torch.where(tt == i, w, zero) for i, name in enumerate(("top", "mid", "bot"))}


def _tiers(score: torch.Tensor) -> torch.Tensor:
    """Tier 0/1/2 (top/mid/bot) of each score: equal thirds of a stable descending sort (ties keep order)."""
    n = score.numel()
    order = torch.sort(-score, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=score.device)
    sizes = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    tier = torch.zeros(n, dtype=torch.long, device=score.device)
    tier[rank >= sizes[0]] = 1
    tier[rank >= sizes[0] + sizes[1]] = 2
    return tier


# ---- gradients and reductions -----------------------------------------------------------------------------


def weighted_grad(token_logps: torch.Tensor, params: Sequence[torch.Tensor], weights: torch.Tensor) -> Vec:
    """grad_theta sum_t weights_t l_t, by one backward on the existing graph (kept for the trainer's backward).

    Never touches `.grad`. Unused parameters get zeros. Returned in float32.
    """
    grads = torch.autograd.grad(
        token_logps,
        list(params),
        grad_outputs=weights.to(token_logps.dtype),
        retain_graph=True,
        allow_unused=True,
    )
    return [
        torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for p, g in zip(params, grads)
    ]


def per_param_dot(a: Vec, b: Vec) -> torch.Tensor:
    """(n,) float64: <a_i, b_i> per tensor (fp32 products accumulated in float64)."""
    dots = [(x.float() * y.float()).sum(dtype=torch.float64).cpu() for x, y in zip(a, b)]
    return torch.stack(dots) if dots else torch.zeros(0, dtype=torch.float64)


def dot(a: Vec, b: Vec, index: Sequence[int] | None = None) -> torch.Tensor:
    """<a, b> accumulated in float64 (over the tensors in `index`, default all)."""
    idx = range(len(a)) if index is None else index
    return per_param_dot([a[i] for i in idx], [b[i] for i in idx]).sum()


def sq_norm(a: Vec, index: Sequence[int] | None = None) -> torch.Tensor:
    """||a||^2 in float64."""
    return dot(a, a, index)


def cosine(ab: float, aa: float, bb: float) -> float:
    """<a,b> / (||a|| ||b||) from a dot product and two squared norms; NaN when a norm is zero."""
    den = math.sqrt(max(aa, 0.0) * max(bb, 0.0))
    return float(ab) / den if den > 0 else float("nan")


def add_(acc: Vec | None, x: Vec) -> Vec:
    """acc += x (acc None: a float32 copy of x)."""
    if acc is None:
        return [t.detach().float().clone() for t in x]
    for a, t in zip(acc, x):
        a.add_(t)
    return acc


def sub(a: Vec, *bs: Vec) -> Vec:
    """a - b1 - b2 - ..."""
    out = [t.float().clone() for t in a]
    for b in bs:
        for o, t in zip(out, b):
            o.sub_(t)
    return out


# ---- layer groups -----------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
"""Decoder block index: `layers.N.` (Llama, Qwen, GPT-NeoX/Pythia) or `h.N.` (GPT-2)."""


def layer_groups(names: Sequence[str], num_layers: int, k: int) -> dict[str, list[int]]:
    """Group parameter indices: `embed`, `blocks_{a}-{b}` (k contiguous groups of decoder blocks), `head`.

    `head` holds the LM head and the final norm; anything else goes to `other` (omitted when empty). Names of
    Llama/Qwen, GPT-NeoX (Pythia: `embed_in`, `final_layer_norm`, `embed_out`) and GPT-2 (`wte`, `h.N`, `ln_f`).
    A block index >= num_layers goes to the last group.
    With k <= 0 only `all` is returned. Every dict also has `all` (every index).
    """
    groups: dict[str, list[int]] = {"all": list(range(len(names)))}
    if k <= 0:
        return groups
    k = max(1, min(k, max(num_layers, 1)))
    bounds = [round(i * num_layers / k) for i in range(k + 1)]
    block_names = [f"blocks_{bounds[i]}-{bounds[i + 1] - 1}" for i in range(k)]
    groups["embed"] = []
    for b in block_names:
        groups[b] = []
    groups["head"] = []
    other = []
    for i, n in enumerate(names):
        m = _LAYER_RE.search(n)
        if m:
            layer = int(m.group(1))
            gi = max(j for j in range(k) if bounds[j] <= layer) if layer < num_layers else k - 1
            groups[block_names[gi]].append(i)
        elif "embed_tokens" in n or "wte" in n or "embed_in" in n:
            groups["embed"].append(i)
        elif "lm_head" in n or "embed_out" in n or re.search(r"(?:^|\.)(norm|ln_f|final_layer_?norm)\.", n):
            groups["head"].append(i)
        else:
            other.append(i)
    if other:
        groups["other"] = other
    return groups


# ---- run-level summary ------------------------------------------------------------------------------------


def run_summary(g_total: Sequence[float], min_positive: float = 0.9, max_cv: float = 1.0) -> dict:
    """Regime of a run from its logged G_total series (docs/gradient_alignment.md, run summary).

    frac_positive: fraction of logged steps with G > 0; sign_flip_rate: fraction of consecutive pairs whose
    signs differ; cv = std / |mean| (population std); regime "supervised-like" iff frac_positive >= 0.9 and
    cv < 1, else "RL-like". Non-finite values are dropped (and counted).
    """
    xs = [float(x) for x in g_total]
    finite = [x for x in xs if math.isfinite(x)]
    n = len(finite)
    out = {"n_logged": len(xs), "n_nonfinite": len(xs) - n}
    if n == 0:
        return {
            **out,
            "frac_positive": float("nan"),
            "sign_flip_rate": float("nan"),
            "cv": float("nan"),
            "mean": float("nan"),
            "std": float("nan"),
            "regime": "RL-like",
        }
    mean = sum(finite) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in finite) / n)
    frac = sum(x > 0 for x in finite) / n
    flips = sum((a > 0) != (b > 0) for a, b in zip(finite, finite[1:])) / max(n - 1, 1)
    cv = std / abs(mean) if mean != 0 else float("inf")
    regime = "supervised-like" if frac >= min_positive and cv < max_cv else "RL-like"
    return {
        **out,
        "frac_positive": frac,
        "sign_flip_rate": flips,
        "cv": cv,
        "mean": mean,
        "std": std,
        "regime": regime,
    }


# ---- activation-space variant (DeepSpeed ZeRO) ------------------------------------------------------------


def head_grad_from_activations(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad_W sum_t coef_t l_t for the LM head W (V, d), from activations only (no parameter autograd).

    l_t = log softmax(W h_t / T)[y_t], so dl_t/dW = (e_{y_t} - p_t) h_t^T / T and the sum is
    ((E - P) * coef)^T H / T with H (N, d) the head inputs, E one-hot labels, P = softmax. This is the
    activation-space variant used where parameter autograd is unavailable (ZeRO-2/3: DeepSpeed owns the gradients; docs/gradient_alignment.md):
    it needs only the hooked final hidden states, the labels and w_t. Shapes: hidden (N, d), labels (N,),
    coef (N,). Returns (V, d) float32.
    """
    h = hidden.detach().float()
    logits = h @ weight.detach().float().T
    if bias is not None:
        logits = logits + bias.detach().float()
    p = torch.softmax(logits / temperature, dim=-1)
    e = -p
    e[torch.arange(len(labels)), labels] += 1.0
    return ((e * coef.float()[:, None]).T @ h) / temperature
