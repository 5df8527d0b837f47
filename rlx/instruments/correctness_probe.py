"""The `correctness_probe` monitor: does the policy carry a linear signal of whether its own answer is correct,
does it read better than the policy's own confidence, and does the RL update push along it (docs/probes.md).

The RepE / LAT reading at the final token (arXiv 2512.07404: a direction from correct-minus-wrong contrasts at the
last token ranks candidate answers better than their mean log-likelihood), on the rollout groups RL already has:
the completions of one prompt are contrast pairs labelled by the task reward. Per measured step (step 1, whose loss
forward runs on the weights before any update, and every `every` steps; the on-policy step of a reused rollout):

    taps (before each loss forward)   the residual stream at each chosen layer (`residual_tap`), measured steps only
    on_loss (each micro-batch)        h_i = the state at each rollout's last completion token, its reward, group,
                                      mean token log-prob; with `update_alignment`, g += sum over response positions
                                      of dL/dh (one autograd call on the trainer's loss, graph kept)
    on_step_end                       rows gathered over ranks (StepRows), g summed over ranks; per layer: fit the
                                      direction on the fit half of the prompt groups (rlx/algorithms/correctness.py),
                                      score the held-out half, AUROC vs the mean log-prob AUROC, drift to the first
                                      direction, cos(v, -g); metrics correctness_probe/*; rank 0 writes the step's
                                      rows, per-rollout scores and directions (rlx.dumps.CORRECTNESS_PROBE*)

g is the activation-space form of the update alignment (like grad_alignment's activation variant): -dL/dh is where
the loss would move the residual states of the response, cos(v, -g) > 0 means it pushes them along the correctness
direction. It is summed over the positions that predict completion tokens, not taken at the answer-final token:
that state predicts nothing the loss scores, so its gradient is exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rlx import dumps
from rlx.algorithms import correctness as cm
from rlx.algorithms.probing import StepRows
from rlx.errors import UserError
from rlx.instruments.base import (
    LossContext,
    Tap,
    decoder_layers,
    log_metrics,
    register_instrument,
    residual_tap,
    unwrap_policy,
)
from rlx.instruments.monitor import RolloutMonitor

PREFIX = "correctness_probe"
LAYER_METRICS = ("auroc", "gap", "pairwise_acc", "cos_to_first", "update_cos")
"""Logged per layer as correctness_probe/L{l}/<name>, and for the primary layer as correctness_probe/<name>."""
STEP_METRICS = ("auroc_logp", "pairwise_acc_logp", "accuracy", "n_fit_groups", "n_eval")
"""Logged once per measured step as correctness_probe/<name> (they do not depend on the layer)."""


def resolve_layers(layers: Any, n_blocks: int) -> list[int]:
    """The chosen layers as indices 0..L in HF hidden_states order (negative: from the end, -1 = L), in the given
    order without repeats; None: [max(1, L // 2), L]. UserError for an index out of range."""
    if layers is None:
        return list(dict.fromkeys([max(1, n_blocks // 2), n_blocks]))
    out = []
    for raw in list(layers):
        layer = int(raw)
        idx = n_blocks + 1 + layer if layer < 0 else layer
        if not 0 <= idx <= n_blocks:
            raise UserError(
                f"diagnostics.correctness_probe.layers: {raw} is out of range for a model with {n_blocks} blocks: "
                f"expected 0..{n_blocks} (0 = embeddings, {n_blocks} = last block) or -{n_blocks + 1}..-1 "
                "(from the end). Fix the list or leave it unset (the middle and last block)."
            )
        if idx not in out:
            out.append(idx)
    return out


@dataclass
class _Step:
    """What one measured step has collected so far on this rank."""

    step: int
    rows: StepRows = field(default_factory=StepRows)
    grad: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> sum of dL/dh over this rank's response positions, float64 (d,)."""
    micro: int = 0
    width: int = 0
    """d, the residual width."""


@register_instrument("correctness_probe")
class CorrectnessProbe(RolloutMonitor):
    """Per measured step and layer: held-out AUROC of a correctness direction vs the policy's mean log-prob, drift
    to the first direction, and the alignment of the loss gradient on the residual stream with it."""

    needs_hidden = False

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        name = f"diagnostics.{PREFIX}"
        if int(cfg.every) < 1:
            raise UserError(f"{name}.every={cfg.every}: expected an integer >= 1 (measure every N steps).")
        if cfg.direction not in cm.DIRECTIONS:
            raise UserError(
                f"{name}.direction={cfg.direction!r}: expected one of {', '.join(cm.DIRECTIONS)} "
                "(diff_means = difference of group means, logistic = L2-regularised logistic regression)."
            )
        if not float(cfg.l2) > 0:
            raise UserError(f"{name}.l2={cfg.l2}: expected a number > 0 (the logistic fit's L2 penalty).")
        if int(cfg.min_mixed_groups) < 1:
            raise UserError(
                f"{name}.min_mixed_groups={cfg.min_mixed_groups}: expected an integer >= 1 (mixed prompt groups "
                "in the fit half needed to fit a direction)."
            )
        if int(cfg.token_offset) < 0:
            raise UserError(
                f"{name}.token_offset={cfg.token_offset}: expected an integer >= 0 (0 = the last completion token, "
                "k = k tokens before it)."
            )
        if cfg.layers is not None and len(list(cfg.layers)) == 0:
            raise UserError(
                f"{name}.layers=[]: expected at least one layer, or leave it unset (the middle and last block)."
            )
        self.layers: list[int] | None = None
        """The chosen layers resolved against the model (at train begin)."""
        self.first: dict[int, torch.Tensor] = {}
        """layer -> the first fitted unit direction (float64): the drift reference and, with freeze, the probe."""
        self.first_step: dict[int, int] = {}
        self.cur: _Step | None = None
        self.last_metrics: dict[str, float] = {}
        """The logged metrics of the last measured step (NaN ones included)."""
        self._grad_off = ""
        """Why update alignment was switched off for the run ('' while it runs)."""

    # ---- set-up --------------------------------------------------------------------------------------------

    def _resolve(self, policy: torch.nn.Module) -> list[int]:
        if self.layers is None:
            try:
                n_blocks = len(decoder_layers(policy))
            except ValueError as e:
                raise UserError(f"diagnostics.{PREFIX}: {e}") from None
            self.layers = resolve_layers(self.cfg.layers, n_blocks)
        return self.layers

    def on_train_begin(self, trainer: Any) -> None:
        self.bind(trainer)
        self._resolve(unwrap_policy(trainer.model))
        if self.cfg.update_alignment and _zero3(trainer):
            self._grad_off = "ZeRO-3 partitions the blocks the partial backward would run through"

    def _measuring(self) -> bool:
        """Whether the coming loss forward belongs to a measured training step."""
        t = self._trainer
        if t is None or not getattr(t.model, "training", False) or not torch.is_grad_enabled():
            return False
        return self.measuring()

    @staticmethod
    def tap_name(layer: int) -> str:
        return f"{PREFIX}/L{layer}"

    def taps(self, policy: torch.nn.Module) -> dict[str, Tap]:
        if not self._measuring():
            return {}
        return {self.tap_name(layer): residual_tap(policy, layer) for layer in self._resolve(policy)}

    # ---- per micro-batch ------------------------------------------------------------------------------------

    def on_loss(self, ctx: LossContext) -> None:
        if self.layers is None or self.tap_name(self.layers[0]) not in ctx.taps:
            return None
        step = int(ctx.trainer.state.global_step) + 1
        if self.cur is None or self.cur.step != step:
            self.cur = _Step(step)
        cur = self.cur
        inputs, extras = ctx.inputs, ctx.extras
        if extras.get("rewards") is None or extras.get("group_ids") is None:
            raise RuntimeError(
                f"{PREFIX}: the loss extras of algo {ctx.algo} carry no per-rollout `rewards`/`group_ids`; the "
                "monitor needs them (GRPO-family and PPO trainers provide them)."
            )
        p = int(inputs["prompt_ids"].shape[1])
        cmask = inputs["completion_mask"]
        b, c = cmask.shape
        pos, has = cm.answer_final_positions(p, cmask, int(self.cfg.token_offset))
        rows = torch.arange(b, device=pos.device)
        taps = {layer: ctx.taps[self.tap_name(layer)] for layer in self.layers}
        states = {}
        for layer, t in taps.items():
            if t.dim() != 3 or t.shape[0] != b or t.shape[1] != p + c:
                raise RuntimeError(
                    f"{PREFIX}: the residual at layer {layer} has shape {tuple(t.shape)}; expected (B, P + C, d) = "
                    f"({b}, {p + c}, d) for the loss forward on cat(prompt_ids, completion_ids). A trainer that "
                    "packs or trims the sequences is not supported."
                )
            h = t.detach()[rows, pos].double()
            states[f"h{layer}"] = torch.where(has[:, None], h, torch.full_like(h, float("nan")))
            cur.width = int(t.shape[-1])
        lmask = cmask.to(ctx.completion_logps.dtype)
        logp = cm.mean_logp(ctx.completion_logps, lmask)
        cur.rows.add(
            extras.get("sample_ids"),
            reward=extras["rewards"].detach().double().reshape(b),
            group=extras["group_ids"].detach().double().reshape(b),
            has=has.double(),
            logp=logp,
            **states,
        )
        cur.micro += 1
        if self.cfg.update_alignment and not self._grad_off:
            self._accumulate_gradient(ctx, taps, p, cmask)
        return None

    def _accumulate_gradient(self, ctx: LossContext, taps: dict[int, torch.Tensor], p: int, cmask) -> None:
        """g_l += sum over response positions of dL/dh_l for this micro-batch (one autograd call, graph kept)."""
        cur = self.cur
        wanted = [layer for layer, t in taps.items() if t.requires_grad]
        if not ctx.loss.requires_grad or not wanted:
            return
        try:
            grads = torch.autograd.grad(
                ctx.loss, [taps[layer] for layer in wanted], retain_graph=True, allow_unused=True
            )
        except RuntimeError as e:
            if "heckpoint" not in str(e):
                raise
            self._grad_off = f"gradient checkpointing does not allow a side torch.autograd.grad ({e})"
            print(f"warning: {PREFIX}: update alignment is off for this run: {self._grad_off}", flush=True)
            cur.grad.clear()
            return
        for layer, g in zip(wanted, grads, strict=True):
            part = (
                torch.zeros(taps[layer].shape[-1], dtype=torch.float64)
                if g is None
                else cm.response_gradient(g.detach(), p, cmask)
            )
            cur.grad[layer] = cur.grad.get(layer, 0) + part

    # ---- step end --------------------------------------------------------------------------------------------

    def on_step_end(self, trainer: Any) -> None:
        cur = self.cur
        if cur is None or cur.step != int(trainer.state.global_step):
            return
        self.cur = None
        data = cur.rows.gather(trainer.accelerator)  # a collective: every rank measured this step
        grads = self._reduce_gradients(trainer, cur)
        rows, scores, tensors, metrics = self.measure(cur.step, data, grads, cur.width)
        self.last_metrics = metrics
        if getattr(trainer, "_metrics", None) is not None:
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            log_metrics(trainer, finite, reduce="none", mode="train")
        if not getattr(self.run, "is_main", True) or getattr(self.run, "writer", None) is None:
            return
        w = self.run.writer
        w.write(dumps.CORRECTNESS_PROBE, rows, step=cur.step)
        if self.cfg.save_scores and scores:
            w.write(dumps.CORRECTNESS_PROBE_SCORES, scores, step=cur.step)
        if self.cfg.save_directions and tensors:
            w.write(
                dumps.CORRECTNESS_PROBE_DIRECTIONS,
                tensors,
                step=cur.step,
                metadata={"step": str(cur.step), "direction": str(self.cfg.direction)},
            )

    def _reduce_gradients(self, trainer: Any, cur: _Step) -> dict[int, torch.Tensor]:
        """layer -> g summed over micro-batches and ranks (float64 CPU); {} when update alignment is off.

        A collective under DDP when it is on (every rank measured the same step with the same settings)."""
        if not self.cfg.update_alignment or self._grad_off or not cur.width:
            return {}
        k, d = len(self.layers), cur.width
        flat = torch.stack(
            [cur.grad.get(layer, torch.zeros(d, dtype=torch.float64)) for layer in self.layers]
        ).reshape(k, d)
        have = torch.tensor([float(layer in cur.grad) for layer in self.layers], dtype=torch.float64)
        acc = getattr(trainer, "accelerator", None)
        if acc is not None and acc.num_processes > 1 and torch.distributed.is_initialized():
            both = torch.cat([flat, have[:, None]], 1).to(acc.device)
            torch.distributed.all_reduce(both)
            both = both.cpu()
            flat, have = both[:, :d], both[:, d]
        return {layer: flat[i] for i, layer in enumerate(self.layers) if have[i] > 0}

    def measure(
        self, step: int, data: dict[str, torch.Tensor], grads: dict[int, torch.Tensor], width: int
    ) -> tuple[list[dict], list[dict], dict[str, torch.Tensor], dict[str, float]]:
        """(table rows, per-rollout score rows, direction tensors, logger metrics) of one measured step from the
        gathered per-rollout columns `data` (reward, group, has, logp, h{layer}) and the summed gradients `grads`.
        Updates the first directions."""
        cfg = self.cfg
        reward, has = data["reward"], data["has"] > 0
        valid = torch.isfinite(reward) & has
        y = (reward >= float(cfg.threshold)) & valid
        groups = data["group"].long()
        sids = data.get("sample_id", torch.full_like(groups, -1)).long()
        fit, held = cm.group_split(groups[valid])
        yv, gv, lv, sv, rv = y[valid], groups[valid], data["logp"][valid], sids[valid], reward[valid]
        n_fit_groups = len(cm.mixed_groups(yv[fit], gv[fit]))
        logp_read = cm.readout(lv[held], yv[held], gv[held])
        step_vals = {
            "auroc_logp": logp_read["auroc"],
            "pairwise_acc_logp": logp_read["pairwise_acc"],
            "accuracy": float(yv.double().mean()) if len(yv) else math.nan,
            "n_fit_groups": float(n_fit_groups),
            "n_eval": float(int(held.sum())),
        }
        rows, scores = [], []
        fitted_t, used_t, grad_t = [], [], []
        metrics = {f"{PREFIX}/{k}": v for k, v in step_vals.items()}
        for layer in self.layers:
            h = data[f"h{layer}"][valid]
            fresh = None
            if n_fit_groups >= int(cfg.min_mixed_groups):
                fresh, _ = cm.fit_direction(h[fit], yv[fit], gv[fit], cfg.direction, float(cfg.l2))
            if fresh is not None and layer not in self.first:
                self.first[layer], self.first_step[layer] = fresh.clone(), step
            first = self.first.get(layer)
            used = first if cfg.freeze else fresh
            fit_step = (self.first_step.get(layer, -1) if cfg.freeze else step) if used is not None else -1
            if used is not None:
                s = h @ used
                read = cm.readout(s[held], yv[held], gv[held])
            else:
                s = torch.full((len(h),), math.nan, dtype=torch.float64)
                read = {"auroc": math.nan, "pairwise_acc": math.nan, "n_pairs": logp_read["n_pairs"]}
            g = grads.get(layer)
            vals = {
                "auroc": read["auroc"],
                "gap": read["auroc"] - logp_read["auroc"],
                "pairwise_acc": read["pairwise_acc"],
                "cos_to_first": cm.cosine(fresh, first),
                "update_cos": cm.cosine(used, None if g is None else -g),
            }
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "direction": str(cfg.direction),
                    "frozen": bool(cfg.freeze),
                    "fit_step": int(fit_step),
                    **vals,
                    "auroc_logp": step_vals["auroc_logp"],
                    "pairwise_acc_logp": step_vals["pairwise_acc_logp"],
                    "update_norm": float(g.norm()) if g is not None else math.nan,
                    "n_rollouts": int(valid.sum()),
                    "n_fit_groups": n_fit_groups,
                    "n_eval": int(held.sum()),
                    "n_eval_pairs": int(logp_read["n_pairs"]),
                    "accuracy": step_vals["accuracy"],
                }
            )
            metrics.update({f"{PREFIX}/L{layer}/{k}": v for k, v in vals.items()})
            if layer == self.layers[0]:
                metrics.update({f"{PREFIX}/{k}": v for k, v in vals.items()})
            for i in range(len(h)):
                scores.append(
                    {
                        "step": step,
                        "layer": layer,
                        "sample_id": int(sv[i]),
                        "group_id": int(gv[i]),
                        "heldout": bool(held[i]),
                        "reward": float(rv[i]),
                        "correct": bool(yv[i]),
                        "score": float(s[i]),
                        "mean_logp": float(lv[i]),
                    }
                )
            nan = torch.full((width,), math.nan, dtype=torch.float32)
            fitted_t.append(nan if fresh is None else fresh.float())
            used_t.append(nan if used is None else used.float())
            grad_t.append(nan if g is None else g.float())
        tensors = {}
        if width:
            tensors = {
                "layers": torch.tensor(self.layers, dtype=torch.int64),
                "fitted": torch.stack(fitted_t),
                "used": torch.stack(used_t),
                "grad": torch.stack(grad_t),
            }
        return rows, scores, tensors, metrics

    # ---- resume ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The first fitted direction of each layer (the drift reference, and the probe under freeze) and the step
        it was fitted at. Measured steps are written at their end, so nothing else is pending at a checkpoint."""
        return {
            "first": {int(k): v.detach().cpu().clone() for k, v in self.first.items()},
            "first_step": {int(k): int(v) for k, v in self.first_step.items()},
            "grad_off": self._grad_off,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first = {int(k): v.detach().double().clone() for k, v in state.get("first", {}).items()}
        self.first_step = {int(k): int(v) for k, v in state.get("first_step", {}).items()}
        self._grad_off = str(state.get("grad_off", ""))


def _zero3(trainer: Any) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) >= 3
