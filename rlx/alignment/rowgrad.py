"""Per-sequence gradient alignment and row-subset gradients from the trainer's own backward (no extra backward).

For a layer with weight W, out = f(W, in), the gradient of a loss is sum over rows b and positions t of
d out_bt / dW contracted with delta_bt = dL/d out_bt. Decoder rows never interact, so for any subset S of rows
grad_W L_S = sum_{b in S, t} (delta_bt contracted with in_bt), exactly, from the (in, delta) pairs of ONE backward
of the whole batch (the trick behind ghost clipping and LoGra, arXiv 2405.13954). Per row b,
s_b = <g_T, grad L_b> = sum_layers sum_t <delta_bt, dout/dW . g_T> is a cheap contraction.

Handled parameter owners: nn.Linear (weight, bias; LoRA adapters are nn.Linear), nn.Embedding (padding row
excluded), RMSNorm-like modules (`weight`, `variance_epsilon`/`eps`, y = w * x / rms(x)). The LM head, when
applied inside TRL's fused head (not as a module call), is handled analytically from its input states:
dl_t/dW = (e_y - p_t) h_t^T / T. If any trainable parameter has no handler, `supported` is False and the
caller uses per-component backwards instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _norm_eps(m: nn.Module) -> float | None:
    if not type(m).__name__.endswith("RMSNorm"):
        return None
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(m, attr, None), float):
            return getattr(m, attr)
    return None


@dataclass
class LayerRecord:
    """One hooked module call of an armed forward: its input, and dL/d(output) once the backward reached it."""

    module: nn.Module
    kind: str
    """linear, embedding or rmsnorm."""
    weight_index: int | None
    """Index of the module's weight in the parameter scope (None: not in it)."""
    bias_index: int | None
    inputs: torch.Tensor
    """The module's input (token ids for an embedding), detached."""
    out_grad: torch.Tensor | None = None
    """dL/d(output) from the trainer's backward; None until it ran."""


def _as_record(rec: LayerRecord | Sequence[Any]) -> LayerRecord:
    return rec if isinstance(rec, LayerRecord) else LayerRecord(*rec)


