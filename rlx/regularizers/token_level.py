"""Token-level exploration regularizers behind the seam, and the always-on Cov(log pi, A) diagnostic.

- `entropy`:  loss -= coef * token-mean entropy of the completion tokens.
- `clip_cov`: Clip-Cov (Cui et al., arXiv 2505.22617): the gradient through a random `clip_ratio` share of
  tokens with Cov_t in (lb, ub) is removed. With w_t = dL/dl_t from the seam, adding
  -(w_t.detach() * (l_t - l_t.detach())) for those tokens cancels exactly their gradient, for every TRL
  loss type and normaliser, and leaves the loss value unchanged.
- `kl_cov`:   KL-Cov: + kl_coef * |l_t - l_t^old| on the top `kl_ratio` share of tokens by Cov_t,
  token-mean over the micro-batch's completion tokens (verl adds it to the token loss before token-mean).
- `entropy_cov` (diagnostic, on for every GRPO run): logs the batch covariance mean_t Cov_t, the
  quantity that drives the entropy change under policy gradient (Cui et al. Eq. 8).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rlx.instruments.base import Instrument, LossContext, LossTerm, register_instrument
from rlx.regularizers.covariance import clip_cov_selection, kl_cov_selection, token_covariance


def _completion_advantages(ctx: LossContext) -> torch.Tensor:
    return ctx.extras["advantages"]


@register_instrument("entropy")
class EntropyBonus(Instrument):
    """loss -= coef * mean entropy over completion tokens (per micro-batch; the seam applies GA scaling)."""

    changes_loss = True

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        if ctx.entropy is None:
            raise RuntimeError("the entropy regularizer needs per-token entropies; this trainer passes none")
        ent = ctx.entropy[:, -ctx.completion_len :]
        mask = ctx.completion_mask
        mean_ent = (ent * mask).sum() / mask.sum().clamp_min(1.0)
        return LossTerm(-self.cfg.coef * mean_ent, {"entropy_bonus/entropy": float(mean_ent.detach())})


class _CovRegularizer(Instrument):
    changes_loss = True

    def _cov(self, ctx: LossContext) -> torch.Tensor:
        return token_covariance(ctx.completion_logps, _completion_advantages(ctx), ctx.completion_mask)

    def _step(self, ctx: LossContext) -> int:
        return int(getattr(getattr(ctx.trainer, "state", None), "global_step", 0) or 0)


@register_instrument("clip_cov")
class ClipCov(_CovRegularizer):
    """Detach the gradient of a random `clip_ratio` share of tokens with covariance in (lb, ub)."""

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        self.calls = 0

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        cfg = self.cfg
        c = ctx.completion_len
        mask = ctx.completion_mask
        w = ctx.token_weights()[:, -c:]
        cov = self._cov(ctx)
        seed = int(getattr(getattr(self.run, "cfg", None), "seed", 0) or 0)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self._step(ctx) * 1009 + self.calls)
        self.calls += 1
        # tokens whose gradient is already zero (cut by the PPO clip) are not eligible, as in verl
        sel = clip_cov_selection(cov, mask, cfg.clip_ratio, cfg.clip_cov_lb, cfg.clip_cov_ub, gen, w != 0)
        logps = ctx.completion_logps
        cancel = -(w * sel * (logps - logps.detach())).sum()
        scale = ctx.loss_scale if ctx.loss_scale else 1.0
        metrics = {
            "clip_cov/clipped_frac": float(sel.sum() / mask.sum().clamp_min(1.0)),
            "clip_cov/cov_mean": float(cov.sum() / mask.sum().clamp_min(1.0)),
        }
        return LossTerm(cancel / scale, metrics)


@register_instrument("kl_cov")
class KLCov(_CovRegularizer):
    """kl_coef * |log pi - log pi_old| on the top `kl_ratio` share of tokens by covariance."""

    _warned = False

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        cfg = self.cfg
        mask = ctx.completion_mask
        logps = ctx.completion_logps
        old = ctx.extras.get("old_logps")
        if old is None:
            if not self._warned:
                warnings.warn(
                    "kl_cov: the trainer passed no old log-probs (on-policy GRPO), so |log pi - log pi_old| = 0 "
                    "and KL-Cov has no effect; use trainer.num_iterations > 1 or steps_per_generation > "
                    "gradient_accumulation_steps (recipes/grpo_klcov_tiny.yaml does).",
                    stacklevel=2,
                )
                self._warned = True
            old = logps.detach()
        cov = self._cov(ctx)
        sel = kl_cov_selection(cov, mask, cfg.kl_ratio)
        n = mask.sum().clamp_min(1.0)
        penalty = (sel * (logps - old.to(logps.dtype)).abs()).sum() / n
        metrics = {
            "kl_cov/selected_frac": float(sel.sum() / n),
            "kl_cov/penalty": float(penalty.detach()),
            "kl_cov/cov_mean": float(cov.sum() / n),
        }
        return LossTerm(cfg.kl_coef * penalty, metrics)


@register_instrument("entropy_cov")
class EntropyCovariance(Instrument):
    """Diagnostic: Cov(log pi, A) of the completion tokens, every loss call of every GRPO run."""

    changes_loss = False
    top_ratio = 0.002

    @classmethod
    def always_on(cls, cfg: Any) -> bool:
        return cfg.algo == "grpo"

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        if ctx.token_logps is None or "advantages" not in ctx.extras:
            return None
        mask = ctx.completion_mask
        cov = token_covariance(ctx.completion_logps, ctx.extras["advantages"], mask)
        n = mask.sum().clamp_min(1.0)
        top = kl_cov_selection(cov, mask, self.top_ratio)
        k = top.sum()
        return LossTerm(
            None,
            {
                "entropy_cov/cov": float(cov.sum() / n),
                "entropy_cov/cov_top": float((cov * top).sum() / k) if int(k) > 0 else float(cov.max()),
            },
        )
