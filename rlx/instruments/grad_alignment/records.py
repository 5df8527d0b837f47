"""The instrument's records: what one micro-batch contributes and what one logged step accumulates.

Table rows (`rlx.dumps.GRAD_ALIGNMENT`) stay dicts: they are the dump's declared columns, checked by the writer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rlx.alignment.functional import Vec
from rlx.alignment.rowgrad import LayerRecord


@dataclass
class MicroSplit:
    """One micro-batch's w_t = dL/dl_t and its split, (B, S-1) each (docs/gradient_alignment.md)."""

    w: torch.Tensor
    """w_t of the loss the optimizer differentiates (the Trainer's post-scale included)."""
    mask: torch.Tensor
    """1 on scored tokens."""
    w_kl: torch.Tensor | None
    """The KL term's part of w_t when it was split off (GRPO with beta > 0), else None."""
    comps: dict[str, torch.Tensor]
    """Component weights: pos, neg (and kl), summing to w * mask."""
    units: torch.Tensor
    """Reweighting unit of each token (sequence, pair or token; -1 off the mask)."""
    terts: dict[str, torch.Tensor]
    """Tertile weights top / mid / bot of pos + neg, ranked by unit (globally over ranks)."""


@dataclass
class TokenWeights:
    """One micro-batch's token weights, kept for `save_token_weights` (CPU tensors)."""

    w: torch.Tensor
    mask: torch.Tensor
    w_kl: torch.Tensor
    sample_id: torch.Tensor
    """(B,) rollout sample ids (GRPO/PPO, joins diagnostics/rollouts); -1 without."""


@dataclass
class StepRecord:
    """Accumulators of one logged optimizer step (summed over micro-batches; local to the rank)."""

    step: int
    gT: Vec | None = None
    """g_T = grad R_T over the parameter scope (parameter variant)."""
    gT_head: torch.Tensor | None = None
    """g_T restricted to the LM head weight (activation variant)."""
    R_T: float = math.nan
    """NLL of the target set D' before the step."""
    vec: dict[str, Vec] = field(default_factory=dict)
    """Gradient of each component (pos, neg, kl)."""
    G: dict[str, float] = field(default_factory=dict)
    """<g_T, gradient> of components and tertiles accumulated directly."""
    n_tokens: dict[str, float] = field(default_factory=dict)
    total: Vec | None = None
    """The optimizer's gradient, complete and before clipping."""
    theta: Vec | None = None
    """The parameters before the update (for the realised `update` row)."""
    tok: list[TokenWeights] = field(default_factory=list)
    micro: int = 0
    kl_fit: int = 0
    """Micro-batches whose KL part was split off by the fit."""
    kl_unmodelled: int = 0
    """Micro-batches with a KL term that was not split (see `unmodelled_kl_terms`)."""
    kl_residual: float = 0.0
    """Largest relative residual of the KL fit."""
    kl_reason: str = ""
    failed: bool = False
    """A row capture missed its backward: the components of this step are unknown."""
    neg_from_total: bool = False
    """Row path: only pos was formed; neg = total - pos at step end."""


@dataclass
class PendingRows:
    """A micro-batch measured on the row path, processed once the trainer's backward filled its records."""

    records: list[LayerRecord]
    pos: torch.Tensor
    """(B,) rows of positive learning."""
    neg: torch.Tensor
    tier: torch.Tensor
    """(B,) tertile of each row (0 top, 1 mid, 2 bot)."""
    head: dict[str, Any] | None
    """The fused LM head's inputs for `row_alignment`, or None when the head ran as a module."""
    cur: StepRecord
