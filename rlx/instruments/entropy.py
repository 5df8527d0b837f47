"""The `entropy` regularizer: an entropy bonus, loss -= coef * token-mean entropy of the completion tokens."""

from __future__ import annotations

from rlx.algorithms.stats import masked_mean
from rlx.instruments.base import Instrument, LossContext, LossTerm, register_instrument


@register_instrument("entropy")
class EntropyBonus(Instrument):
    """loss -= coef * mean entropy over completion tokens (per micro-batch; the seam applies GA scaling)."""

    changes_loss = True

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        if ctx.entropy is None:
            raise RuntimeError("the entropy regularizer needs per-token entropies; this trainer passes none")
        ent = ctx.entropy[:, -ctx.completion_len :]
        mask = ctx.completion_mask
        mean_ent = masked_mean(ent, mask)
        return LossTerm(-self.cfg.coef * mean_ent, {"entropy_bonus/entropy": float(mean_ent.detach())})
