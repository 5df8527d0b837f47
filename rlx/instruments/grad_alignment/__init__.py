"""The `grad_alignment` instrument: per-step gradient alignment with a target set (arXiv 2512.00778).

Data flow of one logged optimizer step (every `every` steps, and step 1):

    on_step_begin                     row path: hooks on the policy for this step's loss forwards (removed at
                                      step end, and by `close` however training ends)
    on_loss (each micro-batch)        w_t = dL/dl_t (the seam), split into pos / neg / kl and tertiles
                                      (weights.py); first micro-batch: g_T on D' (probe pass, isolated);
                                      the estimator's share (estimators.py): param, row or activation
    Trainer: backward (+ DDP all-reduce)
    on_before_clip (the seam event)   the optimizer's gradient .grad (global, pre-clip): G_total, norms,
                                      layer groups, sketch, drift; snapshot of theta
    on_step_end                       realised <g_T, delta theta>, measured delta R_T; all-reduce scalars
                                      (DDP mean); the step's rows to one shard
                                      diagnostics/grad_alignment/step_NNNNNN.parquet (O(1) per step), sketches,
                                      metrics grad_align/* to the logger

G uses the sign convention G = <g_T, grad L>, g_T = grad R_T: G > 0 means a descent step lowers the NLL of
D', i.e. moves the model toward the target. See docs/gradient_alignment.md.

Files: this module (the instrument: options, parameter scope, target, schedule, events, reduction, output),
estimators.py (the three estimators), weights.py (the w_t split), records.py (per-micro-batch and per-step
records), exact_saver.py (what the exact two-pass form saves; the offline pass is rlx/alignment/exact.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from typing import Any

import torch

from rlx import dumps
from rlx.algorithms.probing import measured_step
from rlx.alignment import functional as am
from rlx.alignment.rowgrad import RowCapture
from rlx.alignment.sketch import CountSketch
from rlx.alignment.target import (
    TargetBatch,
    batch_from_final,
    batch_from_jsonl,
    batch_from_rollouts,
    batch_from_texts,
    check_final_target,
    check_responses_file,
    gather_batch,
)
from rlx.errors import UserError
from rlx.instruments.base import Instrument, LossContext, log_metrics, register_instrument
from rlx.instruments.grad_alignment.estimators import (
    ActivationEstimator,
    Estimator,
    ParamEstimator,
    RowEstimator,
    policy_of,
)
from rlx.instruments.grad_alignment.exact_saver import ExactSaver
from rlx.instruments.grad_alignment.records import StepRecord, TokenWeights
from rlx.instruments.grad_alignment.weights import (
    KL_FIT_TOLERANCE,
    distributed,
    split_micro_batch,
    token_weights,
    unmodelled_kl_terms,
)
from rlx.trainers.catalog import spec_of, trainer_spec
from rlx.trainers.registry import TrainerSpec

__all__ = ["EXCLUDED_MODULES", "KL_FIT_TOLERANCE", "TABLE", "GradAlignment", "unmodelled_kl_terms"]

TABLE = dumps.GRAD_ALIGNMENT.name
"""The table's manifest name: one shard per logged step (`rlx.dumps.GRAD_ALIGNMENT`)."""
EXCLUDED_MODULES = ("rlx_critic", "v_head", "value_head")
"""Trainable modules outside the policy (their gradient does not move log pi): left out of the scope."""


def _is_zero(trainer: Any) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) >= 2


