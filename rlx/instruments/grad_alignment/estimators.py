"""The three ways the instrument measures G, behind one interface (docs/gradient_alignment.md).

    ParamEstimator       parameter space: one backward per component of sum_t w_t m_c l_t (and per tertile),
                         the optimizer's full gradient read before clipping; every row, layer groups, update.
    RowEstimator         the parameter-space rows from the trainer's own backward (rlx/alignment/rowgrad.py), one
                         micro-batch at a time where it applies, else as ParamEstimator.
    ActivationEstimator  the LM head only, from the hooked last-layer states: no parameter autograd (ZeRO-2/3).

What each sees of a logged step, in the trainer's order:

    arm(policy, should_record) / disarm()   hooks of the step's loss forwards (row path), always removed
    begin_step(cur, policy, target)         first micro-batch: g_T and R_T on D' (probe pass, isolated)
    on_micro(cur, ctx, split)               each micro-batch's w_t split (records.MicroSplit)
    on_gradient(cur, step)                  the optimizer's gradient, complete and before clipping
    settle()                                deferred work done (the row path's pending micro-batches)
    local_sums(cur, comps, sk, world)       this rank's sums to all-reduce, and the sketches
    finish_reduced(rec, sk, comps)          what follows from the reduced sums
    rows(cur, rec, sk, target, policy)      the step's table rows
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from rlx.alignment import functional as am
from rlx.alignment.rowgrad import RowCapture, row_alignment
from rlx.alignment.sketch import CountSketch
from rlx.alignment.target import TargetBatch, target_gradient, target_head_gradient, target_nll
from rlx.errors import UserError
from rlx.instruments.base import LossContext, unwrap_policy
from rlx.instruments.grad_alignment.records import MicroSplit, PendingRows, StepRecord
from rlx.instruments.grad_alignment.weights import distributed, gather_scores
from rlx.trainers.registry import TrainerSpec

SKETCH_DIM_DDP = 16384
"""Sketch size for the norms of globally averaged component vectors under DDP when no sketch is saved."""


def policy_of(trainer: Any) -> torch.nn.Module:
    """The HF causal LM the trainer trains (inside its DDP / DeepSpeed / PEFT wrappers)."""
    return unwrap_policy(trainer.accelerator.unwrap_model(trainer.model))


class Estimator:
    """Interface of an estimator; the base does nothing at the optional events."""

    variant: ClassVar[str] = ""
    """The rows' `variant` column."""
    own_norms: ClassVar[tuple[str, ...]] = ()
    """Components whose norm is this rank's (or an estimate) under DDP: the rest are exact."""
    ddp_norm_source: ClassVar[str] = ""
    """`norm_source` of `own_norms` rows under DDP."""
    needs_hidden: bool = False
    """Whether the loss forwards of logged steps must capture `ctx.hidden`."""

    def begin_step(self, cur: StepRecord, policy: torch.nn.Module, target: TargetBatch) -> None:
        raise NotImplementedError

    def on_micro(self, cur: StepRecord, ctx: LossContext, split: MicroSplit) -> None:
        raise NotImplementedError

    def on_gradient(self, cur: StepRecord | None, step: int) -> None:
        """The optimizer's `.grad`, complete (accumulated, all-reduced) and before clipping."""

    def settle(self) -> None:
        """Finish deferred per-micro-batch work (called before each micro-batch and at the step's events)."""

    def arm(self, policy: torch.nn.Module, should_record: Callable[[], bool]) -> None:
        """Hooks for this logged step's loss forwards (removed by `disarm`)."""

    def disarm(self) -> None:
        """Remove this step's hooks and drop what they captured."""

    def local_sums(
        self, cur: StepRecord, comps: list[str], sk: dict[str, torch.Tensor], world: int
    ) -> dict[str, float]:
        """This rank's sums over the step (G, squared norms), to be all-reduced; sketches go to `sk`."""
        raise NotImplementedError

    def finish_reduced(self, rec: dict[str, float], sk: dict[str, torch.Tensor], comps: list[str]) -> None:
        """Complete the reduced sums `rec` in place."""

    def rows(
        self, cur: StepRecord, rec: dict[str, float], sk: dict, target: TargetBatch, policy: torch.nn.Module
    ) -> list[dict]:
        """The step's rows of the table (`rlx.dumps.GRAD_ALIGNMENT`) from the reduced sums `rec`."""
        raise NotImplementedError

    def drop_fast_path(self) -> None:
        """A capture missed its backward: measure per component from now on."""

    def close(self) -> None:
        """Remove every hook (idempotent)."""