class RowCapture:
    """Forward hooks that record (module, input) during an armed forward and dL/d(output) in the next backward."""

    def __init__(self, policy: nn.Module, params: Sequence[nn.Parameter], head: nn.Module | None):
        index = {id(p): i for i, p in enumerate(params)}
        self.owners: list[tuple[nn.Module, str, int | None, int | None]] = []
        covered: set[int] = set()
        for m in policy.modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in index]
            if not own:
                continue
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            wi = index.get(id(w)) if isinstance(w, nn.Parameter) else None
            bi = index.get(id(b)) if isinstance(b, nn.Parameter) else None
            if isinstance(m, nn.Linear):
                kind = "linear"
            elif isinstance(m, nn.Embedding):
                kind = "embedding"
            elif _norm_eps(m) is not None and bi is None:
                kind = "rmsnorm"
            else:
                continue
            self.owners.append((m, kind, wi, bi))
            covered.update(i for i in (wi, bi) if i is not None)
        self.head = head
        self.head_index = index.get(id(head.weight)) if head is not None else None
        # the head weight may also be covered as a module (tied embedding or a plain lm_head call)
        missing = (
            set(range(len(params))) - covered - ({self.head_index} if self.head_index is not None else set())
        )
        self.supported = not missing
        self.records: list[LayerRecord] = []
        self.armed = False
        self.accept_grads = False
        self._handles: list[Any] = []

    def attach(self) -> None:
        for m, kind, wi, bi in self.owners:
            self._handles.append(m.register_forward_hook(self._make_hook(m, kind, wi, bi)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start(self) -> None:
        """Arm for one forward: earlier records are dropped."""
        self.records, self.armed, self.accept_grads = [], True, False

    def _make_hook(self, m, kind, wi, bi):
        def hook(module, inputs, out):
            if not self.armed or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
                return
            if not out.requires_grad:
                return
            rec = LayerRecord(module, kind, wi, bi, inputs[0].detach())

            def grad_hook(g, rec=rec):
                if self.accept_grads and rec.out_grad is None:
                    rec.out_grad = g.detach()

            out.register_hook(grad_hook)
            self.records.append(rec)

        return hook

    def complete(self) -> bool:
        return bool(self.records) and all(r.out_grad is not None for r in self.records)

    def head_called(self) -> bool:
        return self.head is not None and any(r.module is self.head for r in self.records)


def row_alignment(
    records: Sequence[LayerRecord | Sequence[Any]],
    gT: Sequence[torch.Tensor],
    subsets: dict[str, torch.Tensor],
    n_params: int,
    shapes: Sequence[torch.Size],
    head: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor | None]]]:
    """(s, vecs): s (B,) float64 per-row <g_T, grad L_b>; vecs[name] the gradient of the rows in subset `name`.

    `records`: LayerRecord, or sequences of its six fields in order. `subsets` maps names to (B,) bool row masks. `head` (analytic fused head): {"weight_index", "hidden" (B, T, d)
    head inputs, "labels" (B, T), "coef" (B, T) the dL/dl_t the backward used, "weight" (V, d), "scale"
    (logit_scale / temperature)}. Unused parameters of a subset are None (zero).
    """
    s = None
    vecs: dict[str, list[torch.Tensor | None]] = {k: [None] * n_params for k in subsets}

    def add(name, i, g):
        cur = vecs[name][i]
        vecs[name][i] = g if cur is None else cur + g

    for rec in map(_as_record, records):
        module, kind, wi, bi, x = rec.module, rec.kind, rec.weight_index, rec.bias_index, rec.inputs
        d = rec.out_grad.float()
        B = d.shape[0]
        s_m = torch.zeros(B, dtype=torch.float64, device=d.device)
        if kind == "linear":
            x = x.float()
            d3, x3 = d.reshape(B, -1, d.shape[-1]), x.reshape(B, -1, x.shape[-1])
            if wi is not None:
                s_m += ((d3 @ gT[wi].to(d3)) * x3).sum((1, 2)).double()
                for name, rows in subsets.items():
                    if rows.any():
                        add(name, wi, torch.einsum("bto,bti->oi", d3[rows], x3[rows]))
            if bi is not None:
                s_m += (d3.sum(1) @ gT[bi].to(d3)).double()
                for name, rows in subsets.items():
                    if rows.any():
                        add(name, bi, d3[rows].sum((0, 1)))
        elif kind == "embedding":
            ids = x.long()
            d3 = d.reshape(B, -1, d.shape[-1])
            ids = ids.reshape(B, -1)
            if module.padding_idx is not None:
                d3 = d3 * (ids != module.padding_idx)[..., None]
            s_m += (gT[wi].to(d3)[ids] * d3).sum((1, 2)).double()
            for name, rows in subsets.items():
                if rows.any():
                    g = torch.zeros(shapes[wi], dtype=d3.dtype, device=d3.device)
                    g.index_add_(0, ids[rows].reshape(-1), d3[rows].reshape(-1, d3.shape[-1]))
                    add(name, wi, g)
        else:  # rmsnorm
            xf = x.float()
            xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _norm_eps(module))
            prod = (d * xh.to(x.dtype).float()).reshape(B, -1, d.shape[-1])
            s_m += (prod @ gT[wi].to(prod)).sum(1).double()
            for name, rows in subsets.items():
                if rows.any():
                    add(name, wi, prod[rows].sum((0, 1)))
        s = s_m if s is None else s + s_m
    if head is not None:
        i = head["weight_index"]
        h, W = head["hidden"].float(), head["weight"].float()
        z = (h @ W.T) * head["scale"]
        p = torch.softmax(z, -1)
        e = -p
        e.scatter_add_(
            -1, head["labels"][..., None], torch.ones_like(head["labels"][..., None], dtype=e.dtype)
        )
        c = head["coef"].float()[..., None] * e * head["scale"]  # (B, T, V): dL/dz . dz/d(W h)
        s_h = ((c @ gT[i].to(c)) * h).sum((1, 2)).double()
        s = s_h if s is None else s + s_h
        for name, rows in subsets.items():
            if rows.any():
                add(name, i, torch.einsum("btv,btd->vd", c[rows], h[rows]))
    return s, vecs