@register_instrument("grad_alignment")
class GradAlignment(Instrument):
    """Alignment G of each update (and of its positive / negative / KL parts and reweighting tertiles) with g_T."""

    changes_loss = False
    allow_fast = True
    """Use the one-backward row path (rowgrad.py) where it applies; False forces per-component backwards."""

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        if int(cfg.every) < 1:
            raise UserError(
                f"diagnostics.grad_alignment.every={cfg.every}: expected an integer >= 1 (log every N steps)."
            )
        if cfg.variant not in ("auto", "param", "activation"):
            raise UserError(
                f"diagnostics.grad_alignment.variant={cfg.variant!r}: expected auto, param or activation."
            )
        t = str(cfg.target)
        if t not in ("auto", "heldout_chosen", "probe_rollouts") and not t.startswith(
            ("responses:", "final:")
        ):
            raise UserError(
                f"diagnostics.grad_alignment.target={t!r}: expected auto, heldout_chosen, final:<run dir>, "
                "responses:<path to .jsonl> or probe_rollouts."
            )
        # Files are checked now, before training starts, not at the first logged step.
        if t.startswith("final:"):
            check_final_target(t.split(":", 1)[1], run.cfg)
        elif t.startswith("responses:"):
            check_responses_file(t.split(":", 1)[1])
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise UserError(
                "diagnostics.grad_alignment does not run under FSDP: it needs whole parameter gradients (or, in its "
                "activation variant, the whole LM head), which FSDP keeps sharded. Launch with DDP or DeepSpeed "
                "ZeRO (accelerate_configs/multi_gpu.yaml, zero3.yaml), or set diagnostics.grad_alignment.enabled=false."
            )
        self.variant = "activation" if cfg.variant == "activation" else "param"
        """param or activation (auto turns into activation under ZeRO-2/3 at set-up)."""
        self.exact: ExactSaver | None = None
        """Saves what the exact two-pass D' needs (exact_saver.py), with `exact.enabled`."""
        if getattr(getattr(cfg, "exact", None), "enabled", False):
            self.exact = ExactSaver(cfg, run)
        self.algo = ""
        """The trainer's registered name, set at set-up (an unregistered trainer is an error there)."""
        self.estimator: Estimator | None = None
        """How G is measured (estimators.py), chosen at set-up."""
        self.cur: StepRecord | None = None
        """The logged step being measured."""
        self.target: TargetBatch | None = None
        """D', built at the first logged step (or restored on resume)."""
        self.series: list[float] = []
        """G_total of every logged step (the run summary)."""
        self.prev: deque = deque(maxlen=max(int(cfg.drift_lag), 1))
        """The previous logged steps' total gradients (drift)."""
        self.names: list[str] = []
        """Names of the parameter scope: the policy's trainable parameters, never a critic."""
        self.params: list[torch.nn.Parameter] | None = None
        self.groups: dict[str, list[int]] = {}
        self.sketch: CountSketch | None = None
        self.kl_unmodelled: list[str] = []
        """Why the trainer's loss is not the form the KL split models ([] if it is, or has no KL term)."""
        self.kl_bias_correction = False
        self.last_metrics: dict[str, float] = {}
        """The logger metrics of the last logged step."""
        self.summary: dict[str, Any] | None = None
        self._rollout_steps = 1
        """Optimizer steps per rollout (the spec's `steps_per_rollout`; PPO: ppo_epochs * num_minibatches)."""
        self._trainer: Any = None
        self._kl_warned = False
        self._hooks = contextlib.ExitStack()
        """What on_train_begin installed on the model (the exact saver's hook): closed by on_train_end / close."""

    @property
    def spec(self) -> TrainerSpec:
        """What the instrument knows about the trainer: its registered facts (never tests of its name)."""
        return trainer_spec(self.algo)

    @property
    def needs_hidden(self) -> bool:  # type: ignore[override]
        """Only logged loss forwards read `ctx.hidden`: on other steps the seam does not hook the backbone."""
        if self.estimator is None:
            return self.variant == "activation"
        t = self._trainer
        return self.estimator.needs_hidden and (t is None or self._logged(int(t.state.global_step) + 1))

    @property
    def rowcap(self) -> RowCapture | None:
        """The row path's layer captures; None when the path is off or was dropped."""
        return getattr(self.estimator, "capture", None)

    # ---- set-up -----------------------------------------------------------------------------------------

    def _setup(self, trainer: Any) -> None:
        if self.params is not None:
            return
        self._trainer = trainer
        if self.cfg.variant == "auto" and _is_zero(trainer):
            self.variant = "activation"
        model = trainer.accelerator.unwrap_model(trainer.model)
        # Scope: the policy's trainable parameters (LoRA adapters under PEFT); never a critic (PPO's value model).
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and not any(f"{c}." in n for c in EXCLUDED_MODULES)
        ]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        policy = policy_of(trainer)
        n_layers = int(getattr(policy.config.get_text_config(), "num_hidden_layers", 0) or 0)
        self.groups = am.layer_groups(self.names, n_layers, int(self.cfg.layer_groups))
        self.sketch = None
        if int(self.cfg.sketch_dim) > 0 and self.variant == "param":
            self.sketch = CountSketch(
                [p.shape for p in self.params], int(self.cfg.sketch_dim), seed=int(self.run.cfg.seed)
            )
        self.algo = spec_of(trainer, default=self.run.cfg.algo).name
        self.kl_unmodelled = unmodelled_kl_terms(trainer.args) if self.spec.kl_coef(trainer) != 0.0 else []
        self.kl_bias_correction = bool(getattr(trainer.args, "use_bias_correction_kl", False))
        self._rollout_steps = self.spec.steps_per_rollout(trainer.args)
        self.estimator = self._estimator(policy)

    def _estimator(self, policy: torch.nn.Module) -> Estimator:
        if self.variant == "activation":
            return ActivationEstimator(self.spec)
        param_args = (self.params, self.groups, self.sketch, int(self.run.cfg.seed), self.prev)
        if self.allow_fast and self.spec.row_fast_path:
            capture = RowCapture(policy, self.params, policy.get_output_embeddings())
            if capture.supported:
                regularized = bool(self.run.cfg.regularizers.enabled)
                return RowEstimator(capture, self.spec, regularized, *param_args)
        return ParamEstimator(*param_args)

    def on_train_begin(self, trainer: Any) -> None:
        self._setup(trainer)
        if self.exact is not None:
            self.exact.attach(self, trainer)
            self._hooks.callback(self.exact.detach)

    def on_step_begin(self, trainer: Any) -> None:
        # Hooks exist only during logged steps: a step that logs nothing runs with the model's hooks untouched.
        if self.estimator is not None and self._logged(int(trainer.state.global_step) + 1):
            self.estimator.arm(policy_of(trainer), lambda: self._logged(int(trainer.state.global_step) + 1))

    def _tokenizer(self, trainer: Any) -> Any:
        pc = trainer.processing_class
        return getattr(pc, "tokenizer", pc)

    def _target_name(self) -> str:
        t = str(self.cfg.target)
        return self.spec.default_alignment_target if t == "auto" else t

    def _build_target(self, ctx: LossContext) -> TargetBatch:
        name, tok, size = self._target_name(), self._tokenizer(ctx.trainer), int(self.cfg.target_size)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if name.startswith("final:"):
            batch = batch_from_final(tok, name.split(":", 1)[1], size)
        elif name.startswith("responses:"):
            batch = batch_from_jsonl(tok, name.split(":", 1)[1], size)
        elif name == "probe_rollouts":
            if "completion_ids" not in ctx.inputs or "prompt_ids" not in ctx.inputs:
                raise UserError(
                    f"diagnostics.grad_alignment.target=probe_rollouts needs rollouts (prompt_ids/completion_ids); "
                    f"algo={self.algo} has none. Use target=heldout_chosen or responses:<path>."
                )
            batch = batch_from_rollouts(ctx.inputs, size, pad)
        else:  # heldout_chosen
            from rlx.tasks import get_task

            ds = get_task(self.run.cfg.task).eval_dataset()
            ds = ds.select(range(min(size, len(ds))))
            col = "solution" if "solution" in ds.column_names else "chosen"
            batch = batch_from_texts(tok, ds["prompt"], ds[col], "heldout_chosen")
        return gather_batch(batch)

    # ---- per micro-batch ----------------------------------------------------------------------------------

    def _logged(self, step: int) -> bool:
        """Step 1 and every `every`-th step; a trainer that reuses rollouts: only on-policy steps (`_rollout_steps`)."""
        return measured_step(step, int(self.cfg.every), self._rollout_steps)

    def on_loss(self, ctx: LossContext) -> None:
        trainer = ctx.trainer
        if ctx.token_logps is None or not trainer.model.training or not torch.is_grad_enabled():
            return None
        self._setup(trainer)
        step = int(trainer.state.global_step) + 1
        if not self._logged(step):
            return None
        est = self.estimator
        if self.cur is None or self.cur.step != step:
            self.cur = StepRecord(step)
            if self.target is None:
                self.target = self._build_target(ctx)
            est.begin_step(self.cur, policy_of(trainer), self.target)
        est.settle()
        cur = self.cur
        cur.micro += 1
        w, mask, w_kl = token_weights(ctx, cur, self.spec, self.kl_unmodelled, self.kl_bias_correction)
        if self.exact is not None:
            self.exact.on_micro(self, ctx, w)
        split = split_micro_batch(ctx, w, mask, w_kl, self.spec)
        for name, cw in {**split.comps, **split.terts}.items():
            cur.n_tokens[name] = cur.n_tokens.get(name, 0.0) + float((cw != 0).sum())
        cur.n_tokens["total"] = cur.n_tokens.get("total", 0.0) + float(mask.sum())
        est.on_micro(cur, ctx, split)
        if self.cfg.save_token_weights:
            sids = ctx.extras.get("sample_ids")  # GRPO/PPO: joins diagnostics/rollouts
            cur.tok.append(
                TokenWeights(
                    w=w.detach().cpu(),
                    mask=mask.detach().cpu(),
                    w_kl=(w_kl if w_kl is not None else torch.zeros_like(w)).cpu(),
                    sample_id=(sids if sids is not None else torch.full((w.shape[0],), -1)).long().cpu(),
                )
            )
        return None

    # ---- full gradient (before clipping) --------------------------------------------------------------------

    def on_before_clip(self, trainer: Any) -> None:
        """Read the optimizer's gradient complete (accumulated, all-reduced) and *before* clipping."""
        if self.estimator is not None:
            self.estimator.on_gradient(self.cur, int(trainer.state.global_step) + 1)

    def on_pre_optimizer_step(self, trainer: Any) -> None:
        # Reached without clipping (and without on_before_clip) when max_grad_norm <= 0: .grad is still unclipped.
        if self.estimator is None:
            return
        if self.cur is not None and self.cur.total is None:
            if float(getattr(trainer.args, "max_grad_norm", 0) or 0) <= 0:
                self.estimator.on_gradient(self.cur, int(trainer.state.global_step) + 1)
        self.estimator.settle()

    # ---- step end: realised alignment, reduction, records ---------------------------------------------------

    def on_step_end(self, trainer: Any) -> None:
        est = self.estimator
        if est is None:
            return
        est.settle()
        est.disarm()
        cur = self.cur
        if cur is None or cur.step != int(trainer.state.global_step):
            return
        self.cur = None
        if self.exact is not None:  # after the update: the weights after it, the batch
            self.exact.on_step_end(self, cur)
        world = trainer.accelerator.num_processes
        if cur.neg_from_total and cur.total is not None and "pos" in cur.vec:
            cur.vec["neg"] = am.sub(cur.total, cur.vec["pos"])  # linear, so all-reduced sketches stay exact
        comps = [c for c in ("pos", "neg", "kl") if c in cur.vec]
        local = {f"n_{k}": v for k, v in cur.n_tokens.items()}
        local.update(n_kl_fit=cur.kl_fit, n_kl_unmodelled=cur.kl_unmodelled, kl_residual=cur.kl_residual)
        sk: dict[str, torch.Tensor] = {}
        local.update(est.local_sums(cur, comps, sk, world))
        rec = self._all_reduce(trainer, local, sk, world)
        est.finish_reduced(rec, sk, comps)
        if cur.failed:  # a capture missed its backward: components of this step are unknown
            for c in ("pos", "neg", "top", "mid", "bot"):
                rec[f"G_{c}"] = float("nan")
            est.drop_fast_path()  # per-component backwards from now on
        rows = est.rows(cur, rec, sk, self.target, policy_of(trainer))
        self._annotate(rows, rec, cur, norm_source=est.ddp_norm_source if distributed() else "exact")
        self._emit(trainer, cur, rows, sk)

    @staticmethod
    def _all_reduce(
        trainer: Any, local: dict[str, float], sk: dict[str, torch.Tensor], world: int
    ) -> dict[str, float]:
        """Mean over ranks of `local` (token counts summed) and of the sketches `sk` (in place), in one collective
        for the scalars."""
        keys = sorted(local)
        vals = torch.tensor([local[k] for k in keys], dtype=torch.float64)
        dist = distributed()
        if dist is not None:
            dev = trainer.accelerator.device
            t = vals.to(dev)
            dist.all_reduce(t)
            vals = t.cpu()
            for c in list(sk):
                s = sk[c].to(dev)
                dist.all_reduce(s)
                sk[c] = s.cpu() / world
        return {k: v if k.startswith("n_") else v / world for k, v in zip(keys, vals.tolist())}

    def _annotate(self, rows: list[dict], rec: dict[str, float], cur: StepRecord, norm_source: str) -> None:
        """Where each row's norm comes from and how the KL term was split (columns norm_source, kl_split*)."""
        # kl_split: none (no KL loss term), fit (its part split off exactly), unmodelled (GRPO's loss is not the
        # form the split assumes: the KL term's weight stays in pos / neg, no kl row is trusted)
        kl_split = "unmodelled" if rec["n_kl_unmodelled"] else ("fit" if rec["n_kl_fit"] else "none")
        reason = cur.kl_reason or ("on another rank" if kl_split == "unmodelled" else "")
        if kl_split == "unmodelled" and self.run.is_main and not self._kl_warned:
            self._kl_warned = True
            print(
                f"warning: grad_alignment: the KL term is not split from the policy-gradient part ({reason}); "
                "its weight stays in pos/neg and the rows are marked kl_split=unmodelled "
                "(docs/gradient_alignment.md)",
                flush=True,
            )
        own = self.estimator.own_norms
        for r in rows:
            r.setdefault("norm_source", norm_source if r["component"] in own else "exact")
            r["kl_split"], r["kl_split_reason"] = kl_split, reason
            r["kl_fit_residual"] = rec["kl_residual"] if kl_split != "none" else float("nan")

    # ---- output ---------------------------------------------------------------------------------------------

    @staticmethod
    def step_metrics(rows: list[dict]) -> dict[str, float]:
        """The logger metrics of one logged step's rows (without the `grad_align/` prefix)."""
        total_row = next(r for r in rows if r["component"] == "total")
        metrics = {f"G_{r['component'].replace('layer:', 'layer_')}": r["G"] for r in rows}
        main = ("total", "pos", "neg", "kl", "update")
        metrics.update({f"cos_{r['component']}": r["cos"] for r in rows if r["component"] in main})
        metrics.update({f"norm_{r['component']}": r["norm"] for r in rows if r["component"] in main})
        metrics["norm_target"] = total_row["norm_target"]
        metrics["cos_pos_neg"] = next(
            (r["cos_pos_neg"] for r in rows if r["component"] == "pos"), float("nan")
        )
        if "drift" in total_row:
            metrics["drift"] = total_row["drift"]
        if total_row.get("kl_split", "none") != "none":
            metrics["kl_split_unmodelled"] = float(total_row["kl_split"] == "unmodelled")
            metrics["kl_fit_residual"] = total_row["kl_fit_residual"]
        upd = next((r for r in rows if r["component"] == "update"), None)
        if upd is not None:
            metrics["realised"], metrics["delta_R"] = upd["G"], upd["delta_R"]
        return metrics

    def _log_metrics(self, trainer: Any, metrics: dict[str, float]) -> None:
        """The instrument's one path to the logger: the finite values as grad_align/*, through the seam's channel
        (`log_metrics`) with no further reduction (they are means over ranks already, identical on every rank)."""
        if getattr(trainer, "_metrics", None) is None:  # a trainer without TRL's metrics store logs nothing
            return
        finite = {f"grad_align/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        log_metrics(trainer, finite, reduce="none", mode="train")

    def _emit(self, trainer: Any, cur: StepRecord, rows: list[dict], sk: dict[str, torch.Tensor]) -> None:
        """One logged step out: the G series, the logger, and (rank 0) its table shard, sketches and token weights."""
        total_row = next(r for r in rows if r["component"] == "total")
        self.series.append(total_row["G"])
        metrics = self.step_metrics(rows)
        self._log_metrics(trainer, metrics)
        self.last_metrics = metrics
        if not self.run.is_main:
            return
        w = self.run.writer
        # this step's rows only: earlier shards are never rewritten
        w.write(dumps.GRAD_ALIGNMENT, rows, step=cur.step)
        if sk and int(self.cfg.sketch_dim) > 0:
            tensors = {f"{k}/{cur.step:06d}": v.to(torch.float16) for k, v in sk.items()}
            w.write(
                dumps.GRAD_ALIGNMENT_SKETCHES,
                tensors,
                step=cur.step,
                metadata={
                    "step": str(cur.step),
                    "sketch_dim": str(self.cfg.sketch_dim),
                    "seed": str(self.run.cfg.seed),
                },
            )
        if cur.tok:
            B = max(t.w.shape[1] for t in cur.tok)
            pad = lambda x: torch.nn.functional.pad(x, (0, B - x.shape[1]))  # noqa: E731
            w.write(
                dumps.GRAD_ALIGNMENT_TOKENS,
                {
                    **{k: torch.cat([pad(getattr(t, k)) for t in cur.tok]) for k in ("w", "w_kl", "mask")},
                    "sample_id": torch.cat([t.sample_id for t in cur.tok]),
                },
                step=cur.step,
                metadata={"step": str(cur.step)},
            )

    def on_train_end(self, trainer: Any) -> None:
        self.close()
        if not self.run.is_main or not self.series:
            return
        summary = am.run_summary(self.series)
        summary.update(
            {
                "target": self.target.name if self.target else None,
                "target_option": str(self.cfg.target),
                "variant": self.variant,
                "algo": self.algo,
            }
        )
        self.summary = summary
        self.run.writer.write(dumps.GRAD_ALIGNMENT_SUMMARY, summary)

    def close(self) -> None:
        """Remove every hook the instrument put on the model (idempotent; also when training raised)."""
        self._hooks.close()
        if self.estimator is not None:
            self.estimator.disarm()
            self.estimator.close()

    # ---- exact resume -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Target set D', G series and the drift history (previous total gradients). The table's rows are on disk
        (one shard per logged step), restored with the run's diagnostics."""
        t = self.target
        return {
            "target": None
            if t is None
            else {
                "input_ids": t.input_ids.cpu(),
                "attention_mask": t.attention_mask.cpu(),
                "loss_mask": t.loss_mask.cpu(),
                "name": t.name,
            },
            "series": list(self.series),
            "prev": [[x.detach().cpu() for x in g] for g in self.prev],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state["target"]
        self.target = None if t is None else TargetBatch(**t)
        self.series = list(state["series"])
        self.prev.clear()
        self.prev.extend(state["prev"])
