"""The `h_neurons` monitor: H-Neurons (arXiv 2512.01797, thunlp/H-Neurons) followed through RL training.

A sparse set H0 of MLP neurons whose CETT (each neuron's share of its MLP's output norm, rlx/algorithms/cett.py)
on answer tokens predicts a wrong answer is fitted once on the base model, frozen, and watched:

    step 1 (its loss forwards run on the base weights, before the first update)
      on_loss        taps on every block's mlp.down_proj (input z, output u): per rollout, CETT averaged over the
                     answer tokens (x_ans) and over the other real tokens (x_oth), (B, L m) each
      on_step_end    gather over ranks; labels from the verified reward (wrong: reward < threshold); the paper's
                     consistency filter (groups all right or all wrong); "3-vs-1" rows; L1 logistic regression
                     (rank 0, broadcast); H0 = neurons with a positive weight, plus two half-data fits (split-half
                     reproducibility) and two kinds of control sets: layer-matched random ones and activation-
                     matched ones (same layer, closest mean CETT)
    every measured step (step 1 and every `every` steps)
      on_loss        per rollout: CETT mass of H0 on answer / other tokens, the same for the control sets, the
                     frozen probe's score (one reduction of x_ans; the features are not kept)
      on_before_clip per-neuron squared gradient norms of W_down columns (and W_up / W_gate rows), unclipped
      on_step_end    metrics h_neurons/* (by reward bucket, AUROC of the frozen probe, gradient share of H0 vs
                     chance and vs the controls), rank 0 writes the step's shard
    every `refit_every` steps: a refit H_t on that step's rollouts with the same C; Jaccard / overlap with H0
      against chance, and half-vs-half Jaccard across time next to the within-step split-half Jaccard

Taps are installed only on measured steps. The fit uses the rollouts of one optimizer step (all ranks). Files:
diagnostics/h_neurons/{steps,rollouts,fits,set}_stepNNNNNN.parquet (rlx/dumps.py). Docs: docs/probes.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlx import dumps
from rlx.algorithms.cett import (
    activation_matched_sets,
    answer_token_mask,
    column_norms,
    consistent_groups,
    l1_logistic_regression,
    layer_matched_random_sets,
    marker_answer_start,
    neuron_gradient_energy,
    pooled_cett,
    set_overlap,
    set_share,
    three_vs_one,
    token_regions,
    top_variance,
)
from rlx.algorithms.probing import StepRows, auroc, reward_buckets
from rlx.errors import UserError
from rlx.instruments.base import (
    LossContext,
    Tap,
    decoder_layers,
    log_metrics,
    register_instrument,
    unwrap_policy,
)
from rlx.instruments.monitor import RolloutMonitor

PREFIX = "h_neurons"
BUCKETS = ("all", "correct", "wrong")
SEED_OFFSET = 1_703_017
"""Added to the run's seed for the control sets and the half splits (their own stream, fixed per run)."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _is_zero(trainer: Any) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) >= 2


def _linear_weight(module: torch.nn.Module) -> torch.nn.Parameter:
    """The weight parameter of a projection (the base layer's under a PEFT wrapper)."""
    return getattr(module, "base_layer", module).weight


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the projection applies: its own, or under PEFT LoRA the base weight plus the active adapters'
    deltas (unless merged or disabled)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight
    w = base.weight
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return w
    for name in getattr(module, "active_adapters", []) or []:
        if name in getattr(module, "lora_A", {}):
            w = w + module.get_delta_weight(name)
    return w


@dataclass
class NeuronProbe:
    """A fitted L1 probe over flat neuron indices (l * m + j): its non-zero weights and intercept, in CETT units."""

    index: torch.Tensor
    """(k,) long, sorted flat indices of the non-zero weights."""
    weight: torch.Tensor
    """(k,) float64."""
    intercept: float

    @property
    def neurons(self) -> torch.Tensor:
        """The H-Neurons: flat indices with a positive weight."""
        return self.index[self.weight > 0]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """theta . x + b for rows of flat features x (B, L m)."""
        idx = self.index.to(x.device)
        return x[:, idx].double() @ self.weight.to(x.device) + self.intercept

    def state(self) -> dict[str, Any]:
        return {"index": self.index.clone(), "weight": self.weight.clone(), "intercept": self.intercept}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> NeuronProbe:
        return cls(s["index"].long().clone(), s["weight"].double().clone(), float(s["intercept"]))


