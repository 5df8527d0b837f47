"""Direct cross-model replacement (Activation Replay's weaker baseline; the released DeepEyes/Video-R1 scripts).

Before the RL model's prefill, the base model's residual stream entering layer l is captured for l < L and,
at masked positions, written over the RL model's layer-l input during the prefill:

    M_l(i, t) = [t ∈ E_i] ∧ [H_l^base(i, t) ≤ τ_l(i)] ∧ [H_l^base(i, t) < H_l^rl(i, t)]
    h_l^rl(i, t) ← h_l^base(i, t)   where M_l(i, t)                                   (hard, no α)

τ_l is `direct_thresholds[l]` (absolute nats, strict `<` as in the scripts) or ρ · max over row i's eligible
positions. The scripts compute the entropies at layer *outputs* and replace layer *inputs* (`align="code"`);
`align="paper"` measures them on the replaced stream itself. No gradients; 2 extra prefills per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlx.errors import UserError
from rlx.replay.hooks import decoder_parts
from rlx.replay.learnable import check_pair
from rlx.replay.logit_lens import entropy_topk, rms_norm
from rlx.replay.streams import layer_streams


@dataclass
class DirectReplay:
    """Base layer inputs and replacement masks for one batch, ready to inject at prefill."""

    base_inputs: dict[int, torch.Tensor]
    """{l: (B, S, d)} base residual stream entering layer l."""
    masks: torch.Tensor
    """(L, B, S) bool positions replaced at layer l."""
    eligible: torch.Tensor
    """(B, S) bool eligible positions."""
    num_layers: int
    mode: str = field(default="direct")


def _entropies(
    parts, streams: dict[int, torch.Tensor], rows, cols, fp32: bool, chunk: int
) -> dict[int, torch.Tensor]:
    return {
        layer: entropy_topk(rms_norm(parts.norm, h[rows, cols], fp32), parts.head, 1, chunk)[0]
        for layer, h in streams.items()
    }


@torch.no_grad()
def direct_replay(
    rl_model: nn.Module,
    base_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eligible: torch.Tensor,
    *,
    num_layers: int = 7,
    rho: float = 0.4,
    thresholds: list[float] | None = None,
    require_lower: bool = True,
    align: str = "code",
    fp32: bool = False,
    chunk: int = 16384,
    model_inputs: dict[str, Any] | None = None,
) -> DirectReplay:
    """Capture base layer inputs and decide where they replace the RL model's (see module docstring)."""
    if align not in ("code", "paper"):
        raise UserError(f"replay.align={align!r}: expected code or paper.")
    rl, base = decoder_parts(rl_model), decoder_parts(base_model)
    check_pair(rl, base)
    n_layers = max(1, min(num_layers, rl.depth))
    if thresholds is not None and len(thresholds) < n_layers:
        raise UserError(
            f"replay.direct_thresholds has {len(thresholds)} values but {n_layers} layers are replaced; give one "
            "threshold (nats) per layer or leave it unset for the relative rho rule."
        )
    layers = range(n_layers)
    b_in, b_out = layer_streams(
        base_model,
        input_ids,
        attention_mask,
        inputs=layers,
        outputs=layers if align == "code" else (),
        model_inputs=model_inputs,
    )
    r_in, r_out = layer_streams(
        rl_model,
        input_ids,
        attention_mask,
        inputs=layers if align == "paper" else (),
        outputs=layers if align == "code" else (),
        model_inputs=model_inputs,
    )
    rows, cols = eligible.nonzero(as_tuple=True)
    h_base = _entropies(base, b_out if align == "code" else b_in, rows, cols, fp32, chunk)
    h_rl = (
        _entropies(rl, r_out if align == "code" else r_in, rows, cols, fp32, chunk) if require_lower else {}
    )
    bsz = input_ids.shape[0]
    masks = torch.zeros(n_layers, *input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for layer in layers:
        ent = h_base[layer]
        if thresholds is not None:
            ok = ent < thresholds[layer]
        else:
            hmax = torch.full((bsz,), -torch.inf, device=ent.device).scatter_reduce(0, rows, ent, "amax")
            ok = ent <= rho * hmax[rows]
        if require_lower:
            ok = ok & (ent < h_rl[layer])
        masks[layer, rows[ok], cols[ok]] = True
    return DirectReplay(
        base_inputs={k: v.detach() for k, v in b_in.items()},
        masks=masks,
        eligible=eligible,
        num_layers=n_layers,
    )
