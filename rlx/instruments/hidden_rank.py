"""The `hidden_rank` monitor: effective rank of each rollout's last hidden states and its differences over the
response, by reward bucket (the hidden-state RLVR method, hf618/VERL; docs/probes.md).

Per measured step (step 1 and every `every` steps; on-policy steps only when the trainer reuses rollouts):

    on_loss (each micro-batch)   X_i = post-final-norm states at the positions that predict rollout i's completion
                                 tokens (`ctx.completion_hidden` under `ctx.completion_mask`): erank(X_i), the
                                 prefix eranks and their mean first / second differences d1_i, d2_i
                                 (rlx/algorithms/effective_rank.py), collected per rollout with its reward
    on_step_end                  rows gathered over ranks; metrics hidden_rank/{erank,d1,d2}[_correct|_wrong]
                                 (means over rollouts); rank 0 writes the step's rows
                                 diagnostics/hidden_rank/step_NNNNNN.parquet (joins the rollout dumps on sample_id)

`needs_hidden` is true only while a measured step runs, so other steps do not hook the backbone (unless another
instrument needs the states). No state outlives a step: resume needs nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlx import dumps
from rlx.algorithms.effective_rank import DIFFS, FORMS, trajectory_ranks
from rlx.algorithms.probing import StepRows, reward_buckets
from rlx.errors import UserError
from rlx.instruments.base import LossContext, log_metrics, register_instrument
from rlx.instruments.monitor import RolloutMonitor

METRICS = ("erank", "d1", "d2")
"""Per-rollout values, each logged as hidden_rank/<v> (mean over rollouts) and hidden_rank/<v>_<bucket>."""


def bucket_means(cols: dict[str, torch.Tensor], names: tuple[str, ...], threshold: float) -> dict[str, float]:
    """Mean over rollouts of each column in `names` (finite values only), overall as `<name>` and per reward
    bucket as `<name>_correct` / `<name>_wrong` (`reward_buckets`); NaN where no rollout has a finite value."""
    buckets = {"": torch.ones_like(cols["reward"], dtype=torch.bool)}
    buckets.update({f"_{k}": v for k, v in reward_buckets(cols["reward"], threshold).items()})
    out = {}
    for name in names:
        v = cols[name].double()
        for suffix, sel in buckets.items():
            x = v[sel & torch.isfinite(v)]
            out[f"{name}{suffix}"] = float(x.mean()) if x.numel() else math.nan
    return out


@register_instrument("hidden_rank")
class HiddenRank(RolloutMonitor):
    """Effective rank of the last hidden states over each response, with its prefix differences, per reward bucket."""

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        name = "diagnostics.hidden_rank"
        if int(cfg.every) < 1:
            raise UserError(f"{name}.every={cfg.every}: expected an integer >= 1 (measure every N steps).")
        if int(cfg.stride) < 1:
            raise UserError(
                f"{name}.stride={cfg.stride}: expected an integer >= 1 (prefix windows of j*stride + 1 tokens)."
            )
        if cfg.form not in FORMS:
            raise UserError(f"{name}.form={cfg.form!r}: expected one of {', '.join(FORMS)}.")
        if cfg.diff not in DIFFS:
            raise UserError(f"{name}.diff={cfg.diff!r}: expected one of {', '.join(DIFFS)}.")
        if int(cfg.max_tokens) < 0:
            raise UserError(f"{name}.max_tokens={cfg.max_tokens}: expected an integer >= 0 (0 = no cap).")
        if not math.isfinite(float(cfg.threshold)):
            raise UserError(f"{name}.threshold={cfg.threshold}: expected a finite reward threshold.")
        self.rows = StepRows()
        """The measured step's per-rollout values, over its micro-batches."""
        self.last_metrics: dict[str, float] = {}
        """The logger metrics of the last measured step (without NaNs dropped)."""

    @property
    def needs_hidden(self) -> bool:  # type: ignore[override]
        """Only measured steps read `ctx.hidden`: on the others the seam does not hook the backbone for us."""
        return self.measuring()

    def on_train_begin(self, trainer: Any) -> None:
        self.bind(trainer)

    # ---- per micro-batch ----------------------------------------------------------------------------------

    def on_loss(self, ctx: LossContext) -> None:
        trainer = ctx.trainer
        self.bind(trainer)
        model = getattr(trainer, "model", None)
        if ctx.hidden is None or ctx.mask is None or not torch.is_grad_enabled():
            return None
        if model is not None and not model.training:
            return None
        if not self.measuring():
            return None
        cfg = self.cfg
        with torch.no_grad():
            mask = ctx.completion_mask.detach() > 0
            r = trajectory_ranks(
                ctx.completion_hidden.detach(),
                mask,
                int(cfg.stride),
                center=bool(cfg.center),
                form=str(cfg.form),
                diff=str(cfg.diff),
                max_tokens=int(cfg.max_tokens),
            )
        n = mask.shape[0]
        rewards = ctx.extras.get("rewards")
        if rewards is None:
            rewards = torch.full((n,), float("nan"))
        self.rows.add(
            ctx.extras.get("sample_ids"),
            reward=rewards.detach().float(),
            length=mask.sum(1),
            erank=r["erank"],
            d1=r["d1"],
            d2=r["d2"],
            n_prefixes=r["n_prefixes"],
        )
        return None

    # ---- step end -------------------------------------------------------------------------------------------

    def on_step_end(self, trainer: Any) -> None:
        self.bind(trainer)
        step = int(trainer.state.global_step)
        if not self.measured(step):
            return
        cols = self.rows.gather(getattr(trainer, "accelerator", None))  # a collective: every rank calls it
        if not cols:
            return
        metrics = bucket_means(cols, METRICS, float(self.cfg.threshold))
        self.last_metrics = metrics
        if getattr(trainer, "_metrics", None) is not None:
            finite = {f"hidden_rank/{k}": v for k, v in metrics.items() if math.isfinite(v)}
            log_metrics(trainer, finite, reduce="none", mode="train")
        if not self.cfg.save_rows or not getattr(self.run, "is_main", True) or self.run.writer is None:
            return
        rows = [
            {
                "sample_id": int(sid),
                "step": step,
                "reward": float(cols["reward"][i]),
                "length": int(cols["length"][i]),
                "erank": float(cols["erank"][i]),
                "d1": float(cols["d1"][i]),
                "d2": float(cols["d2"][i]),
                "n_prefixes": int(cols["n_prefixes"][i]),
            }
            for i, sid in enumerate(cols["sample_id"].tolist())
        ]
        self.run.writer.write(dumps.HIDDEN_RANK, rows, step=step)