def _base_row(cur: StepRecord, target: TargetBatch, variant: str, sq_T: float) -> dict[str, Any]:
    return {
        "step": cur.step,
        "target": target.name,
        "variant": variant,
        "norm_target": math.sqrt(sq_T),
        "R_T": cur.R_T,
    }


class ParamEstimator(Estimator):
    """Parameter space over the scope `params`: per-component backwards, full gradient, layer groups, update."""

    variant = "param"
    own_norms = ("pos", "neg", "kl")
    ddp_norm_source = "sketch"

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        groups: dict[str, list[int]],
        sketch: CountSketch | None,
        seed: int,
        prev: deque,
    ) -> None:
        self.params, self.groups, self.sketch, self.seed = params, groups, sketch, seed
        self.prev = prev
        """Total gradients of the previous logged steps (drift; the instrument's, restored on resume)."""

    def begin_step(self, cur, policy, target):
        cur.gT, cur.R_T = target_gradient(policy, target, self.params)

    def on_micro(self, cur, ctx, split):
        lp = ctx.token_logps
        for name, cw in split.comps.items():
            g = am.weighted_grad(lp, self.params, cw)
            cur.vec[name] = am.add_(cur.vec.get(name), g)
        # bot follows by linearity at step end: G_bot = G_pos + G_neg - G_top - G_mid
        for name in ("top", "mid"):
            g = am.weighted_grad(lp, self.params, split.terts[name])
            cur.G[name] = cur.G.get(name, 0.0) + am.dot(cur.gT, g).item()

    def on_gradient(self, cur, step):
        self.settle()
        if cur is None or cur.total is not None or cur.step != step or cur.gT is None:
            return
        cur.total = [
            p.grad.detach().float().clone()
            if p.grad is not None
            else torch.zeros_like(p, dtype=torch.float32)
            for p in self.params
        ]
        cur.theta = [p.detach().float().clone() for p in self.params]

    def local_sums(self, cur, comps, sk, world):
        local: dict[str, float] = {}
        gT = cur.gT
        for c in comps:
            local[f"G_{c}"] = cur.G[c] if c in cur.G else am.dot(gT, cur.vec[c]).item()
        for t in ("top", "mid", "bot"):
            if t in cur.G:
                local[f"G_{t}"] = cur.G[t]
        local["G_pg"] = sum(local.get(f"G_{c}", 0.0) for c in ("pos", "neg"))
        local["sq_pos_neg"] = am.dot(cur.vec["pos"], cur.vec["neg"]).item()
        for c in comps:
            local[f"sq_{c}"] = am.sq_norm(cur.vec[c]).item()
        if self.sketch is not None or world > 1:
            sketcher = self.sketch or CountSketch([p.shape for p in self.params], SKETCH_DIM_DDP, self.seed)
            for c in comps:
                sk[c] = sketcher(cur.vec[c])
        return local

    def finish_reduced(self, rec, sk, comps):
        if distributed() is not None:
            # component norms of the globally averaged vectors: from the all-reduced sketches (estimates)
            for c in comps:
                rec[f"sq_{c}"] = float(sk[c].double().norm() ** 2)
            rec["sq_pos_neg"] = float(sk["pos"].double() @ sk["neg"].double())
        if "G_bot" not in rec:
            rec["G_bot"] = rec["G_pg"] - rec["G_top"] - rec["G_mid"]

    def rows(self, cur, rec, sk, target, policy):
        gT, total = cur.gT, cur.total
        if total is None:  # no gradient seen (e.g. DeepSpeed without the activation variant)
            total = am.add_(None, [sum(x) for x in zip(*(cur.vec[c] for c in cur.vec))])
        # per-tensor products once; every group and the totals are sums of these
        pp_Tt, pp_TT, pp_tt = (
            am.per_param_dot(gT, total),
            am.per_param_dot(gT, gT),
            am.per_param_dot(total, total),
        )
        sq_T = float(pp_TT.sum())
        rows: list[dict] = []
        base = _base_row(cur, target, "param", sq_T)
        G_total, sq_total = float(pp_Tt.sum()), float(pp_tt.sum())
        drift = float("nan")
        if len(self.prev) == self.prev.maxlen:
            old = [o.to(t.device) for o, t in zip(self.prev[0], total)]  # on the CPU after a resume
            drift = am.cosine(am.dot(total, old).item(), sq_total, am.sq_norm(old).item())
        self.prev.append([t.clone() for t in total])
        n_tot = rec.get("n_total", 0.0)
        rows.append(
            {
                **base,
                "component": "total",
                "G": G_total,
                "cos": am.cosine(G_total, sq_T, sq_total),
                "norm": math.sqrt(sq_total),
                "n_tokens": n_tot,
                "drift": drift,
            }
        )
        sq = {c: rec.get(f"sq_{c}") for c in ("pos", "neg", "kl")}
        cpn = am.cosine(rec["sq_pos_neg"], sq["pos"], sq["neg"])
        for c in ("pos", "neg", "kl"):
            if f"G_{c}" not in rec:
                continue
            rows.append(
                {
                    **base,
                    "component": c,
                    "G": rec[f"G_{c}"],
                    "cos": am.cosine(rec[f"G_{c}"], sq_T, sq[c]),
                    "norm": math.sqrt(max(sq[c], 0.0)),
                    "n_tokens": rec.get(f"n_{c}", 0.0),
                    "cos_pos_neg": cpn if c in ("pos", "neg") else float("nan"),
                }
            )
        for c in ("top", "mid", "bot"):
            rows.append(
                {
                    **base,
                    "component": c,
                    "G": rec[f"G_{c}"],
                    "cos": float("nan"),
                    "norm": float("nan"),
                    "n_tokens": rec.get(f"n_{c}", 0.0),
                }
            )
        G_sum = sum(rec.get(f"G_{c}", 0.0) for c in ("pos", "neg", "kl"))
        rows.append(
            {
                **base,
                "component": "other",
                "G": G_total - G_sum,
                "cos": float("nan"),
                "norm": float("nan"),
                "n_tokens": 0.0,
            }
        )
        for g, idx in self.groups.items():
            if g == "all" or not idx:
                continue
            Gg, sq_g = float(pp_Tt[idx].sum()), float(pp_tt[idx].sum())
            rows.append(
                {
                    **base,
                    "component": f"layer:{g}",
                    "G": Gg,
                    "cos": am.cosine(Gg, float(pp_TT[idx].sum()), sq_g),
                    "norm": math.sqrt(sq_g),
                    "n_tokens": n_tot,
                }
            )
        # realised update: theta after the optimizer step minus the snapshot before it
        if cur.theta is not None:
            delta = [p.detach().float() - t for p, t in zip(self.params, cur.theta)]
            Gu, sq_u = am.dot(gT, delta).item(), am.sq_norm(delta).item()
            dR = target_nll(policy, target) - cur.R_T
            rows.append(
                {
                    **base,
                    "component": "update",
                    "G": -Gu,
                    "cos": am.cosine(-Gu, sq_T, sq_u),
                    "norm": math.sqrt(sq_u),
                    "n_tokens": n_tot,
                    "delta_R": dR,
                }
            )
        if self.sketch is not None:
            sk["loss"] = self.sketch(total)
            sk["target"] = self.sketch(gT)
        return rows


