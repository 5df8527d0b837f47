"""Learnable-token Activation Replay (Xing et al., arXiv 2511.19972, §4; released `ReplayQwen2VLChat`).

Per prompt, zero-initialised offsets δ (B, S, d) are added to the residual stream entering decoder layer 0 at
eligible positions E (image/video pads for VLMs, prompt tokens for text models) and tuned by plain gradient
descent so that the RL model's logit-lens distributions in the first L layers match the base model's at
low-entropy positions:

    S_{l,i} = { t ∈ E_i : H_l^base(i, t) <= ρ · max_{t' ∈ E_i} H_l^base(i, t') }
    𝓛_i(δ) = (1 / |E_i|) Σ_{l<L} (1 / |S_{l,i}|) Σ_{t∈S_{l,i}} KL(P_l(i,t) ‖ Q_l(i,t))
    δ ← δ − η ∇_δ Σ_i 𝓛_i                                             (η = 10, 25 steps, L = 16, ρ = 0.4)

P and Q are softmaxes of base and RL logit-lens logits restricted to the base top-k (50) ids. The base side is
the output of base layer l; the RL side is the *input* of RL layer l with `align="code"` (the released code's
one-layer offset) or its output with `align="paper"`. Summing per-sample losses keeps batched rows exactly
independent (the released code's `batchmean` would couple them).

Cost: the base side (entropy, selection, top-k ids and log-probs) is computed once per prompt; each step runs
the RL model only up to the deepest stream the loss reads (`StopForward`) with frozen weights, so backward
computes activation gradients only. Exact savings on top (same values within float tolerance): text batches
packed without padding and cut after the last position a loss reads (`rlx.replay.packing`), steps after the
first rerun the recorded layer calls (`LayerCalls`), the last layer run computes its MLP only where it is read,
and the loss is planned once (`LossPlan`: layers batched, the LM head read in place for large top-k unions).
docs/activation_replay.md, "Cost".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlx.replay.hooks import DecoderParts, decoder_parts
from rlx.replay.logit_lens import (
    entropy_topk,
    head_rows_at,
    rms_norm,
    row_logits,
    rows_kl,
    sparse_head_kl,
    sparse_head_supported,
    sparse_pattern,
    topk_kl_fused,
)
from rlx.replay.packing import Layout, replay_layout
from rlx.replay.streams import LayerCalls, frozen, layer_streams, rerun_streams


@dataclass
class LayerTargets:
    """Base-model side of one layer's loss term, at the selected positions only (N of them)."""

    layer: int
    rows: torch.Tensor
    """(N,) batch index of each selected position."""
    cols: torch.Tensor
    """(N,) sequence index of each selected position."""
    top_ids: torch.Tensor
    """(N, k) base top-k token ids."""
    logp: torch.Tensor
    """(N, k) base log-probabilities renormalised over those ids."""
    weight: torch.Tensor
    """(N,) 1 / (|S_{l,i}| · |E_i|) for the row i the position belongs to."""
    head_rows: torch.Tensor | None = None
    """(U, d) LM-head rows of the union U of the top-k ids (set when U is small; constant across steps)."""
    head_bias: torch.Tensor | None = None
    """(U,) LM-head bias at U, if the head has one."""
    local_ids: torch.Tensor | None = None
    """(N, k) positions of `top_ids` within U."""
    gathered_rows: torch.Tensor | None = None
    """(N, k, d) LM-head rows at `top_ids`, gathered once per prompt when U is too large for the (N, U) matmul
    but N·k·d fits the memory cap (else they are gathered again at every step)."""
    gathered_bias: torch.Tensor | None = None
    """(N, k) LM-head bias at `top_ids`, if the head has one."""
    index: torch.Tensor | None = None
    """(N,) where the selected positions sit in the flattened RL streams of the optimisation loop's layout
    (`rlx.replay.packing`); None = the (B, S) batch as given, index rows · S + cols."""
    sparse: bool = False
    """The loss reads the head rows in place (`sparse_head_kl`), batched with the other sparse layers."""
    _cast: dict = field(default_factory=dict, repr=False)
    """Per-prompt constants in the dtype of the RL streams (P = exp(log P), Σ P, head rows and bias), made at
    the first step and reused by the others."""

    def constants(self, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        """log P, P, Σ P and the cached head rows/bias in `dtype`, computed once per prompt batch."""
        if dtype not in self._cast:
            logp = self.logp.to(dtype)
            p = logp.exp()

            def cast(t):
                return t.to(dtype) if t is not None else None

            self._cast[dtype] = dict(
                logp=logp,
                p=p,
                p_sum=p.sum(-1),
                head_rows=cast(self.head_rows),
                head_bias=cast(self.head_bias),
                gathered_rows=cast(self.gathered_rows),
                gathered_bias=cast(self.gathered_bias),
            )
        return self._cast[dtype]

    def rl_logits(self, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """RL logits (N, k) at the base top-k ids of normed `x` (N, d)."""
        c = self.constants(x.dtype)
        if self.local_ids is not None:  # union cache: one (N, U) matmul, then pick each row's k columns
            z = x @ c["head_rows"].T
            if c["head_bias"] is not None:
                z = z + c["head_bias"]
            return z.gather(1, self.local_ids)
        rows, bias = c["gathered_rows"], c["gathered_bias"]
        if rows is None:  # over the caching budget: gather at every step
            rows, bias = head_rows_at(head, self.top_ids)
            rows, bias = rows.to(x.dtype), (bias.to(x.dtype) if bias is not None else None)
        z = row_logits(x, rows)
        return z + bias if bias is not None else z

    def kl(self, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """KL(P ‖ Q) (N,) at the selected positions, Q from normed RL streams `x` (N, d)."""
        c = self.constants(x.dtype)
        if self.local_ids is None and c["gathered_rows"] is not None:  # cached rows: blocked, one read/step
            return rows_kl(x, c["gathered_rows"], c["gathered_bias"], c["logp"], c["p"], c["p_sum"])
        return topk_kl_fused(self.rl_logits(x, head), c["logp"], c["p"], c["p_sum"])

    def cache_head(self, head: nn.Module, max_union: int, max_gathered: int, sparse: bool = False) -> None:
        """Precompute the head rows the loss reads, once per prompt (the weights are frozen during the loop).

        |U| <= max_union: the union's rows, one (N, U) matmul per step (the top-k ids of nearby positions overlap
        heavily). Else, with `sparse`: nothing (the loss reads the head in place, `sparse_head_kl`: at the
        7B-depth bench shape half the time of streaming cached rows, and no copy). Else, when N·k·d <=
        max_gathered elements: the (N, k, d) rows themselves, so no step gathers from the (|V|, d) head again.
        """
        union, local = torch.unique(self.top_ids, return_inverse=True)
        if union.numel() <= max_union:
            (self.head_rows, self.head_bias), self.local_ids = head_rows_at(head, union), local
        elif sparse:
            self.sparse = True
        elif self.top_ids.numel() * head.weight.shape[1] <= max_gathered:
            self.gathered_rows, self.gathered_bias = head_rows_at(head, self.top_ids)


@dataclass
class LearnableReplay:
    """Optimised offsets for one batch of prompts, ready to inject at prefill."""

    offsets: torch.Tensor
    """(B, S, d) offsets, zero outside eligible positions."""
    eligible: torch.Tensor
    """(B, S) bool eligible positions."""
    num_layers: int
    """L actually used (capped at the model's depth)."""
    losses: torch.Tensor
    """(steps, B) per-sample loss before each update (one more row, at the final offsets, if log_final_loss)."""
    num_selected: torch.Tensor
    """(L, B) selected positions per layer and row."""
    mode: str = field(default="learnable")


def check_pair(rl: DecoderParts, base: DecoderParts) -> None:
    from rlx.errors import UserError

    d_rl, d_base = rl.head.weight.shape, base.head.weight.shape
    if rl.depth != base.depth or d_rl != d_base:
        raise UserError(
            f"replay pair mismatch: RL model has {rl.depth} layers and LM head {tuple(d_rl)}, base model has "
            f"{base.depth} layers and {tuple(d_base)}. The base must be the RL model's own pre-RL checkpoint "
            "(same architecture and tokenizer); set replay.base_model to it."
        )


@torch.no_grad()
def base_targets(
    base: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eligible: torch.Tensor,
    num_layers: int,
    rho: float = 0.4,
    top_k: int = 50,
    fp32: bool = False,
    chunk: int = 16384,
    model_inputs: dict[str, Any] | None = None,
    layout: Layout | None = None,
) -> list[LayerTargets]:
    """Run the base model once (up to layer L-1) and keep, per layer, the selected positions' top-k targets.

    `layout` (`rlx.replay.packing`): where the batch's tokens sit for the forward (default: packed when the
    model allows it); the targets are in the caller's (B, S) coordinates either way."""
    parts = decoder_parts(base)
    if layout is None:
        layout = replay_layout(base, input_ids, attention_mask, model_inputs=model_inputs)
    _, outs = layer_streams(
        base,
        layout.input_ids,
        layout.attention_mask,
        outputs=range(num_layers),
        model_inputs=model_inputs,
        position_ids=layout.position_ids,
    )
    b = input_ids.shape[0]
    rows, cols = eligible.nonzero(as_tuple=True)
    n_elig = eligible.sum(1).clamp_min(1).float()
    targets = []
    for layer in range(num_layers):
        x = rms_norm(parts.norm, layout.gather(outs[layer], rows, cols), fp32)
        ent, ids, top_logits = entropy_topk(x, parts.head, top_k, chunk)
        hmax = torch.full((b,), -torch.inf, device=ent.device).scatter_reduce(0, rows, ent, "amax")
        sel = ent <= rho * hmax[rows]
        r = rows[sel]
        count = torch.bincount(r, minlength=b).float()
        logp = torch.log_softmax(top_logits[sel].float() if fp32 else top_logits[sel], -1)
        weight = 1.0 / (count[r] * n_elig[r])
        targets.append(LayerTargets(layer, r, cols[sel], ids[sel], logp, weight))
    return targets


MAX_GATHERED_ELEMENTS = 1 << 28
"""Budget for cached (N, k, d) head rows over all layers of one batch (256 Mi elements: 512 MiB in bf16)."""


def cache_rl_head(
    targets: list[LayerTargets],
    rl: DecoderParts,
    top_k: int,
    max_gathered: int = MAX_GATHERED_ELEMENTS,
    dtype: torch.dtype | None = None,
) -> None:
    """Per layer, cache the RL head rows the loss reads: the union of base top-k ids if it is small (<= 16 k),
    else read the head in place when the loss runs in the head's own dtype (`dtype`, default the head's) and
    the device supports it, else the per-position rows while the `max_gathered`-element budget lasts."""
    w = rl.head.weight
    sparse = (dtype or w.dtype) == w.dtype and sparse_head_supported(w.device, w.dtype)
    budget = max_gathered
    for t in targets:
        if t.rows.numel():
            t.cache_head(rl.head, 16 * top_k, budget, sparse)
            if t.gathered_rows is not None:
                budget -= t.gathered_rows.numel()


class LossPlan:
    """The per-sample loss of the optimisation loop, with everything that does not change across steps made
    once. Layers are computed together where they can be (one gather of their streams, one norm, one KL call
    over all their positions): those that read the head in place (`sparse_head_kl`), and those with a small
    union of top-k ids when the union over all of them is still small (one (M, U) matmul, e.g. every layer
    of a character-vocabulary model); the others layer by layer (`LayerTargets.kl`)."""

    def __init__(self, targets: list[LayerTargets], rl: DecoderParts, batch: int, fp32: bool = False):
        self.rl, self.batch, self.fp32 = rl, batch, fp32
        live = [t for t in targets if t.rows.numel()]
        self.sparse = [t for t in live if t.sparse]
        self.others = [t for t in live if not t.sparse]
        self.union: list[LayerTargets] = []
        small = [t for t in self.others if t.local_ids is not None]
        if len(small) > 1:
            ids = torch.unique(torch.cat([t.top_ids for t in small]))
            if ids.numel() <= 16 * small[0].top_ids.shape[1]:
                self.union = small
                self.others = [t for t in self.others if t.local_ids is None]
        self._group: dict | None = None
        self._union: dict | None = None

    def _union_constants(self, dtype: torch.dtype) -> dict[str, Any]:
        if self._union is None:
            ts = self.union
            ids, local = torch.unique(torch.cat([t.top_ids for t in ts]), return_inverse=True)
            rows, bias = head_rows_at(self.rl.head, ids)
            logp = torch.cat([t.logp for t in ts]).to(dtype)
            p = logp.exp()
            self._union = dict(
                head_rows=rows.to(dtype),
                bias=bias.to(dtype) if bias is not None else None,
                local=local,
                logp=logp,
                p=p,
                p_sum=p.sum(-1),
                rows=torch.cat([t.rows for t in ts]),
                weight=torch.cat([t.weight for t in ts]),
            )
        return self._union

    def _constants(self, dtype: torch.dtype) -> dict[str, Any]:
        if self._group is None:
            ts = self.sparse
            top = torch.cat([t.top_ids for t in ts])
            order = top.argsort(-1)
            ids = top.gather(1, order)
            logp = torch.cat([t.logp for t in ts]).gather(1, order).to(dtype)
            p = logp.exp()
            bias = getattr(self.rl.head, "bias", None)
            self._group = dict(
                ids=ids,
                pattern=sparse_pattern(ids, self.rl.head.weight.shape[0], dtype),
                bias=bias.detach()[ids].to(dtype) if bias is not None else None,
                logp=logp,
                p=p,
                p_sum=p.sum(-1),
                rows=torch.cat([t.rows for t in ts]),
                weight=torch.cat([t.weight for t in ts]),
            )
        return self._group

    def _stream_rows(self, streams: dict[int, torch.Tensor], t: LayerTargets) -> torch.Tensor:
        h = streams[t.layer]
        return h[t.rows, t.cols] if t.index is None else h.reshape(-1, h.shape[-1])[t.index]

    def __call__(self, streams: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-sample loss 𝓛_i (B,) from RL streams {l: (B, S, d)} (or the layout's (R, W, d))."""
        device = streams[next(iter(streams))].device if streams else self.rl.head.weight.device
        loss = torch.zeros(self.batch, dtype=torch.float32, device=device)
        if self.sparse:
            x = rms_norm(
                self.rl.norm, torch.cat([self._stream_rows(streams, t) for t in self.sparse]), self.fp32
            )
            g = self._constants(x.dtype)
            kl = sparse_head_kl(
                x, self.rl.head.weight, g["pattern"], g["ids"], g["bias"], g["logp"], g["p"], g["p_sum"]
            )
            loss = loss.index_add(0, g["rows"], kl.float() * g["weight"])
        if self.union:
            x = rms_norm(
                self.rl.norm, torch.cat([self._stream_rows(streams, t) for t in self.union]), self.fp32
            )
            u = self._union_constants(x.dtype)
            z = x @ u["head_rows"].T
            if u["bias"] is not None:
                z = z + u["bias"]
            kl = topk_kl_fused(z.gather(1, u["local"]), u["logp"], u["p"], u["p_sum"])
            loss = loss.index_add(0, u["rows"], kl.float() * u["weight"])
        for t in self.others:
            kl = t.kl(rms_norm(self.rl.norm, self._stream_rows(streams, t), self.fp32), self.rl.head)
            loss = loss.index_add(0, t.rows, kl.float() * t.weight)
        return loss


def replay_loss(
    streams: dict[int, torch.Tensor],
    targets: list[LayerTargets],
    rl: DecoderParts,
    batch: int,
    fp32: bool = False,
) -> torch.Tensor:
    """Per-sample loss 𝓛_i (B,) from RL streams {l: (B, S, d)}; rows with no selected position contribute 0.
    (The loop builds one `LossPlan` and reuses it across steps.)"""
    return LossPlan(targets, rl, batch, fp32)(streams)


@torch.inference_mode(False)  # callable from evaluation code running under inference mode
def learnable_replay(
    rl_model: nn.Module,
    base_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eligible: torch.Tensor,
    *,
    num_layers: int = 16,
    rho: float = 0.4,
    top_k: int = 50,
    lr: float = 10.0,
    steps: int = 25,
    align: str = "code",
    fp32: bool = False,
    chunk: int = 16384,
    log_final_loss: bool = False,
    model_inputs: dict[str, Any] | None = None,
) -> LearnableReplay:
    """Optimise the offsets for a batch (left padding allowed); see the module docstring for the objective."""
    if align not in ("code", "paper"):
        from rlx.errors import UserError

        raise UserError(f"replay.align={align!r}: expected code or paper.")
    rl, base = decoder_parts(rl_model), decoder_parts(base_model)
    check_pair(rl, base)
    depth = rl.depth
    n_layers = max(1, min(num_layers, depth))
    emb = rl_model.get_input_embeddings().weight
    b, s = input_ids.shape
    mask = eligible[..., None].to(emb.dtype)
    delta = torch.zeros(b, s, emb.shape[1], dtype=emb.dtype, device=emb.device)
    empty = LearnableReplay(
        delta, eligible, n_layers, torch.zeros(0, b), torch.zeros(n_layers, b, dtype=torch.long)
    )
    if steps <= 0 and not log_final_loss:
        return empty
    targets = base_targets(
        base_model, input_ids, attention_mask, eligible, n_layers, rho, top_k, fp32, chunk, model_inputs
    )
    loss_dtype = torch.float32 if fp32 else emb.dtype
    cache_rl_head(targets, rl, top_k, dtype=loss_dtype)
    num_selected = torch.stack([torch.bincount(t.rows, minlength=b) for t in targets])
    # The loop runs each row only up to the last position a loss term reads (later positions cannot change the
    # loss under causal attention, so their offsets would get exactly zero gradient), packed when possible.
    last = torch.full((b,), -1, dtype=torch.long, device=input_ids.device)
    for t in targets:
        last = last.scatter_reduce(0, t.rows, t.cols, "amax")
    cols = torch.arange(s, device=input_ids.device)
    keep = attention_mask.bool() & (cols[None, :] <= last[:, None])
    layout = replay_layout(rl_model, input_ids, attention_mask, keep=keep, model_inputs=model_inputs)
    for t in targets:
        t.index = layout.flat[t.rows, t.cols]
    # the deepest stream (input of layer L-1 in code mode, output of layer L-1 in paper mode) is the last run
    # layer's output and is read at S_{L-1} only: that layer's MLP runs there only
    last_rows = targets[-1].index if targets[-1].rows.numel() else None
    if n_layers == 1 and align == "code":
        last_rows = None  # the l = 0 stream is the embeddings: no layer runs
    mask_l = layout.place(eligible)[..., None].to(emb.dtype)
    delta_l = torch.zeros(*mask_l.shape[:2], emb.shape[1], dtype=emb.dtype, device=emb.device)
    losses = []
    plan = LossPlan(targets, rl, b, fp32)
    record = LayerCalls()
    with frozen(rl_model), torch.enable_grad():
        for step in range(steps + (1 if log_final_loss else 0)):
            if delta_l.numel() == 0:  # no row has a selected position: the loss is 0
                losses.append(torch.zeros(b, dtype=torch.float32, device=emb.device))
                break
            delta_l.requires_grad_(True)
            streams = dict(
                inputs=range(n_layers) if align == "code" else (),
                outputs=range(n_layers) if align == "paper" else (),
                offsets=delta_l * mask_l,
            )
            if record.ready:  # steps after the first: the recorded layer calls only
                ins, outs = rerun_streams(rl_model, record, last_rows=last_rows, **streams)
            else:
                record = LayerCalls() if step == 0 else record
                ins, outs = layer_streams(
                    rl_model,
                    layout.input_ids,
                    layout.attention_mask,
                    model_inputs=model_inputs,
                    position_ids=layout.position_ids,
                    record=record if step == 0 else None,
                    last_rows=last_rows,
                    **streams,
                )
                record.release()
            per_sample = plan(ins if align == "code" else outs)
            losses.append(per_sample.detach())
            if step == steps or not per_sample.requires_grad:
                break
            (grad,) = torch.autograd.grad(per_sample.sum(), delta_l)
            delta_l = (delta_l.detach() - lr * grad).detach()
    delta = layout.scatter(delta_l.detach() * mask_l)
    return LearnableReplay(
        offsets=(delta * mask),
        eligible=eligible,
        num_layers=n_layers,
        losses=torch.stack(losses) if losses else torch.zeros(0, b),
        num_selected=num_selected,
    )
