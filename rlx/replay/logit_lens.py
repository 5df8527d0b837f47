"""Logit lens: read a residual-stream vector through a model's own final norm and LM head.

    p_l(t) = softmax(W_U · RMSNorm_final(h_l(t)))            (nostalgebraist 2020; Activation Replay §3)

RMSNorm is written out, x · rsqrt(mean(x²) + ε) · w, with the model's own `weight` and `variance_epsilon`
(the released replay code does this by hand in the model dtype); `fp32=True` upcasts the norm, logits and
everything downstream. Full-vocabulary statistics (entropy, top-k, KL) stream over vocabulary chunks with an
online log-sum-exp, so no (N, |V|) tensor larger than (N, chunk) is ever materialised.
"""

from __future__ import annotations

import math
import warnings

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


def exp_floor(dtype: torch.dtype) -> float:
    """log of the smallest normal number of `dtype`: shifted logits below it are raised to it before `exp`.

    exp(z − m) for z − m < log(tiny) is a subnormal or 0, and x86 `exp` takes a slow path there (measured 8x
    slower over a lens row whose logits spread over 250 nats). The floor is log(tiny) + 1 (so that rounding of
    the floor itself cannot land below tiny). Raising those terms to e · tiny changes a sum of exponentials
    that is >= 1 (the max term is exp(0)) by at most |V| · e · tiny (|V| · 3.2e-38 in float32), and
    Σ e·(z − m) by at most |V| · e · tiny · |log tiny|: far below one ulp of either sum for any vocabulary.
    """
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _merge_topk(
    top_val: torch.Tensor | None, top_ids: torch.Tensor | None, z: torch.Tensor, lo: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over vocabulary chunks: the chunk's own top-k, merged with the running (N, k)."""
    vals, idx = z.topk(min(k, z.shape[-1]), -1)
    idx = idx + lo
    if top_val is None:
        return vals, idx
    vals, idx = torch.cat([top_val, vals], -1), torch.cat([top_ids, idx], -1)
    top_val, sel = vals.topk(min(k, vals.shape[-1]), -1)
    return top_val, idx.gather(-1, sel)


@torch.no_grad()
def entropy_topk(
    x: torch.Tensor, head: nn.Module, k: int = 50, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy (nats) over the full vocabulary and the top-k logits/ids of normed `x` (N, d).

    With e = exp(z − m) (m the running max, shifted logits floored at `exp_floor`), s = Σ e and
    u = Σ e·(z − m): H = log s − u / s, accumulated per chunk (on a new max m', s ← a·s and
    u ← a·(u + (m − m')·s) with a = exp(m − m')). The shifted form keeps H accurate when it is small (no
    cancellation of m against E_p[z]). Returns (H (N,) fp32, ids (N, k), logits (N, k) in x's dtype).
    """
    w, b = _head_weight(head, x.dtype)
    v = w.shape[0]
    m = s = u = top_val = top_ids = None
    for lo, hi in _chunks(v, chunk):
        z = F.linear(x, w[lo:hi], b[lo:hi] if b is not None else None)
        top_val, top_ids = _merge_topk(top_val, top_ids, z, lo, k)
        # shifted in place below (topk copied its values out); half precision is upcast to float32 first
        zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        c_max = zf.amax(-1)
        m_new = c_max if m is None else torch.maximum(m, c_max)
        zs = zf.sub_(m_new[:, None]).clamp_(min=exp_floor(zf.dtype))
        e = zs.exp()
        c_s = e.sum(-1)
        c_u = e.mul_(zs).sum(-1)
        if m is None:
            s, u = c_s, c_u
        else:
            a = torch.exp(m - m_new)
            s, u = a * s + c_s, a * (u + (m - m_new) * s) + c_u
        m = m_new
    entropy = torch.log(s) - u / s
    return entropy.float(), top_ids, top_val


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


class _TopkKL(torch.autograd.Function):
    """KL(P‖Q) over k ids with Q = softmax(logits): one log-softmax forward, the analytic gradient backward.

    d KL / d z_j = q_j · Σ_i p_i − p_j (Σ_i p_i = 1 up to rounding; kept so the gradient is autograd's own).
    """

    @staticmethod
    def forward(ctx, logits_q, logp, p, p_sum):
        logq = torch.log_softmax(logits_q, -1)
        ctx.save_for_backward(logq, p, p_sum)
        return (p * (logp - logq)).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        logq, p, p_sum = ctx.saved_tensors
        return grad[:, None] * _kl_grad(logq, p, p_sum), None, None, None


def _kl_grad(logq: torch.Tensor, p: torch.Tensor, p_sum: torch.Tensor) -> torch.Tensor:
    """d KL(P‖Q) / d logits = q · Σ p − p, q = exp(log q) with log q floored at `exp_floor` (a q below e · tiny
    changes the gradient by less than e · tiny, and avoids `exp`'s slow subnormal path)."""
    return logq.clamp_min(exp_floor(logq.dtype)).exp_().mul_(p_sum[:, None]).sub_(p)


class _RowsKL(torch.autograd.Function):
    """KL(P‖Q) (N,) for Q = softmax over logits z[n, j] = <x[n], rows[n, j]> (+ bias), with constant rows
    (N, k, d), computed in blocks of positions whose rows fit in cache: per block the logits, the KL and its
    gradient w.r.t. x, ∂KL_n/∂x_n = Σ_j (q_nj Σp_n − p_nj) rows[n, j], while the block's rows are still in cache.
    The backward scales that per-position gradient (KL_n depends on x_n only), so the rows are read from
    memory once per step instead of twice (forward and backward), a memory-bound cost at |V| >> k.
    """

    @staticmethod
    def forward(ctx, x, rows, bias, logp, p, p_sum, block):
        kl = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        jac = torch.empty_like(x)
        for lo in range(0, x.shape[0], block):
            hi = lo + block
            r = rows[lo:hi]
            z = torch.bmm(x[lo:hi, None, :], r.transpose(1, 2)).squeeze(1)
            if bias is not None:
                z = z + bias[lo:hi]
            logq = torch.log_softmax(z, -1)
            kl[lo:hi] = (p[lo:hi] * (logp[lo:hi] - logq)).sum(-1)
            g = _kl_grad(logq, p[lo:hi], p_sum[lo:hi])
            jac[lo:hi] = torch.bmm(g[:, None, :], r).squeeze(1)
        ctx.save_for_backward(jac)
        return kl

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad[:, None] * jac, None, None, None, None, None, None


def rows_kl(
    x: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    logp: torch.Tensor,
    p: torch.Tensor,
    p_sum: torch.Tensor,
    cache_bytes: int = 1 << 20,
) -> torch.Tensor:
    """KL(P‖Q) (N,) at positions `x` (N, d) against per-position head rows (N, k, d) (and bias (N, k)), all
    constants but x in x's dtype; same value and gradient as `topk_kl_fused(row_logits(x, rows) + bias, ...)`.
    Blocks of positions hold about `cache_bytes` of rows."""
    block = max(1, cache_bytes // max(1, rows.shape[1] * rows.shape[2] * rows.element_size()))
    return _RowsKL.apply(x, rows.detach(), bias, logp, p, p_sum, block)


def topk_kl_fused(
    logits_q: torch.Tensor,
    logp: torch.Tensor,
    p: torch.Tensor | None = None,
    p_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """`topk_kl` with the base side precomputed (p = exp(logp), p_sum = Σ p, both in the dtype of `logits_q`;
    constant across optimisation steps) and a fused backward. Same values and gradient as `topk_kl`."""
    logp = logp.to(logits_q.dtype)
    p = logp.exp() if p is None else p
    p_sum = p.sum(-1) if p_sum is None else p_sum
    return _TopkKL.apply(logits_q, logp, p, p_sum)


class _RowLogits(torch.autograd.Function):
    """z[n, j] = <x[n], rows[n, j]> for constant rows (N, k, d); the backward reads the rows once more."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        return torch.einsum("nd,nkd->nk", x, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return torch.bmm(grad.unsqueeze(1), rows).squeeze(1), None


def row_logits(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits (N, k) of `x` (N, d) against per-row head rows (N, k, d) that carry no gradient."""
    return _RowLogits.apply(x, rows.detach())


class _SparseHeadKL(torch.autograd.Function):
    """KL(P‖Q) (M,) with Q = softmax over z[m, j] = <x[m], W[ids[m, j]]> (+ bias), reading the head rows in
    place: the logits by a sampled dense-dense product on the (M, |V|) pattern of `ids` (sorted per row), the
    gradient w.r.t. x, Σ_j (q Σp − p)[m, j] · W[ids[m, j]], by `embedding_bag` with per-sample weights, both in
    the forward (KL_m depends on x_m only); the backward scales it. No (M, k, d) copy of the rows is made or
    streamed: the head (|V| · d) stays in cache across the positions and layers of a step.
    """

    @staticmethod
    def forward(ctx, x, weight, pattern, ids, bias, logp, p, p_sum):
        z = torch.sparse.sampled_addmm(pattern, x, weight.T).values().view(ids.shape)
        if bias is not None:
            z = z + bias
        logq = torch.log_softmax(z, -1)
        kl = (p * (logp - logq)).sum(-1)
        g = _kl_grad(logq, p, p_sum)
        ctx.save_for_backward(F.embedding_bag(ids, weight, per_sample_weights=g, mode="sum"))
        return kl

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad[:, None] * jac, None, None, None, None, None, None, None


def sparse_pattern(ids: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(M, vocab) CSR pattern with the (M, k) ids (sorted, distinct per row) as its columns, zero values."""
    m, k = ids.shape
    crow = torch.arange(0, m * k + 1, k, device=ids.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two ops used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow,
            ids.reshape(-1),
            torch.zeros(m * k, dtype=dtype, device=ids.device),
            size=(m, vocab),
            check_invariants=False,
        )


def sparse_head_kl(
    x: torch.Tensor,
    weight: torch.Tensor,
    pattern: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None,
    logp: torch.Tensor,
    p: torch.Tensor,
    p_sum: torch.Tensor,
) -> torch.Tensor:
    """KL(P‖Q) (M,) at normed RL streams `x` (M, d) for head `weight` (|V|, d) at sorted `ids` (M, k) (pattern
    from `sparse_pattern`), constants in x's dtype; same value and gradient as
    `topk_kl_fused(row_logits(x, weight[ids]) + bias, logp, p, p_sum)`."""
    return _SparseHeadKL.apply(x, weight.detach(), pattern, ids, bias, logp, p, p_sum)


_SPARSE_OK: dict[tuple[str, torch.dtype], bool] = {}


def sparse_head_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `sparse_head_kl` runs for this device type and dtype (probed once on a tiny example)."""
    key = (torch.device(device).type, dtype)
    if key not in _SPARSE_OK:
        try:
            w = torch.randn(7, 3, device=device).to(dtype)
            ids = torch.tensor([[1, 4], [0, 6]], device=device)
            lp = torch.zeros(2, 2, device=device, dtype=dtype)
            x = torch.randn(2, 3, device=device).to(dtype)
            got = sparse_head_kl(
                x, w, sparse_pattern(ids, 7, dtype), ids, None, lp, lp.exp(), lp.exp().sum(-1)
            )
            ref = topk_kl_fused(torch.einsum("nd,nkd->nk", x, w[ids]), lp)
            _SPARSE_OK[key] = bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-3))
        except (RuntimeError, NotImplementedError, TypeError):
            _SPARSE_OK[key] = False
    return _SPARSE_OK[key]
