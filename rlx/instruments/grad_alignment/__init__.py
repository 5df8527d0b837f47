"""The `grad_alignment` instrument: per-step gradient alignment with a target set (arXiv 2512.00778).

Data flow of one logged optimizer step (every `every` steps, and step 1):

    on_loss (each micro-batch)        w_t = dL/dl_t (the seam), split into pos / neg / kl and tertiles;
                                      first micro-batch: g_T on D' (probe pass, isolated);
                                      param variant: one backward per component of sum_t w_t m_c l_t
                                      (vectors accumulated over micro-batches), one per tertile (dotted
                                      with g_T at once); activation variant: head gradients from hooked states
    Trainer: backward (+ DDP all-reduce)
    before grad clipping              the optimizer's gradient .grad (global, pre-clip): G_total, norms,
                                      layer groups, sketch, drift; snapshot of theta
    on_step_end                       realised <g_T, delta theta>, measured delta R_T; all-reduce scalars
                                      (DDP mean); the step's rows to one shard
                                      diagnostics/grad_alignment/step_NNNNNN.parquet (O(1) per step), sketches,
                                      metrics grad_align/* to the logger

G uses the sign convention G = <g_T, grad L>, g_T = grad R_T: G > 0 means a descent step lowers the NLL of
D', i.e. moves the model toward the target. See docs/gradient_alignment.md.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Any

import torch

from rlx import dumps
from rlx.alignment import functional as am
from rlx.alignment.rowgrad import RowCapture, row_alignment
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
    target_gradient,
    target_head_gradient,
    target_nll,
)
from rlx.errors import UserError
from rlx.instruments.base import Instrument, LossContext, register_instrument, unwrap_policy
from rlx.trainers.catalog import spec_of, trainer_spec
from rlx.trainers.registry import TrainerSpec

TABLE = dumps.GRAD_ALIGNMENT.name
"""The table's manifest name: one shard per logged step (`rlx.dumps.GRAD_ALIGNMENT`)."""
EXCLUDED_MODULES = ("rlx_critic", "v_head", "value_head")
"""Trainable modules outside the policy (their gradient does not move log pi): left out of the scope."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _gather_scores(score: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' unit scores (rank-major) and this rank's offset: tertiles are ranked globally."""
    dist = _dist()
    lists: list = [None] * dist.get_world_size()
    dist.all_gather_object(lists, score.detach().cpu().tolist())
    offset = sum(len(x) for x in lists[: dist.get_rank()])
    return torch.tensor([v for x in lists for v in x], dtype=torch.float64), offset


