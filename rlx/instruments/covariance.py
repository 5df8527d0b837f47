"""The Cov(log pi, A) instruments of Cui et al. (arXiv 2505.22617): the Clip-Cov and KL-Cov regularizers and the
`entropy_cov` diagnostic. The covariance and the token selections are pure functions in
`rlx/regularizers/covariance.py`.

- `clip_cov`: Clip-Cov: the gradient through a random `clip_ratio` share of
  tokens with Cov_t in (lb, ub) is removed. With w_t = dL/dl_t from the seam, adding
  -(w_t.detach() * (l_t - l_t.detach())) for those tokens cancels exactly their gradient, for every TRL
  loss type and normaliser, and leaves the loss value unchanged.
- `kl_cov`:   KL-Cov as in verl's `compute_policy_loss_kl_cov` (`kl_variant: reference`, default): the
  policy-gradient loss is the unclipped token-mean of -A_t rho_t over every completion token, plus
  kl_coef * |l_t - l_t^old| on the top max(1, int(kl_ratio * n)) tokens by Cov_t (token-mean over the same
  n tokens). The trainer's own (clipped) policy-gradient gradient is cancelled through w_t as in Clip-Cov,
  so the gradient is exactly verl's whatever TRL's loss type; the loss value keeps the trainer's value plus
  the penalty. `kl_variant: penalty` keeps the trainer's clipped loss and adds only the penalty on the top
  int(kl_ratio * n) tokens (which may be none).
- `entropy_cov` (diagnostic, on for every GRPO run): logs the batch covariance mean_t Cov_t, the
  quantity that drives the entropy change under policy gradient (Cui et al. Eq. 8).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rlx.errors import UserError
from rlx.instruments.base import Instrument, LossContext, LossTerm, register_instrument
from rlx.regularizers.covariance import clip_cov_selection, kl_cov_selection, token_covariance


def _completion_advantages(ctx: LossContext) -> torch.Tensor:
    return ctx.extras["advantages"]


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
    """KL-Cov: verl's unclipped -A rho loss + kl_coef * |log pi - log pi_old| on the top-covariance tokens."""

    VARIANTS = ("reference", "penalty")

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        if cfg.kl_variant not in self.VARIANTS:
            raise UserError(
                f"regularizers.kl_cov.kl_variant={cfg.kl_variant!r}: expected reference (verl's KL-Cov, default) "
                "or penalty (the trainer's clipped loss plus the penalty only)."
            )
        self._warned = False

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        cfg = self.cfg
        reference = cfg.kl_variant == "reference"
        mask = ctx.completion_mask
        logps = ctx.completion_logps
        old = ctx.extras.get("old_logps")
        if old is None:
            if not self._warned:
                warnings.warn(
                    "kl_cov: the trainer passed no old log-probs (on-policy GRPO), so |log pi - log pi_old| = 0 "
                    "and the KL-Cov penalty is 0; use trainer.num_iterations > 1 or steps_per_generation > "
                    "gradient_accumulation_steps (recipes/grpo_klcov_tiny.yaml does).",
                    stacklevel=2,
                )
                self._warned = True
            old = logps.detach()
        old = old.to(logps.dtype)
        cov = self._cov(ctx)
        sel = kl_cov_selection(cov, mask, cfg.kl_ratio, at_least_one=reference)
        n = mask.sum().clamp_min(1.0)
        penalty = (sel * (logps - old).abs()).sum() / n
        total = cfg.kl_coef * penalty
        if reference:
            adv = _completion_advantages(ctx).detach().to(logps.dtype)
            if adv.dim() == 1:
                adv = adv[:, None].expand_as(logps)
            rho = torch.exp(logps - old)
            pg = (-adv * rho * mask).sum() / n  # verl: unclipped, every token, token-mean
            w_pg = self._policy_gradient_weights(ctx)
            scale = ctx.loss_scale if ctx.loss_scale else 1.0
            cancel = -(w_pg * (logps - logps.detach())).sum() / scale  # removes the trainer's PG gradient
            total = total + cancel + (pg - pg.detach())  # gradient of pg, value of the trainer's loss
        metrics = {
            "kl_cov/selected_frac": float(sel.sum() / n),
            "kl_cov/penalty": float(penalty.detach()),
            "kl_cov/cov_mean": float(cov.sum() / n),
        }
        return LossTerm(total, metrics)

    @staticmethod
    def _policy_gradient_weights(ctx: LossContext) -> torch.Tensor:
        """(B, C) w_t of the trainer's policy-gradient loss: dL/dl_t less the k3 KL loss term when beta > 0."""
        c = ctx.completion_len
        w = ctx.token_weights()[:, -c:]
        beta = ctx.spec.kl_coef(ctx.trainer)
        ref = ctx.extras.get("ref_logps")
        if beta == 0.0 or ref is None:
            return w  # no KL term in the loss (PPO folds its KL into the reward): w is all policy gradient
        from rlx.alignment.functional import kl_token_weights

        w_kl = kl_token_weights(
            w,
            ctx.completion_mask,
            ctx.completion_logps,
            ref,
            ctx.extras["advantages"],
            beta,
            ctx.extras.get("old_logps"),
            getattr(ctx.trainer, "epsilon_low", None),
            getattr(ctx.trainer, "epsilon_high", None),
        )
        return w - w_kl.to(w.dtype)


@register_instrument("entropy_cov")
class EntropyCovariance(Instrument):
    """Diagnostic: Cov(log pi, A) of the completion tokens, every loss call (on in every run of an algorithm
    whose spec lists it in `default_instruments`, e.g. GRPO)."""

    changes_loss = False
    top_ratio = 0.002

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
