"""Logit lens: read a residual-stream vector through a model's own final norm and LM head.

    p_l(t) = softmax(W_U · RMSNorm_final(h_l(t)))            (nostalgebraist 2020; Activation Replay §3)

RMSNorm is written out, x · rsqrt(mean(x²) + ε) · w, with the model's own `weight` and `variance_epsilon`
(the released replay code does this by hand in the model dtype); `fp32=True` upcasts the norm, logits and
everything downstream. Full-vocabulary statistics (entropy, top-k, KL) stream over vocabulary chunks with an
online log-sum-exp, so no (N, |V|) tensor larger than (N, chunk) is ever materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(norm: nn.Module, h: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Apply the model's final RMSNorm to `h` (..., d). Norms without `weight`/`eps` are called as modules."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None:
        return norm(h.float() if fp32 else h)
    x = h.float() if fp32 else h
    w = weight.float() if fp32 else weight.to(x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _head_weight(head: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = head.weight.to(dtype)
    b = head.bias.to(dtype) if getattr(head, "bias", None) is not None else None
    return w, b


def head_rows_at(head: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LM-head rows (*ids.shape, d) and bias (*ids.shape) at token `ids`, detached (the head is read, not
    trained). Gathered in the head's dtype, so a later cast copies only these rows, never the (|V|, d) head."""
    bias = getattr(head, "bias", None)
    return head.weight[ids].detach(), (bias[ids].detach() if bias is not None else None)


def _chunks(v: int, chunk: int):
    for s in range(0, v, chunk):
        yield s, min(s + chunk, v)


@torch.no_grad()
def entropy_topk(
    x: torch.Tensor, head: nn.Module, k: int = 50, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy (nats) over the full vocabulary and the top-k logits/ids of normed `x` (N, d).

    H = logZ − E_p[z], accumulated per chunk with a running max. Returns (H (N,) fp32, ids (N, k), logits (N, k)).
    """
    w, b = _head_weight(head, x.dtype)
    n, v = x.shape[0], w.shape[0]
    k = min(k, v)
    m = torch.full((n,), -torch.inf, device=x.device)
    s = torch.zeros(n, device=x.device)
    t = torch.zeros(n, device=x.device)
    top_val = torch.empty(n, 0, device=x.device, dtype=x.dtype)
    top_ids = torch.empty(n, 0, device=x.device, dtype=torch.long)
    for lo, hi in _chunks(v, chunk):
        z = F.linear(x, w[lo:hi], b[lo:hi] if b is not None else None)
        zf = z.float()
        m_new = torch.maximum(m, zf.max(-1).values)
        scale = torch.exp(m - m_new)
        e = torch.exp(zf - m_new[:, None])
        s = s * scale + e.sum(-1)
        t = t * scale + (e * zf).sum(-1)
        m = m_new
        vals, idx = (
            torch.cat([top_val, z], -1),
            torch.cat([top_ids, torch.arange(lo, hi, device=x.device).expand(n, -1)], -1),
        )
        top_val, sel = vals.topk(min(k, vals.shape[-1]), -1)
        top_ids = idx.gather(-1, sel)
    entropy = m + torch.log(s) - t / s
    return entropy, top_ids, top_val


@torch.no_grad()
def kl_entropies(
    x_p: torch.Tensor, head_p: nn.Module, x_q: torch.Tensor, head_q: nn.Module, chunk: int = 16384
) -> dict[str, torch.Tensor]:
    """Full-vocabulary KL(P‖Q), H(P), H(Q) and top-1 agreement for normed `x_p`, `x_q` (N, d), in one pass.

    KL = E_p[z_p − z_q] − logZ_p + logZ_q. All outputs are (N,) fp32 (top1_agree bool).
    """
    wp, bp = _head_weight(head_p, x_p.dtype)
    wq, bq = _head_weight(head_q, x_q.dtype)
    n, v = x_p.shape[0], wp.shape[0]
    if wq.shape[0] != v:
        raise ValueError(f"vocabulary sizes differ ({v} vs {wq.shape[0]}); the pair must share a tokenizer")
    dev = x_p.device
    mp = torch.full((n,), -torch.inf, device=dev)
    mq = torch.full((n,), -torch.inf, device=dev)
    sp, tp, u = torch.zeros(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    sq, tq = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    bestp = torch.full((n,), -torch.inf, device=dev)
    bestq = torch.full((n,), -torch.inf, device=dev)
    argp = torch.zeros(n, dtype=torch.long, device=dev)
    argq = torch.zeros(n, dtype=torch.long, device=dev)
    for lo, hi in _chunks(v, chunk):
        zp = F.linear(x_p, wp[lo:hi], bp[lo:hi] if bp is not None else None).float()
        zq = F.linear(x_q, wq[lo:hi], bq[lo:hi] if bq is not None else None).float()
        mp_new, mq_new = torch.maximum(mp, zp.max(-1).values), torch.maximum(mq, zq.max(-1).values)
        ap, aq = torch.exp(mp - mp_new), torch.exp(mq - mq_new)
        ep, eq = torch.exp(zp - mp_new[:, None]), torch.exp(zq - mq_new[:, None])
        sp, tp, u = sp * ap + ep.sum(-1), tp * ap + (ep * zp).sum(-1), u * ap + (ep * (zp - zq)).sum(-1)
        sq, tq = sq * aq + eq.sum(-1), tq * aq + (eq * zq).sum(-1)
        mp, mq = mp_new, mq_new
        vp, ip = zp.max(-1)
        vq, iq = zq.max(-1)
        argp = torch.where(vp > bestp, ip + lo, argp)
        argq = torch.where(vq > bestq, iq + lo, argq)
        bestp, bestq = torch.maximum(bestp, vp), torch.maximum(bestq, vq)
    logzp, logzq = mp + torch.log(sp), mq + torch.log(sq)
    return {
        "kl": (u / sp - logzp + logzq).clamp_min(0.0),
        "entropy_p": logzp - tp / sp,
        "entropy_q": logzq - tq / sq,
        "top1_agree": argp == argq,
    }


def topk_kl(logp: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) on a restricted support: `logp` (N, k) base log-probs renormalised over its top-k ids, `logits_q`
    (N, k) the RL logits at the same ids (renormalised here). Returns (N,) in the dtype of `logits_q`.

    Same value as the released code's `F.kl_div(log Q, P)` summed over the k ids.
    """
    logp = logp.to(logits_q.dtype)
    logq = torch.log_softmax(logits_q, -1)
    return (logp.exp() * (logp - logq)).sum(-1)