KL_FIT_TOLERANCE = 1e-3
"""Relative residual of the per-sequence KL fit above which a micro-batch's loss is not of the modelled form."""
KL_MODELLED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""TRL loss types whose per-token loss is c_i (clipped surrogate + beta KL_t) with c_i constant in a sequence."""


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


def _is_zero(trainer: Any) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) >= 2


class _Step:
    """Accumulators for one logged optimizer step (summed over micro-batches; local to the rank)."""

    def __init__(self, step: int):
        self.step = step
        self.gT: am.Vec | None = None
        self.R_T = float("nan")
        self.vec: dict[str, am.Vec] = {}
        self.G: dict[str, float] = {}
        self.n_tokens: dict[str, float] = {}
        self.total: am.Vec | None = None
        self.theta: am.Vec | None = None
        self.scal: dict[str, float] = {}
        self.tok: list[dict[str, torch.Tensor]] = []
        self.micro = 0
        self.kl_fit = 0  # micro-batches whose KL part was split off by the fit
        self.kl_unmodelled = 0  # micro-batches with a KL term that was not split (see unmodelled_kl_terms)
        self.kl_residual = 0.0  # largest relative residual of the KL fit
        self.kl_reason = ""


@register_instrument("grad_alignment")
class GradAlignment(Instrument):
    """Alignment G of each update (and of its positive / negative / KL parts and reweighting tertiles) with g_T."""

    changes_loss = False
    allow_fast = True
    """Use the one-backward row path (rowgrad.py) where it applies; False forces per-component backwards."""
    _needs_hidden = False
    _trainer = None
    algo = ""
    """The trainer's registered name, set in `_setup`."""

    @property
    def spec(self) -> TrainerSpec:
        """What the instrument knows about the trainer: its registered facts (never tests of its name)."""
        return trainer_spec(self.algo)

    @property
    def needs_hidden(self) -> bool:  # type: ignore[override]
        """Only logged loss forwards read `ctx.hidden`: on other steps the seam does not hook the backbone."""
        t = self._trainer
        return self._needs_hidden and (t is None or self._logged(int(t.state.global_step) + 1))

    @needs_hidden.setter
    def needs_hidden(self, value: bool) -> None:
        self._needs_hidden = bool(value)

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
        self.exact = None  # saves what the exact two-pass D' needs (rlx/alignment/exact.py)
        if getattr(getattr(cfg, "exact", None), "enabled", False):
            from rlx.alignment.exact import ExactSaver

            self.exact = ExactSaver(cfg, run)
        self.needs_hidden = self.variant == "activation"
        self.cur: _Step | None = None
        self.target: TargetBatch | None = None
        self.series: list[float] = []
        self.prev: deque = deque(maxlen=max(int(cfg.drift_lag), 1))
        self.params: list[torch.nn.Parameter] | None = None
        self._trainer = None
        self._hooks: list[Any] = []
        self.rowcap = None
        self.pending = []

    # ---- set-up -----------------------------------------------------------------------------------------

    def _setup(self, trainer: Any) -> None:
        if self.params is not None:
            return
        self._trainer = trainer
        if self.cfg.variant == "auto" and _is_zero(trainer):
            self.variant, self.needs_hidden = "activation", True
        model = trainer.accelerator.unwrap_model(trainer.model)
        # Scope: the policy's trainable parameters (LoRA adapters under PEFT); never a critic (PPO's value model).
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and not any(f"{c}." in n for c in EXCLUDED_MODULES)
        ]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        policy = unwrap_policy(model)
        n_layers = int(getattr(policy.config.get_text_config(), "num_hidden_layers", 0) or 0)
        self.groups = am.layer_groups(self.names, n_layers, int(self.cfg.layer_groups))
        self.sketch = None
        if int(self.cfg.sketch_dim) > 0 and self.variant == "param":
            self.sketch = CountSketch(
                [p.shape for p in self.params], int(self.cfg.sketch_dim), seed=int(self.run.cfg.seed)
            )
        self.algo = spec_of(
            trainer, default=self.run.cfg.algo
        ).name  # an unregistered trainer is an error here
        self.kl_unmodelled = unmodelled_kl_terms(trainer.args) if self.spec.kl_coef(trainer) != 0.0 else []
        self.kl_bias_correction = bool(getattr(trainer.args, "use_bias_correction_kl", False))
        self._rollout_steps = self.spec.steps_per_rollout(trainer.args)
        self.rowcap = None
        if self.variant == "param" and self.allow_fast and self.spec.row_fast_path:
            head = policy.get_output_embeddings()
            rowcap = RowCapture(policy, self.params, head)
            if rowcap.supported:
                self.rowcap = rowcap
                self.needs_hidden = rowcap.head_index is not None  # the fused head's input states
        self.pending: list[dict] = []

    def on_train_begin(self, trainer: Any) -> None:
        self._setup(trainer)
        # Read the optimizer's gradient complete (accumulated, all-reduced) and *before* clipping.
        if self.variant == "param" and not getattr(trainer, "_rlx_ga_wrapped", False):
            original = trainer._clip_grad_norm

            def clip_with_alignment(model, _orig=original):
                self._read_full_gradient(trainer)
                return _orig(model)

            trainer._clip_grad_norm = clip_with_alignment
            trainer._rlx_ga_wrapped = True
        if self.exact is not None:
            self.exact.attach(self, trainer)

    def on_step_begin(self, trainer: Any) -> None:
        # Hooks exist only during logged steps: a step that logs nothing runs with the model's hooks untouched.
        if self.rowcap is not None and not self._hooks and self._logged(int(trainer.state.global_step) + 1):
            self._arm_hooks(trainer)

    def _arm_hooks(self, trainer: Any) -> None:
        """Arm the per-layer captures for the loss forwards of this logged step (grad on, train mode)."""

        def arm(module, args, kwargs):
            step = int(trainer.state.global_step) + 1
            if self.rowcap is not None and module.training and torch.is_grad_enabled() and self._logged(step):
                self.rowcap.start()
                self.rowcap.attach()  # layer hooks exist only during logged loss forwards

        def disarm(module, args, kwargs, out):
            if self.rowcap is not None and self.rowcap.armed:
                self.rowcap.armed = False
                self.rowcap.detach()

        policy = self._policy(trainer)
        self._hooks = [
            policy.register_forward_pre_hook(arm, with_kwargs=True),
            policy.register_forward_hook(disarm, with_kwargs=True),
        ]

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _policy(self, trainer: Any) -> torch.nn.Module:
        return unwrap_policy(trainer.accelerator.unwrap_model(trainer.model))

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
        every, k = int(self.cfg.every), self._rollout_steps
        if k <= 1:
            return step == 1 or step % every == 0
        # Each rollout is reused for k optimizer steps (PPO: epochs x minibatches) and only the first (epoch 0,
        # minibatch 0) has rho = 1: log that step whenever (previous rollout start, step] holds a multiple of `every`.
        if (step - 1) % k != 0:
            return False
        return step == 1 or step // every > (step - k) // every

    _rollout_steps = 1
    """Optimizer steps per rollout (the spec's `steps_per_rollout`; PPO: ppo_epochs * num_minibatches), set in
    `_setup`."""

    def on_loss(self, ctx: LossContext) -> None:
        trainer = ctx.trainer
        if ctx.token_logps is None or not trainer.model.training or not torch.is_grad_enabled():
            return None
        self._setup(trainer)
        step = int(trainer.state.global_step) + 1
        if not self._logged(step):
            return None
        if self.cur is None or self.cur.step != step:
            self.cur = _Step(step)
            if self.target is None:
                self.target = self._build_target(ctx)
            policy = self._policy(trainer)
            if self.variant == "param":
                self.cur.gT, self.cur.R_T = target_gradient(policy, self.target, self.params)
            else:
                self.cur.gT_head, self.cur.R_T = target_head_gradient(
                    policy, policy.model if hasattr(policy, "model") else policy, self.target
                )
        self._process_pending()
        self.cur.micro += 1
        w, mask, w_kl = self._weights(ctx)
        if self.exact is not None:
            self.exact.on_micro(self, ctx, w)
        comps = am.component_weights(w, mask, w_kl)
        units = am.reweighting_units(self.spec.tertile_level, mask, self._pair_index(ctx))
        terts = am.tertile_weights(comps["pos"] + comps["neg"], units, _gather_scores if _dist() else None)
        for name, cw in {**comps, **terts}.items():
            self.cur.n_tokens[name] = self.cur.n_tokens.get(name, 0.0) + float((cw != 0).sum())
        self.cur.n_tokens["total"] = self.cur.n_tokens.get("total", 0.0) + float(mask.sum())
        if self.variant == "param":
            if not self._row_micro(ctx, w, mask, w_kl, comps, units):
                self._param_micro(ctx, comps, terts)
        else:
            self._activation_micro(ctx, comps, terts)
        if self.cfg.save_token_weights:
            sids = ctx.extras.get("sample_ids")  # GRPO/PPO: joins diagnostics/rollouts
            self.cur.tok.append(
                {
                    "w": w.detach().cpu(),
                    "mask": mask.detach().cpu(),
                    "w_kl": (w_kl if w_kl is not None else torch.zeros_like(w)).cpu(),
                    "sample_id": (sids if sids is not None else torch.full((w.shape[0],), -1)).long().cpu(),
                }
            )
        return None

    def _weights(self, ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """w_t of the loss the optimizer actually differentiates (times the Trainer's post-scale), mask, w_kl."""
        w = ctx.token_weights().float() * float(getattr(ctx, "post_scale", 1.0))
        mask = ctx.mask.float() if ctx.mask is not None else (w != 0).float()
        w_kl = None
        ref = ctx.extras.get("ref_logps")
        # A KL *loss term* (GRPO beta > 0) is a third component; PPO folds its KL penalty into the reward (in A_t).
        beta = self.spec.kl_coef(ctx.trainer)
        if ref is not None and beta != 0.0 and ctx.extras.get("advantages") is not None:
            if self.kl_unmodelled:  # not split: pos / neg keep the KL term's weight; rows say so (kl_split)
                self.cur.kl_unmodelled += 1
                self.cur.kl_reason = ", ".join(self.kl_unmodelled)
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
                bias_correction=self.kl_bias_correction,
                return_residual=True,
            )
            self.cur.kl_residual = max(self.cur.kl_residual, residual)
            if residual > KL_FIT_TOLERANCE:  # the loss is not the modelled form: leave the KL in pos / neg
                w_kl.zero_()
                self.cur.kl_unmodelled += 1
                self.cur.kl_reason = f"KL fit residual {residual:.2g}"
            else:
                self.cur.kl_fit += 1
        return w, mask, w_kl

    def _pair_index(self, ctx: LossContext) -> torch.Tensor | None:
        if "pair_index" in ctx.extras:
            return ctx.extras["pair_index"]
        B = ctx.token_logps.shape[0]
        return torch.arange(B) % max(B // 2, 1) if self.spec.tertile_level == "pair" else None

    def _param_micro(self, ctx: LossContext, comps: dict, terts: dict) -> None:
        cur, lp = self.cur, ctx.token_logps
        for name, cw in comps.items():
            g = am.weighted_grad(lp, self.params, cw)
            cur.vec[name] = am.add_(cur.vec.get(name), g)
        for name in (
            "top",
            "mid",
        ):  # bot follows by linearity at step end: G_bot = G_pos + G_neg - G_top - G_mid
            g = am.weighted_grad(lp, self.params, terts[name])
            cur.G[name] = cur.G.get(name, 0.0) + am.dot(cur.gT, g).item()

    def _row_micro(self, ctx, w, mask, w_kl, comps, units) -> bool:
        """Fast path: read per-row alignment off the trainer's own backward (rowgrad.py). False if not applicable."""
        cap = self.rowcap
        if (
            cap is None
            or w_kl is not None
            or self.run.cfg.regularizers.enabled
            or not cap.records
            or cap.complete()
        ):
            return False
        pos_rows = (comps["pos"] != 0).any(-1)
        neg_rows = (comps["neg"] != 0).any(-1)
        if (
            pos_rows & neg_rows
        ).any():  # a row with both signs (token-level advantages): not separable by rows
            return False
        tiers = am.token_tiers(comps["pos"] + comps["neg"], units, _gather_scores if _dist() else None)
        row_tier = tiers.max(-1).values
        head = None
        if cap.head_index is not None and not cap.head_called():
            policy = self._policy(ctx.trainer)
            emb = [r for r in cap.records if r[1] == "embedding"]
            ids = emb[0][4] if emb else self._sequence_ids(ctx)
            temp = self.spec.temperature(ctx.trainer)
            cfg = policy.config.get_text_config()
            scale = float(getattr(cfg, "logit_scale", None) or 1.0) / temp
            head = {
                "weight_index": cap.head_index,
                "hidden": ctx.hidden[:, :-1].detach() if ctx.hidden is not None else None,
                "labels": ids[:, 1:],
                "coef": (w * mask).detach(),
                "weight": cap.head.weight.detach(),
                "scale": scale,
            }
            if head["hidden"] is None:
                return False
        self.pending.append(
            {
                "records": cap.records,
                "pos": pos_rows,
                "neg": neg_rows,
                "tier": row_tier,
                "head": head,
                "cur": self.cur,
            }
        )
        cap.accept_grads = True  # the next backward through these activations is the trainer's own
        return True

    def _process_pending(self) -> None:
        while self.pending:
            job = self.pending.pop(0)
            cur = job["cur"]
            if not all(r[5] is not None for r in job["records"]):
                cur.failed = True
                continue
            # only the pos-row gradient is formed; neg = grad L - pos at step end (no other loss term on this path)
            subsets = {"pos": job["pos"]}
            cur.neg_from_total = True
            s, vecs = row_alignment(
                job["records"], cur.gT, subsets, len(self.params), [p.shape for p in self.params], job["head"]
            )
            for name in ("pos", "neg"):
                rows = job[name]
                cur.G[name] = cur.G.get(name, 0.0) + float(s[rows.to(s.device)].sum())
                if name not in vecs:
                    continue
                vec = [
                    torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                    for p, g in zip(self.params, vecs[name])
                ]
                cur.vec[name] = am.add_(cur.vec.get(name), vec)
            for i, name in enumerate(("top", "mid", "bot")):
                cur.G[name] = cur.G.get(name, 0.0) + float(s[(job["tier"] == i).to(s.device)].sum())

    def _activation_micro(self, ctx: LossContext, comps: dict, terts: dict) -> None:
        """Head-restricted G from activations only: no parameter autograd (ZeRO-2/3 safe)."""
        cur, trainer = self.cur, ctx.trainer
        policy = self._policy(trainer)
        ids = self._sequence_ids(ctx)
        head = policy.get_output_embeddings()
        temp = self.spec.temperature(trainer)
        h = ctx.hidden[:, :-1].detach()
        labels = ids[:, 1:]
        sel = ctx.mask > 0 if ctx.mask is not None else torch.ones_like(labels, dtype=torch.bool)
        with _gathered(head.weight):
            for name, cw in {**comps, **terts}.items():
                g = am.head_grad_from_activations(h[sel], head.weight, labels[sel], cw[sel], temp, head.bias)
                cur.G[name] = cur.G.get(name, 0.0) + float((g.double() * cur.gT_head.double()).sum())
                if name in comps:
                    cur.vec[name] = am.add_(cur.vec.get(name), [g])

    def _sequence_ids(self, ctx: LossContext) -> torch.Tensor:
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

    # ---- full gradient (before clipping) --------------------------------------------------------------------

    def _read_full_gradient(self, trainer: Any) -> None:
        self._process_pending()
        cur = self.cur
        if (
            cur is None
            or cur.total is not None
            or cur.step != int(trainer.state.global_step) + 1
            or cur.gT is None
        ):
            return
        cur.total = [
            p.grad.detach().float().clone()
            if p.grad is not None
            else torch.zeros_like(p, dtype=torch.float32)
            for p in self.params
        ]
        cur.theta = [p.detach().float().clone() for p in self.params]

    def on_pre_optimizer_step(self, trainer: Any) -> None:
        # Reached without clipping when max_grad_norm <= 0; then .grad is still the unclipped gradient.
        if self.variant == "param" and self.cur is not None and self.cur.total is None:
            if float(getattr(trainer.args, "max_grad_norm", 0) or 0) <= 0:
                self._read_full_gradient(trainer)
        self._process_pending()

    # ---- step end: realised alignment, reduction, records ---------------------------------------------------

    def on_step_end(self, trainer: Any) -> None:
        self._process_pending()
        self._remove_hooks()
        # The logged forward's layer inputs and output gradients (294 MB on the tiny recipe) are consumed by now:
        # never keep them through the steps that do not log.
        if self.rowcap is not None:
            self.rowcap.records = []
        cur = self.cur
        if cur is None or cur.step != int(trainer.state.global_step):
            return
        self.cur = None
        if self.exact is not None:  # after the update: the weights after it, the batch
            self.exact.on_step_end(self, cur)
        world = trainer.accelerator.num_processes
        rec: dict[str, float] = {}
        sk: dict[str, torch.Tensor] = {}
        if getattr(cur, "neg_from_total", False) and cur.total is not None and "pos" in cur.vec:
            cur.vec["neg"] = am.sub(cur.total, cur.vec["pos"])  # linear, so all-reduced sketches stay exact
        comp_names = [c for c in ("pos", "neg", "kl") if c in cur.vec]
        local = {f"n_{k}": v for k, v in cur.n_tokens.items()}
        local.update(n_kl_fit=cur.kl_fit, n_kl_unmodelled=cur.kl_unmodelled, kl_residual=cur.kl_residual)
        if self.variant == "param":
            gT = cur.gT
            for c in comp_names:
                local[f"G_{c}"] = cur.G[c] if c in cur.G else am.dot(gT, cur.vec[c]).item()
            for t in ("top", "mid", "bot"):
                if t in cur.G:
                    local[f"G_{t}"] = cur.G[t]
            local["G_pg"] = sum(local.get(f"G_{c}", 0.0) for c in ("pos", "neg"))
            local["sq_pos_neg"] = am.dot(cur.vec["pos"], cur.vec["neg"]).item()
            for c in comp_names:
                local[f"sq_{c}"] = am.sq_norm(cur.vec[c]).item()
            if self.sketch is not None or world > 1:
                sketcher = self.sketch or CountSketch(
                    [p.shape for p in self.params], 16384, int(self.run.cfg.seed)
                )
                for c in comp_names:
                    sk[c] = sketcher(cur.vec[c])
        else:
            for c in comp_names + ["top", "mid", "bot"]:
                local[f"G_{c}"] = cur.G.get(c, 0.0)
            local["sq_pos_neg"] = am.dot(cur.vec["pos"], cur.vec["neg"]).item()
            for c in comp_names:
                local[f"sq_{c}"] = am.sq_norm(cur.vec[c]).item()
            local["G_pg"] = local["G_pos"] + local["G_neg"]
            tot = am.add_(None, cur.vec["pos"])
            for c in comp_names[1:]:
                tot = am.add_(tot, cur.vec[c])
            local["sq_total"] = am.sq_norm(tot).item()
        keys = sorted(local)
        vals = torch.tensor([local[k] for k in keys], dtype=torch.float64)
        dist = _dist()
        if dist is not None:
            dev = trainer.accelerator.device
            t = vals.to(dev)
            dist.all_reduce(t)
            vals = t.cpu()
            for c in list(sk):
                s = sk[c].to(dev)
                dist.all_reduce(s)
                sk[c] = s.cpu() / world
        for k, v in zip(keys, vals.tolist()):
            rec[k] = v if k.startswith("n_") else v / world
        if dist is not None and self.variant == "param":
            # component norms of the globally averaged vectors: from the all-reduced sketches (estimates)
            for c in comp_names:
                rec[f"sq_{c}"] = float(sk[c].double().norm() ** 2)
            rec["sq_pos_neg"] = float(sk["pos"].double() @ sk["neg"].double())
        norm_source = "exact" if dist is None else ("sketch" if self.variant == "param" else "rank_mean")
        if self.variant == "param" and "G_bot" not in rec:
            rec["G_bot"] = rec["G_pg"] - rec["G_top"] - rec["G_mid"]
        if getattr(
            cur, "failed", False
        ):  # a capture missed its backward: components of this step are unknown
            for c in ("pos", "neg", "top", "mid", "bot"):
                rec[f"G_{c}"] = float("nan")
            if self.rowcap is not None:  # per-component backwards from now on
                self.rowcap.detach()
                self.rowcap = None
        rows = (
            self._rows_param(trainer, cur, rec, sk)
            if self.variant == "param"
            else self._rows_activation(cur, rec)
        )
        # kl_split: none (no KL loss term), fit (its part split off exactly), unmodelled (GRPO's loss is not the
        # form the split assumes: the KL term's weight stays in pos / neg, no kl row is trusted)
        kl_split = "unmodelled" if rec["n_kl_unmodelled"] else ("fit" if rec["n_kl_fit"] else "none")
        reason = cur.kl_reason or ("on another rank" if kl_split == "unmodelled" else "")
        if kl_split == "unmodelled" and self.run.is_main and not getattr(self, "_kl_warned", False):
            self._kl_warned = True
            print(
                f"warning: grad_alignment: the KL term is not split from the policy-gradient part ({reason}); "
                "its weight stays in pos/neg and the rows are marked kl_split=unmodelled "
                "(docs/gradient_alignment.md)",
                flush=True,
            )
        for r in rows:
            own = r["component"] in ("pos", "neg", "kl") or (
                self.variant == "activation" and r["component"] == "total"
            )
            r.setdefault("norm_source", norm_source if own else "exact")
            r["kl_split"], r["kl_split_reason"] = kl_split, reason
            r["kl_fit_residual"] = rec["kl_residual"] if kl_split != "none" else float("nan")
        self._emit(trainer, cur, rows, sk)

    def _rows_param(self, trainer: Any, cur: _Step, rec: dict, sk: dict) -> list[dict]:
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
        base = {
            "step": cur.step,
            "target": self.target.name,
            "variant": "param",
            "norm_target": math.sqrt(sq_T),
            "R_T": cur.R_T,
        }
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
            dR = target_nll(self._policy(trainer), self.target) - cur.R_T
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

    def _rows_activation(self, cur: _Step, rec: dict) -> list[dict]:
        sq_T = float((cur.gT_head.double() ** 2).sum())
        base = {
            "step": cur.step,
            "target": self.target.name,
            "variant": "activation",
            "norm_target": math.sqrt(sq_T),
            "R_T": cur.R_T,
        }
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

    def _emit(self, trainer: Any, cur: _Step, rows: list[dict], sk: dict) -> None:
        total_row = next(r for r in rows if r["component"] == "total")
        self.series.append(total_row["G"])
        metrics = {f"G_{r['component'].replace('layer:', 'layer_')}": r["G"] for r in rows}
        metrics.update(
            {
                f"cos_{r['component']}": r["cos"]
                for r in rows
                if r["component"] in ("total", "pos", "neg", "kl", "update")
            }
        )
        metrics.update(
            {
                f"norm_{r['component']}": r["norm"]
                for r in rows
                if r["component"] in ("total", "pos", "neg", "kl", "update")
            }
        )
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
        store = getattr(trainer, "_metrics", None)
        if store is not None:
            for k, v in metrics.items():
                if v is not None and math.isfinite(v):
                    store["train"][f"grad_align/{k}"].append(float(v))
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
            B = max(t["w"].shape[1] for t in cur.tok)
            pad = lambda x: torch.nn.functional.pad(x, (0, B - x.shape[1]))  # noqa: E731
            w.write(
                dumps.GRAD_ALIGNMENT_TOKENS,
                {
                    **{k: torch.cat([pad(t[k]) for t in cur.tok]) for k in ("w", "w_kl", "mask")},
                    "sample_id": torch.cat([t["sample_id"] for t in cur.tok]),
                },
                step=cur.step,
                metadata={"step": str(cur.step)},
            )

    def on_train_end(self, trainer: Any) -> None:
        if self.exact is not None:
            self.exact.detach()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.rowcap is not None:
            self.rowcap.detach()
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


class _gathered:
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