def select_rollouts(
    wrong: torch.Tensor,
    valid: torch.Tensor,
    group_ids: torch.Tensor,
    consistent_only: bool,
    min_per_class: int,
) -> tuple[torch.Tensor, str, str]:
    """Which rollouts a fit uses: (keep (N,) bool, data, note).

    data = "consistent" (the paper's filter: groups whose valid rollouts, two or more, are all right or all wrong),
    "all" (every valid rollout: the filter is off, or it left fewer than `min_per_class` wrong or right rollouts)
    or "none" (fewer than `min_per_class` of a class even then: no fit)."""
    note = ""
    if consistent_only:
        keep = consistent_groups(wrong, valid, group_ids)
        n_w, n_r = int((keep & wrong).sum()), int((keep & ~wrong).sum())
        if min(n_w, n_r) >= min_per_class:
            return keep, "consistent", note
        note = (
            f"the consistency filter left {n_w} wrong / {n_r} right rollouts (< min_per_class={min_per_class}); "
            "fitted on every scored rollout instead"
        )
    keep = valid.clone()
    n_w, n_r = int((keep & wrong).sum()), int((keep & ~wrong).sum())
    if min(n_w, n_r) >= min_per_class:
        return keep, "all", note
    note = f"{n_w} wrong / {n_r} right scored rollouts (< min_per_class={min_per_class} of a class): no fit"
    return torch.zeros_like(keep), "none", note


def fit_probe(
    x_ans: torch.Tensor,
    x_oth: torch.Tensor,
    wrong: torch.Tensor,
    *,
    C: float,
    standardize: bool = False,
    max_features: int = 0,
    tol: float = 1e-4,
    max_iter: int = 5000,
    device: Any = None,
) -> tuple[NeuronProbe, dict[str, Any]]:
    """L1 probe on the "3-vs-1" rows of these rollouts (x_ans / x_oth (N, L m), wrong (N,) bool); the features
    outside the `max_features` highest-variance ones (0 = all) keep weight 0. Returns the probe and fit stats."""
    t0 = time.perf_counter()
    X, y = three_vs_one(x_ans.double(), x_oth.double(), wrong)
    cols = top_variance(X, max_features)
    fit = l1_logistic_regression(
        X[:, cols], y, C, standardize=standardize, tol=tol, max_iter=max_iter, device=device
    )
    nz = (fit.coef != 0).nonzero().flatten()
    probe = NeuronProbe(cols[nz].long(), fit.coef[nz].double(), fit.intercept)
    ok = torch.isfinite(x_ans).all(1)
    stats = {
        "n_samples": int(X.shape[0]),
        "n_positive": int(y.sum()),
        "n_features": int(len(cols)),
        "set_size": int(len(probe.neurons)),
        "n_nonzero": int(len(probe.index)),
        "intercept": probe.intercept,
        "objective": fit.objective,
        "converged": bool(fit.converged),
        "iterations": int(fit.n_iter),
        "kkt_violation": float(fit.kkt_violation),
        "train_auroc": auroc(probe.score(x_ans[ok].double()), wrong[ok]),
        "wall_time": time.perf_counter() - t0,
    }
    return probe, stats