@contextlib.contextmanager
def armed_capture(
    policy: torch.nn.Module, capture: RowCapture, should_record: Callable[[], bool]
) -> Iterator[None]:
    """Per-layer captures during the policy's training forwards with grad on, while `should_record()`; the policy's
    hooks and any layer hooks left attached are removed on exit, however the block ends."""

    def arm(module, args, kwargs):
        if module.training and torch.is_grad_enabled() and should_record():
            capture.start()
            capture.attach()  # layer hooks exist only during logged loss forwards

    def disarm(module, args, kwargs, out):
        if capture.armed:
            capture.armed = False
            capture.detach()

    handles = [
        policy.register_forward_pre_hook(arm, with_kwargs=True),
        policy.register_forward_hook(disarm, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        capture.armed = False
        capture.detach()


class RowEstimator(ParamEstimator):
    """The parameter-space rows read off the trainer's own backward, one micro-batch at a time (rowgrad.py).

    A micro-batch goes the per-component way (ParamEstimator) when the row split does not apply: a KL term, a
    regularizer's loss, a row with both signs (token-level advantages), or a capture that is missing or already
    consumed. Only the pos-row gradient is formed; neg = grad L - pos at step end (no other loss term here).
    """

    def __init__(
        self,
        capture: RowCapture,
        spec: TrainerSpec,
        regularized: bool,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.capture, self.spec, self.regularized = capture, spec, regularized
        self.needs_hidden = capture.head_index is not None  # the fused head's input states
        self.pending: list[PendingRows] = []
        self._hooks = contextlib.ExitStack()
        self._armed = False

    def arm(self, policy, should_record):
        if self.capture is not None and not self._armed:
            self._hooks.enter_context(armed_capture(policy, self.capture, should_record))
            self._armed = True

    def disarm(self):
        self._hooks.close()
        self._armed = False
        # The logged forward's layer inputs and output gradients (294 MB on the tiny recipe) are consumed by now:
        # never keep them through the steps that do not log.
        if self.capture is not None:
            self.capture.records = []

    def close(self):
        self._hooks.close()
        self._armed = False
        if self.capture is not None:
            self.capture.detach()

    def drop_fast_path(self):
        self.close()
        self.capture = None

    def on_micro(self, cur, ctx, split):
        if not self._row_micro(cur, ctx, split):
            super().on_micro(cur, ctx, split)

    def _row_micro(self, cur: StepRecord, ctx: LossContext, split: MicroSplit) -> bool:
        cap = self.capture
        if cap is None or split.w_kl is not None or self.regularized or not cap.records or cap.complete():
            return False
        pos_rows = (split.comps["pos"] != 0).any(-1)
        neg_rows = (split.comps["neg"] != 0).any(-1)
        # a row with both signs (token-level advantages) is not separable by rows
        if (pos_rows & neg_rows).any():
            return False
        gather = gather_scores if distributed() else None
        tiers = am.token_tiers(split.comps["pos"] + split.comps["neg"], split.units, gather)
        row_tier = tiers.max(-1).values
        head = None
        if cap.head_index is not None and not cap.head_called():
            policy = policy_of(ctx.trainer)
            emb = [r for r in cap.records if r.kind == "embedding"]
            ids = emb[0].inputs if emb else sequence_ids(ctx)
            temp = self.spec.temperature(ctx.trainer)
            cfg = policy.config.get_text_config()
            scale = float(getattr(cfg, "logit_scale", None) or 1.0) / temp
            head = {
                "weight_index": cap.head_index,
                "hidden": ctx.hidden[:, :-1].detach() if ctx.hidden is not None else None,
                "labels": ids[:, 1:],
                "coef": (split.w * split.mask).detach(),
                "weight": cap.head.weight.detach(),
                "scale": scale,
            }
            if head["hidden"] is None:
                return False
        self.pending.append(PendingRows(cap.records, pos_rows, neg_rows, row_tier, head, cur))
        cap.accept_grads = True  # the next backward through these activations is the trainer's own
        return True

    def settle(self):
        while self.pending:
            job = self.pending.pop(0)
            cur = job.cur
            if not all(r.out_grad is not None for r in job.records):
                cur.failed = True
                continue
            cur.neg_from_total = True
            s, vecs = row_alignment(
                job.records,
                cur.gT,
                {"pos": job.pos},
                len(self.params),
                [p.shape for p in self.params],
                job.head,
            )
            for name, rows in (("pos", job.pos), ("neg", job.neg)):
                cur.G[name] = cur.G.get(name, 0.0) + float(s[rows.to(s.device)].sum())
                if name not in vecs:
                    continue
                vec = [
                    torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                    for p, g in zip(self.params, vecs[name])
                ]
                cur.vec[name] = am.add_(cur.vec.get(name), vec)
            for i, name in enumerate(("top", "mid", "bot")):
                cur.G[name] = cur.G.get(name, 0.0) + float(s[(job.tier == i).to(s.device)].sum())


class gathered:
    """deepspeed.zero.GatheredParameters for ZeRO-3 partitioned weights; a no-op otherwise."""

    def __init__(self, p: torch.Tensor):
        self.ctx = None
        if hasattr(p, "ds_id"):
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=None)

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *a):
        return self.ctx.__exit__(*a) if self.ctx else None


def sequence_ids(ctx: LossContext) -> torch.Tensor:
    """(B, S) token ids of the micro-batch, aligned with `ctx.token_logps` (B, S-1)."""
    inp = ctx.inputs
    if "prompt_ids" in inp and "completion_ids" in inp:
        ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], 1)
    elif "input_ids" in inp:
        ids = inp["input_ids"]
    else:
        raise UserError(
            "grad_alignment variant=activation: the trainer's batch has no token ids; use variant=param."
        )
    if ids.shape[1] != ctx.token_logps.shape[1] + 1:
        raise UserError(
            f"grad_alignment variant=activation: token ids ({ids.shape[1]}) do not match the scored positions "
            f"({ctx.token_logps.shape[1]} + 1); use variant=param."
        )
    return ids


