"""One micro-batch's w_t = dL/dl_t split into positive / negative learning, the KL term and reweighting tertiles.

The split is the same for every estimator (estimators.py); its math is in rlx/alignment/functional.py.
"""

from __future__ import annotations

from typing import Any

import torch

from rlx.alignment import functional as am
from rlx.instruments.base import LossContext
from rlx.instruments.grad_alignment.records import MicroSplit, StepRecord
from rlx.trainers.registry import TrainerSpec

KL_FIT_TOLERANCE = 1e-3
"""Relative residual of the per-sequence KL fit above which a micro-batch's loss is not of the modelled form."""
KL_MODELLED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""TRL loss types whose per-token loss is c_i (clipped surrogate + beta KL_t) with c_i constant in a sequence."""


def distributed():
    """torch.distributed when more than one process runs, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def gather_scores(score: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' unit scores (rank-major) and this rank's offset: tertiles are ranked globally."""
    dist = distributed()
    lists: list = [None] * dist.get_world_size()
    dist.all_gather_object(lists, score.detach().cpu().tolist())
    offset = sum(len(x) for x in lists[: dist.get_rank()])
    return torch.tensor([v for x in lists for v in x], dtype=torch.float64), offset


def unmodelled_kl_terms(args: Any) -> list[str]:
    """Why GRPO's loss (TRL 1.16 `_compute_loss`, these `args`) is not the form `kl_token_weights` splits; [] if it is.

    The split models per-token loss c_i (-M_t rho_t A_t + beta KL_t) with token-level rho and the standard clip.
    Settings that change that form: another loss type (CISPO, SAPO, VESPO weight the log-prob differently),
    sequence-level importance weights (GSPO), two-sided clipping (`delta`), vLLM's importance-sampling ratio
    (multiplies the surrogate but not the KL), the top-entropy mask and off-policy sequence masking (zero the
    surrogate on some tokens, not the KL).
    """
    get = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    out = []
    if get("loss_type", "dapo") not in KL_MODELLED_LOSSES:
        out.append(f"loss_type={get('loss_type')}")
    if get("importance_sampling_level", "token") != "token":
        out.append(f"importance_sampling_level={get('importance_sampling_level')}")
    if get("delta") is not None:
        out.append(f"delta={get('delta')}")
    if get("use_vllm", False) and get("vllm_importance_sampling_correction", False):
        out.append("vLLM importance-sampling correction")
    if float(get("top_entropy_quantile", 1.0) or 1.0) < 1.0:
        out.append(f"top_entropy_quantile={get('top_entropy_quantile')}")
    if get("off_policy_mask_threshold") is not None:
        out.append(f"off_policy_mask_threshold={get('off_policy_mask_threshold')}")
    return out


def token_weights(
    ctx: LossContext, cur: StepRecord, spec: TrainerSpec, kl_unmodelled: list[str], kl_bias_correction: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(w, mask, w_kl): w_t of the loss the optimizer differentiates (times the Trainer's post-scale), the scored
    tokens, and the KL term's part of w_t when it is split off. Counts the KL fit's outcome in `cur`."""
    w = ctx.token_weights().float() * float(getattr(ctx, "post_scale", 1.0))
    mask = ctx.mask.float() if ctx.mask is not None else (w != 0).float()
    w_kl = None
    ref = ctx.extras.get("ref_logps")
    # A KL *loss term* (GRPO beta > 0) is a third component; PPO folds its KL penalty into the reward (in A_t).
    beta = spec.kl_coef(ctx.trainer)
    if ref is not None and beta != 0.0 and ctx.extras.get("advantages") is not None:
        if kl_unmodelled:  # not split: pos / neg keep the KL term's weight; rows say so (kl_split)
            cur.kl_unmodelled += 1
            cur.kl_reason = ", ".join(kl_unmodelled)
            return w, mask, None
        C = ctx.completion_len
        w_kl = torch.zeros_like(w)
        w_kl[:, -C:], residual = am.kl_token_weights(
            w[:, -C:],
            mask[:, -C:],
            ctx.completion_logps,
            ref,
            ctx.extras["advantages"],
            beta,
            ctx.extras.get("old_logps"),
            getattr(ctx.trainer, "epsilon_low", None),
            getattr(ctx.trainer, "epsilon_high", None),
            bias_correction=kl_bias_correction,
            return_residual=True,
        )
        cur.kl_residual = max(cur.kl_residual, residual)
        if residual > KL_FIT_TOLERANCE:  # the loss is not the modelled form: leave the KL in pos / neg
            w_kl.zero_()
            cur.kl_unmodelled += 1
            cur.kl_reason = f"KL fit residual {residual:.2g}"
        else:
            cur.kl_fit += 1
    return w, mask, w_kl


def pair_index(ctx: LossContext, spec: TrainerSpec) -> torch.Tensor | None:
    """(B,) pair of each row for pair-level tertiles (DPO: rows [chosen; rejected]); None for other levels."""
    if "pair_index" in ctx.extras:
        return ctx.extras["pair_index"]
    B = ctx.token_logps.shape[0]
    return torch.arange(B) % max(B // 2, 1) if spec.tertile_level == "pair" else None


def split_micro_batch(
    ctx: LossContext, w: torch.Tensor, mask: torch.Tensor, w_kl: torch.Tensor | None, spec: TrainerSpec
) -> MicroSplit:
    """Components (pos, neg, kl) and tertiles (top, mid, bot, ranked over all ranks) of `w`."""
    comps = am.component_weights(w, mask, w_kl)
    units = am.reweighting_units(spec.tertile_level, mask, pair_index(ctx, spec))
    terts = am.tertile_weights(comps["pos"] + comps["neg"], units, gather_scores if distributed() else None)
    return MicroSplit(w=w, mask=mask, w_kl=w_kl, comps=comps, units=units, terts=terts)