def split_groups(
    keep: torch.Tensor, wrong: torch.Tensor, group_ids: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves (N,) bool of the kept rollouts, whole groups each, balanced by the groups' majority
    label (wrong-majority and right-majority groups alternate between the halves in a random order)."""
    gids = torch.unique(group_ids[keep])
    order = gids[torch.randperm(len(gids), generator=generator)]
    frac = torch.stack([wrong[keep & (group_ids == g)].float().mean() for g in order]) if len(order) else None
    a = torch.zeros_like(keep)
    if frac is not None:  # wrong-majority groups first, then the others, dealt alternately: A, B, A, ...
        dealt = torch.cat([order[frac > 0.5], order[frac <= 0.5]])
        for g in dealt[0::2]:
            a |= keep & (group_ids == g)
    return a, keep & ~a


@register_instrument("h_neurons")
class HNeurons(RolloutMonitor):
    """H-Neurons: a sparse CETT probe fitted on the base model at step 1 and followed over training."""

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        where = "diagnostics.h_neurons"
        if int(cfg.every) < 0 or int(cfg.refit_every) < 0:
            raise UserError(
                f"{where}: every={cfg.every}, refit_every={cfg.refit_every}; expected integers >= 0 "
                "(every: measure at step 1 and every N steps, 0 = step 1 only; refit_every: 0 = never refit)."
            )
        if not (float(cfg.C) > 0 and math.isfinite(float(cfg.C))):
            raise UserError(
                f"{where}.C={cfg.C}: expected a finite number > 0 (inverse L1 strength, scikit-learn's "
                "convention: larger C keeps more neurons)."
            )
        if not math.isfinite(float(cfg.threshold)):
            raise UserError(f"{where}.threshold={cfg.threshold}: expected a finite reward threshold.")
        if int(cfg.min_per_class) < 2 or int(cfg.max_features) < 0 or int(cfg.num_random) < 0:
            raise UserError(
                f"{where}: min_per_class={cfg.min_per_class}, max_features={cfg.max_features}, "
                f"num_random={cfg.num_random}; expected min_per_class >= 2, max_features >= 0 (0 = all) and "
                "num_random >= 0."
            )
        if int(cfg.max_iter) < 10 or not float(cfg.tol) > 0:
            raise UserError(
                f"{where}: max_iter={cfg.max_iter}, tol={cfg.tol}; expected max_iter >= 10 and tol > 0."
            )
        if cfg.answer_marker is not None and not str(cfg.answer_marker):
            raise UserError(
                f"{where}.answer_marker is empty: give the text that precedes the answer (e.g. '####') "
                "or null for the whole completion."
            )
        seed = int(getattr(getattr(run, "cfg", None), "seed", 0) or 0)
        self.seed = seed + SEED_OFFSET
        self.probe0: NeuronProbe | None = None
        """The frozen probe of step 1 (H0 = its positive weights); None before the fit or when it had too few data."""
        self.h0_attempted = False
        self.halves0: list[torch.Tensor] | None = None
        """The H-Neuron sets of the two half-data fits at step 1."""
        self.controls: list[torch.Tensor] = []
        """Layer-matched random neuron sets of |H0| (the control)."""
        self.matched: list[torch.Tensor] = []
        """Activation-matched control sets: per H0 neuron one of the same layer with a close mean CETT at step 1."""
        self.last_refit: dict[str, Any] | None = None
        """step, set and halves of the last refit."""
        self.warned: set[str] = set()
        self._layers: Any = None
        self._width = 0
        self._rows = StepRows()
        self._feats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._grad: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._step = -1
        """The step whose rows `_rows` / `_feats` hold (-1: none)."""
        self._step_done = -1
        """The step `on_step_end` is closing (its gradient energies are used)."""
        self.last_metrics: dict[str, float] = {}
        """The metrics of the last measured step (without the h_neurons/ prefix; NaN included)."""

    # ---- set-up and cadence ---------------------------------------------------------------------------

    def on_train_begin(self, trainer: Any) -> None:
        self._setup(trainer)

    def _setup(self, trainer: Any) -> None:
        if self._layers is not None:
            return
        self.bind(trainer)
        policy = unwrap_policy(trainer.model)
        try:
            layers = decoder_layers(policy)
        except ValueError as e:
            raise UserError(f"diagnostics.h_neurons: {e} Set diagnostics.h_neurons.enabled=false.") from None
        widths = set()
        for i, layer in enumerate(layers):
            down = getattr(getattr(layer, "mlp", None), "down_proj", None)
            if down is None:
                raise UserError(
                    f"diagnostics.h_neurons: block {i} of {type(policy).__name__} has no mlp.down_proj; the monitor "
                    "supports the Llama/Qwen/Mistral MLP (gate_proj, up_proj, down_proj). Set "
                    "diagnostics.h_neurons.enabled=false."
                )
            widths.add(int(_linear_weight(down).shape[1]))
        if len(widths) != 1:
            raise UserError(
                f"diagnostics.h_neurons: MLP widths differ across blocks ({sorted(widths)}); expected one width m."
            )
        self._layers, self._width = layers, widths.pop()

    @property
    def num_neurons(self) -> int:
        """L * m."""
        return len(self._layers) * self._width

    def _refit_step(self, step: int) -> bool:
        every = int(self.cfg.refit_every)
        return every > 0 and step > 1 and self.measured(step, every)

    def _measured(self, step: int) -> bool:
        return self.measured(step) or self._refit_step(step)

    def _fit_step(self, step: int) -> bool:
        if step == 1 and not self.h0_attempted:
            return True
        return self.probe0 is not None and self._refit_step(step)

    def _current(self, trainer: Any) -> int:
        return int(trainer.state.global_step) + 1

    def taps(self, policy: torch.nn.Module) -> dict[str, Tap]:
        t = self._trainer
        if t is None or self._layers is None or not policy.training or not self._measured(self._current(t)):
            return {}
        out = {}
        for i, layer in enumerate(self._layers):
            out[f"{PREFIX}/z{i}"] = Tap(layer.mlp.down_proj, "input")
            out[f"{PREFIX}/u{i}"] = Tap(layer.mlp.down_proj, "output")
        return out

    # ---- per micro-batch ------------------------------------------------------------------------------

    def _tokenizer(self, trainer: Any) -> Any:
        pc = getattr(trainer, "processing_class", None)
        return getattr(pc, "tokenizer", pc)

    def _answer_starts(self, trainer: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        marker = self.cfg.answer_marker
        if marker is None:
            return None
        tok = self._tokenizer(trainer)
        starts = []
        for row, m in zip(ids.tolist(), mask.bool().tolist()):
            real = [t for t, keep in zip(row, m) if keep]
            texts = tok.batch_decode([[t] for t in real]) if real else []
            starts.append(marker_answer_start(texts, str(marker)))
        return torch.tensor(starts, dtype=torch.long)

    def features(self, ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_ans, x_oth, n_answer, n_other) of this micro-batch: CETT means per rollout, (B, L m), float32 (float64
        for a float64 model)."""
        inp = ctx.inputs
        pm, cm, ci = inp["prompt_mask"], inp["completion_mask"], inp["completion_ids"]
        tok = self._tokenizer(ctx.trainer)
        eos = getattr(tok, "eos_token_id", None)
        starts = self._answer_starts(ctx.trainer, ci, cm)
        ans_c = answer_token_mask(ci, cm, eos, None if starts is None else starts.to(ci.device))
        ans, oth = token_regions(pm, cm, ans_c)
        xa, xo = [], []
        for i, layer in enumerate(self._layers):
            z = ctx.taps[f"{PREFIX}/z{i}"].detach()
            u = ctx.taps[f"{PREFIX}/u{i}"].detach()
            if z.shape[:2] != ans.shape:
                raise RuntimeError(
                    f"h_neurons: the down_proj input of block {i} has shape {tuple(z.shape)}, expected "
                    f"(B, P + C) = {tuple(ans.shape)} (the loss forward on cat(prompt, completion))."
                )
            dt = torch.float64 if z.dtype == torch.float64 else torch.float32
            cn = column_norms(effective_weight(layer.mlp.down_proj)).to(z.device, dt)
            a, o = pooled_cett(z.to(dt), u.to(dt), cn, ans.to(z.device), oth.to(z.device))
            xa.append(a)
            xo.append(o)
        return torch.cat(xa, 1), torch.cat(xo, 1), ans.sum(1), oth.sum(1)

    def set_columns(self, x_ans: torch.Tensor, x_oth: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-rollout values of the frozen set: CETT mass of H0 on answer / other tokens, the mean mass of the
        control sets, the probe's score. NaN without H0."""
        b = x_ans.shape[0]
        keys = ("mass", "mass_other", "mass_random", "mass_matched", "score")
        if self.probe0 is None:
            return {k: torch.full((b,), float("nan"), dtype=torch.float64) for k in keys}
        h = self.probe0.neurons.to(x_ans.device)

        def mean_mass(sets: list[torch.Tensor]) -> torch.Tensor:
            if not sets:
                return torch.full((b,), float("nan"), dtype=torch.float64)
            return torch.stack([x_ans[:, c.to(x_ans.device)].double().sum(1) for c in sets]).mean(0).cpu()

        return {
            "mass": x_ans[:, h].double().sum(1).cpu(),
            "mass_other": x_oth[:, h].double().sum(1).cpu(),
            "mass_random": mean_mass(self.controls),
            "mass_matched": mean_mass(self.matched),
            "score": self.probe0.score(x_ans).cpu(),
        }

    def on_loss(self, ctx: LossContext) -> None:
        trainer = ctx.trainer
        if not trainer.model.training or not torch.is_grad_enabled():
            return None
        self._setup(trainer)
        step = self._current(trainer)
        if not self._measured(step) or f"{PREFIX}/z0" not in ctx.taps:
            return None
        if step != self._step:
            self._step, self._rows, self._feats = step, StepRows(), []
        x_ans, x_oth, n_ans, n_oth = self.features(ctx)
        b = x_ans.shape[0]
        rewards = ctx.extras.get("rewards")
        rewards = torch.full((b,), float("nan")) if rewards is None else rewards.detach().float().cpu()
        gids = ctx.extras.get("group_ids")
        gids = torch.full((b,), -1) if gids is None else gids.detach().long().cpu()
        sids = ctx.extras.get("sample_ids")
        cols = {"group_id": gids, "reward": rewards, "n_answer": n_ans.cpu(), "n_other": n_oth.cpu()}
        if self._fit_step(step):  # the set values come after the fit, from the kept features
            ids = (
                sids.detach().long().cpu()
                if sids is not None
                else torch.arange(len(self._rows), len(self._rows) + b)
            )
            self._feats.append((ids, x_ans.cpu(), x_oth.cpu()))
            self._rows.add(ids, **cols)
        else:
            self._rows.add(sids, **cols, **self.set_columns(x_ans, x_oth))
        return None

    # ---- gradient (complete, before clipping) ---------------------------------------------------------

    def on_before_clip(self, trainer: Any) -> None:
        step = self._current(trainer)
        if self._layers is not None and self._measured(step):
            self._grad = self._gradient_energy(trainer, step)

    def on_pre_optimizer_step(self, trainer: Any) -> None:
        # Without clipping (max_grad_norm <= 0) on_before_clip is not fired and .grad is still unclipped here.
        step = self._current(trainer)
        if self._layers is None or not self._measured(step):
            return
        if float(getattr(trainer.args, "max_grad_norm", 0) or 0) <= 0 and (
            self._grad is None or self._grad[0] != step
        ):
            self._grad = self._gradient_energy(trainer, step)

    def _warn(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            if self.run is None or getattr(self.run, "is_main", True):
                print(f"warning: h_neurons: {msg}", flush=True)

    def _gradient_energy(self, trainer: Any, step: int) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """Per-neuron squared gradient norms over all blocks (L m,): W_down columns, and W_down + W_up + W_gate."""
        if _is_zero(trainer) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            self._warn(
                "sharded",
                "the gradient share is NaN: DeepSpeed ZeRO-2/3 and FSDP keep the gradients sharded, outside .grad.",
            )
            return None
        downs, mlps = [], []
        for layer in self._layers:
            mlp = layer.mlp
            gd = _linear_weight(mlp.down_proj).grad
            if gd is None:
                self._warn(
                    "no_grad",
                    "the gradient share is NaN: mlp.down_proj has no gradient (frozen weights, e.g. PEFT LoRA "
                    "without MLP target modules).",
                )
                return None
            extra = []
            for name in ("up_proj", "gate_proj"):
                mod = getattr(mlp, name, None)
                extra.append(None if mod is None else _linear_weight(mod).grad)
            d, m = neuron_gradient_energy(gd, *extra)
            downs.append(d.cpu())
            mlps.append(m.cpu())
        return step, torch.cat(downs), torch.cat(mlps)

    # ---- step end -------------------------------------------------------------------------------------

    def _gather_features(self, trainer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's (sample ids, x_ans, x_oth) of this step, concatenated in rank order (a collective)."""
        seen: set[int] = set()
        parts = []
        for ids, a, o in self._feats:
            new = torch.tensor([int(i) not in seen for i in ids.tolist()], dtype=torch.bool)
            seen.update(int(i) for i in ids.tolist())
            parts.append((ids[new], a[new], o[new]))
        self._feats = []
        n = self.num_neurons
        local = (
            torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
            torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, n),
            torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, n),
        )
        dist = _dist()
        if dist is None:
            return local
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return tuple(torch.cat([g[k] for g in gathered]) for k in range(3))  # type: ignore[return-value]

    def _broadcast(self, obj: Any) -> Any:
        dist = _dist()
        if dist is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _fit_all(
        self, step: int, x_ans: torch.Tensor, x_oth: torch.Tensor, rows: dict[str, torch.Tensor], device: Any
    ) -> dict[str, Any]:
        """The full fit and the two half fits of one step (rank 0): {"full": (probe|None, stats), "half_a": ...}."""
        cfg = self.cfg
        reward = rows["reward"]
        wrong = torch.isfinite(reward) & (reward < float(cfg.threshold))
        valid = torch.isfinite(reward) & torch.isfinite(x_ans).all(1) & torch.isfinite(x_oth).all(1)
        gids = rows["group_id"].long()
        keep, data, note = select_rollouts(
            wrong, valid, gids, bool(cfg.consistent_only), int(cfg.min_per_class)
        )
        base = {
            "data": data,
            "note": note,
            "n_rollouts": int(keep.sum()),
            "n_groups": int(torch.unique(gids[keep]).numel()),
            "n_wrong": int((keep & wrong).sum()),
            "n_right": int((keep & ~wrong).sum()),
        }
        kw = {
            "C": float(cfg.C),
            "standardize": bool(cfg.standardize),
            "max_features": int(cfg.max_features),
            "tol": float(cfg.tol),
            "max_iter": int(cfg.max_iter),
            "device": device,
        }
        out: dict[str, Any] = {"keep": keep}
        if data == "none":
            out["full"] = (None, base)
            return out
        probe, stats = fit_probe(x_ans[keep], x_oth[keep], wrong[keep], **kw)
        out["full"] = (probe, {**base, **stats})
        if cfg.split_half:
            gen = torch.Generator().manual_seed(self.seed + step)
            halves = split_groups(keep, wrong, gids, gen)
            need = max(2, int(cfg.min_per_class) // 2)
            for name, h in zip(("half_a", "half_b"), halves):
                hs = {
                    "data": data,
                    "note": "",
                    "n_rollouts": int(h.sum()),
                    "n_groups": int(torch.unique(gids[h]).numel()),
                    "n_wrong": int((h & wrong).sum()),
                    "n_right": int((h & ~wrong).sum()),
                }
                if min(hs["n_wrong"], hs["n_right"]) < need:
                    hs["note"] = f"fewer than {need} wrong or right rollouts in this half: no fit"
                    out[name] = (None, hs)
                    continue
                p, s = fit_probe(x_ans[h], x_oth[h], wrong[h], **kw)
                out[name] = (p, {**hs, **s})
        return out

    def _fit(self, trainer: Any, step: int, rows: dict[str, torch.Tensor], x_ans, x_oth) -> dict[str, Any]:
        """Fit on rank 0, broadcast; install H0 (step 1) or the refit. Returns the fit records and metrics."""
        device = trainer.accelerator.device if getattr(trainer, "accelerator", None) is not None else None
        result = None
        if self.run is None or getattr(self.run, "is_main", True) or _dist() is None:
            result = self._fit_all(step, x_ans, x_oth, rows, device)
            result = {
                k: (None if v[0] is None else v[0].state(), v[1]) if k != "keep" else v
                for k, v in result.items()
            }
        result = self._broadcast(result)
        fits = {
            k: (None if v[0] is None else NeuronProbe.from_state(v[0]), v[1])
            for k, v in result.items()
            if k != "keep"
        }
        full, full_stats = fits["full"]
        halves = [
            fits[k][0].neurons if k in fits and fits[k][0] is not None else None for k in ("half_a", "half_b")
        ]
        metrics: dict[str, float] = {}
        records = []
        n = self.num_neurons
        split = (
            set_overlap(halves[0], halves[1], n)["jaccard"]
            if all(h is not None for h in halves)
            else float("nan")
        )
        is_h0 = step == 1 and not self.h0_attempted
        if full is not None:
            metrics["fit_size"] = float(len(full.neurons))
            metrics["split_jaccard"] = split
        row = {"step": step, "fit": "full", "C": float(self.cfg.C), **full_stats, "split_jaccard": split}
        if is_h0:
            self.h0_attempted = True
            self.probe0 = full
            self.halves0 = halves if all(h is not None for h in halves) else None
            if full is None:
                self._warn("no_h0", f"no H0 at step 1: {full_stats['note']}; the set metrics stay NaN.")
            else:
                if full_stats["note"]:
                    self._warn("fallback", full_stats["note"])
                gen = torch.Generator().manual_seed(self.seed)
                k = int(self.cfg.num_random)
                self.controls = layer_matched_random_sets(
                    full.neurons, len(self._layers), self._width, k, gen
                )
                ok = torch.isfinite(x_ans).all(1)
                activity = x_ans[ok].double().mean(0) if bool(ok.any()) else torch.zeros(self.num_neurons)
                self.matched = activation_matched_sets(full.neurons, activity, self._width, k, gen)
        elif full is not None and self.probe0 is not None:
            ov = set_overlap(self.probe0.neurons, full.neurons, n)
            cross = float("nan")
            if self.halves0 is not None and all(h is not None for h in halves):
                js = [set_overlap(a, b, n)["jaccard"] for a in self.halves0 for b in halves]
                cross = sum(js) / len(js)
            row.update({k: ov[k] for k in ("jaccard", "overlap", "jaccard_chance", "overlap_chance")})
            row["cross_jaccard"] = cross
            metrics.update({k: ov[k] for k in ("jaccard", "overlap", "jaccard_chance", "overlap_chance")})
            metrics["cross_jaccard"] = cross
            self.last_refit = {"step": step, "set": full.neurons.clone(), "halves": halves}
        elif full is None:
            self._warn(f"refit_{step}", f"no refit at step {step}: {full_stats['note']}")
        records.append(row)
        for k in ("half_a", "half_b"):
            if k in fits:
                records.append({"step": step, "fit": k, "C": float(self.cfg.C), **fits[k][1]})
        sets = [(k, p) for k, (p, _) in fits.items() if p is not None]
        return {"records": records, "sets": sets, "metrics": metrics, "keep": result["keep"]}

    def step_metrics(self, rows: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Bucket rows and logger metrics of one measured step from its per-rollout rows (and stored gradient)."""
        reward = rows.get("reward", torch.zeros(0))
        mass = rows.get("mass", torch.zeros(0))
        buckets = reward_buckets(reward, float(self.cfg.threshold))
        ok = torch.isfinite(mass)
        sel = {
            "all": ok & torch.isfinite(reward),
            "correct": buckets["correct"] & ok,
            "wrong": buckets["wrong"] & ok,
        }
        size = float(len(self.probe0.neurons)) if self.probe0 is not None else float("nan")
        out_rows, metrics = [], {"set_size": size}

        def mean(x: torch.Tensor) -> float:
            return float(x.mean()) if len(x) else float("nan")

        def sem(x: torch.Tensor) -> float:
            return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")

        for b in BUCKETS:
            m = sel[b]
            r = {
                "bucket": b,
                "n_rollouts": int(m.sum()),
                "set_size": size,
                "mass": mean(mass[m]),
                "mass_sem": sem(mass[m]),
                "mass_random": mean(rows["mass_random"][m]) if "mass_random" in rows else float("nan"),
                "mass_matched": mean(rows["mass_matched"][m]) if "mass_matched" in rows else float("nan"),
                "mass_other": mean(rows["mass_other"][m]) if "mass_other" in rows else float("nan"),
            }
            out_rows.append(r)
            if b != "all":
                metrics[f"mass_{b}"] = r["mass"]
                metrics[f"mass_random_{b}"] = r["mass_random"]
                metrics[f"mass_matched_{b}"] = r["mass_matched"]
        wrong = buckets["wrong"]
        score = rows.get("score", torch.zeros(0))
        a_ok = sel["all"]
        metrics["auroc"] = auroc(score[a_ok], wrong[a_ok]) if len(score) else float("nan")
        metrics["auroc_mass"] = auroc(mass[a_ok], wrong[a_ok]) if len(mass) else float("nan")
        g = self._grad if self._grad is not None and self._grad[0] == self._step_done else None
        nan = float("nan")
        shares = dict.fromkeys(
            (
                "grad_share_down",
                "grad_share_mlp",
                "grad_share_down_random",
                "grad_share_mlp_random",
                "grad_share_down_matched",
                "grad_share_mlp_matched",
            ),
            nan,
        )
        if g is not None and self.probe0 is not None:
            _, down, mlp = g
            h = self.probe0.neurons
            shares["grad_share_down"] = set_share(down, h)
            shares["grad_share_mlp"] = set_share(mlp, h)
            for name, sets in (("random", self.controls), ("matched", self.matched)):
                if sets:
                    shares[f"grad_share_down_{name}"] = sum(set_share(down, c) for c in sets) / len(sets)
                    shares[f"grad_share_mlp_{name}"] = sum(set_share(mlp, c) for c in sets) / len(sets)
        shares["grad_share_chance"] = size / self.num_neurons if self.probe0 is not None else nan
        metrics.update(shares)
        all_row = out_rows[0]
        all_row.update(shares)
        all_row["auroc"], all_row["auroc_mass"] = metrics["auroc"], metrics["auroc_mass"]
        return metrics, out_rows

    def on_step_end(self, trainer: Any) -> None:
        if self._layers is None:
            return
        step = int(trainer.state.global_step)
        if not self._measured(step):
            return
        self._step_done = step
        fitting = self._fit_step(step)
        rows = (
            self._rows.gather(trainer.accelerator)
            if self._step == step
            else StepRows().gather(trainer.accelerator)
        )
        feats = self._gather_features(trainer) if fitting else None
        self._rows, self._step = StepRows(), -1
        fit_out = None
        if fitting and feats is not None:
            ids, x_ans, x_oth = feats
            pos = {int(s): i for i, s in enumerate(ids.tolist())}
            order = torch.tensor(
                [pos[int(s)] for s in rows.get("sample_id", torch.zeros(0)).tolist()], dtype=torch.long
            )
            x_ans, x_oth = x_ans[order], x_oth[order]
            fit_out = self._fit(trainer, step, rows, x_ans, x_oth)
            rows.update(self.set_columns(x_ans, x_oth))
            rows["used_in_fit"] = fit_out["keep"].double()
        metrics, bucket_rows = self.step_metrics(rows)
        if fit_out is not None:
            metrics.update(fit_out["metrics"])
        self._grad = None
        if getattr(trainer, "_metrics", None) is not None:
            finite = {f"{PREFIX}/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
            log_metrics(trainer, finite, reduce="none", mode="train")
        self.last_metrics = metrics
        if self.run is None or not getattr(self.run, "is_main", True) or self.run.writer is None:
            return
        w = self.run.writer
        w.write(dumps.H_NEURONS_STEPS, [{"step": step, **r} for r in bucket_rows], step=step)
        n = len(rows.get("sample_id", []))
        if n:
            reward = rows["reward"]
            per = {
                "step": [step] * n,
                "sample_id": rows["sample_id"].tolist(),
                "group_id": rows["group_id"].long().tolist(),
                "reward": reward.tolist(),
                "wrong": (torch.isfinite(reward) & (reward < float(self.cfg.threshold))).tolist(),
                "n_answer_tokens": rows["n_answer"].long().tolist(),
                "n_other_tokens": rows["n_other"].long().tolist(),
                **{
                    k: rows[k].tolist()
                    for k in ("mass", "mass_other", "mass_random", "mass_matched", "score")
                },
            }
            if "used_in_fit" in rows:
                per["used_in_fit"] = rows["used_in_fit"].bool().tolist()
            w.write(dumps.H_NEURONS_ROLLOUTS, [dict(zip(per, v)) for v in zip(*per.values())], step=step)
        if fit_out is not None:
            w.write(dumps.H_NEURONS_FITS, fit_out["records"], step=step)
            set_rows = []
            for name, p in fit_out["sets"]:
                for i, wt in zip(p.index.tolist(), p.weight.tolist()):
                    set_rows.append(
                        {
                            "step": step,
                            "fit": name,
                            "layer": i // self._width,
                            "neuron": i % self._width,
                            "weight": wt,
                            "in_set": wt > 0,
                        }
                    )
            w.write(dumps.H_NEURONS_SET, set_rows, step=step)

    # ---- resume ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The frozen probe (H0 and its weights), whether the step-1 fit ran, the step-1 half sets, both control sets,
        the last refit and the warnings already given. Per-step rows are on disk (one shard per measured step)."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {
            "probe0": None if self.probe0 is None else self.probe0.state(),
            "h0_attempted": self.h0_attempted,
            "halves0": None if self.halves0 is None else [clone(h) for h in self.halves0],
            "controls": [c.clone() for c in self.controls],
            "matched": [c.clone() for c in self.matched],
            "last_refit": None
            if self.last_refit is None
            else {
                "step": self.last_refit["step"],
                "set": self.last_refit["set"].clone(),
                "halves": [clone(h) for h in self.last_refit["halves"]],
            },
            "warned": sorted(self.warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = state.get("probe0")
        self.probe0 = None if p is None else NeuronProbe.from_state(p)
        self.h0_attempted = bool(state.get("h0_attempted", self.probe0 is not None))
        h = state.get("halves0")
        self.halves0 = None if h is None else [x.long().clone() for x in h]
        self.controls = [c.long().clone() for c in state.get("controls", [])]
        self.matched = [c.long().clone() for c in state.get("matched", [])]
        lr = state.get("last_refit")
        self.last_refit = (
            None
            if lr is None
            else {
                "step": int(lr["step"]),
                "set": lr["set"].long().clone(),
                "halves": [None if x is None else x.long().clone() for x in lr["halves"]],
            }
        )
        self.warned = set(state.get("warned", []))