class ActivationEstimator(Estimator):
    """Head-restricted G from activations only: no parameter autograd (ZeRO-2/3 safe)."""

    variant = "activation"
    own_norms = ("pos", "neg", "kl", "total")
    ddp_norm_source = "rank_mean"
    needs_hidden = True

    def __init__(self, spec: TrainerSpec) -> None:
        self.spec = spec

    def begin_step(self, cur, policy, target):
        cur.gT_head, cur.R_T = target_head_gradient(
            policy, policy.model if hasattr(policy, "model") else policy, target
        )

    def on_micro(self, cur, ctx, split):
        trainer = ctx.trainer
        policy = policy_of(trainer)
        ids = sequence_ids(ctx)
        head = policy.get_output_embeddings()
        temp = self.spec.temperature(trainer)
        h = ctx.hidden[:, :-1].detach()
        labels = ids[:, 1:]
        sel = ctx.mask > 0 if ctx.mask is not None else torch.ones_like(labels, dtype=torch.bool)
        with gathered(head.weight):
            for name, cw in {**split.comps, **split.terts}.items():
                g = am.head_grad_from_activations(h[sel], head.weight, labels[sel], cw[sel], temp, head.bias)
                cur.G[name] = cur.G.get(name, 0.0) + float((g.double() * cur.gT_head.double()).sum())
                if name in split.comps:
                    cur.vec[name] = am.add_(cur.vec.get(name), [g])

    def local_sums(self, cur, comps, sk, world):
        local: dict[str, float] = {}
        for c in comps + ["top", "mid", "bot"]:
            local[f"G_{c}"] = cur.G.get(c, 0.0)
        local["sq_pos_neg"] = am.dot(cur.vec["pos"], cur.vec["neg"]).item()
        for c in comps:
            local[f"sq_{c}"] = am.sq_norm(cur.vec[c]).item()
        local["G_pg"] = local["G_pos"] + local["G_neg"]
        tot = am.add_(None, cur.vec["pos"])
        for c in comps[1:]:
            tot = am.add_(tot, cur.vec[c])
        local["sq_total"] = am.sq_norm(tot).item()
        return local

    def rows(self, cur, rec, sk, target, policy):
        sq_T = float((cur.gT_head.double() ** 2).sum())
        base = _base_row(cur, target, "activation", sq_T)
        G_total = sum(rec.get(f"G_{c}", 0.0) for c in ("pos", "neg", "kl"))
        sq = {c: rec.get(f"sq_{c}") for c in ("pos", "neg", "kl", "total")}
        cpn = am.cosine(rec["sq_pos_neg"], sq["pos"], sq["neg"])
        rows = [
            {
                **base,
                "component": "total",
                "G": G_total,
                "cos": am.cosine(G_total, sq_T, sq["total"]) if sq["total"] is not None else float("nan"),
                "norm": math.sqrt(sq["total"]) if sq["total"] is not None else float("nan"),
                "n_tokens": rec.get("n_total", 0.0),
            }
        ]
        for c in ("pos", "neg", "kl", "top", "mid", "bot"):
            if f"G_{c}" not in rec:
                continue
            s = sq.get(c)
            rows.append(
                {
                    **base,
                    "component": c,
                    "G": rec[f"G_{c}"],
                    "cos": am.cosine(rec[f"G_{c}"], sq_T, s) if s is not None else float("nan"),
                    "norm": math.sqrt(s) if s is not None else float("nan"),
                    "n_tokens": rec.get(f"n_{c}", 0.0),
                    "cos_pos_neg": cpn if c in ("pos", "neg") else float("nan"),
                }
            )
        return rows
