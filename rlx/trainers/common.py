"""What every rlx trainer shares: the instrument seam, metrics.jsonl, exact-resume state."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from rlx import checkpoint as ckpt
from rlx.errors import UserError
from rlx.instruments.base import InstrumentSet, LossContext, capture_loss_forward, log_metrics
from rlx.trainers.catalog import trainer_spec
from rlx.trainers.deepspeed_hooks import inert_output_hooks, track_output_hooks
from rlx.trainers.registry import TrainerSpec


class InstrumentCallback(TrainerCallback):
    """Forwards Trainer events to the instruments (callbacks do not receive the trainer; we keep it)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        self.trainer.instruments.call("on_train_begin", self.trainer)

    def on_step_begin(self, args, state, control, **kw):
        self.trainer.instruments.call("on_step_begin", self.trainer)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.trainer.instruments.call("on_pre_optimizer_step", self.trainer)
        guard = getattr(self.trainer, "rlx_guard", None)
        if guard is not None:
            guard.check_gradients(self.trainer)

    def on_step_end(self, args, state, control, **kw):
        self.trainer.instruments.call("on_step_end", self.trainer)

    def on_train_end(self, args, state, control, **kw):
        self.trainer.instruments.call("on_train_end", self.trainer)


class MetricsJsonlCallback(TrainerCallback):
    """Appends one JSON object per logging step to `<run_dir>/metrics.jsonl`: `step` plus every logged metric.

    HF's closing summary of a `train()` call (`train_runtime`, `train_loss`, ...) is not a step: it is kept in
    `summary` (rlx/train.py writes it to run_info.json) so each step has one row.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.summary: dict[str, Any] | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step}
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, (int, float, str, bool)) or v is None:
                row[k] = v
        if "train_runtime" in row:
            self.summary = row
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        ckpt.fault_point("after_log", state.global_step)


class InstrumentedMixin:
    """Mix in before a TRL trainer class. Wraps the loss computation with the instrument seam.

    Subclasses route their loss method through `self._instrumented(compute, model, inputs)` and may
    override `_loss_extras` and `_scales`. With no instrument enabled the loss path is untouched.
    """

    rlx_algo: ClassVar[str] = ""
    """The name this trainer is registered under (rlx/trainers/catalog.py)."""

    @property
    def rlx_spec(self) -> TrainerSpec:
        """The registered facts about this trainer that instruments read (rlx/trainers/registry.py)."""
        return trainer_spec(self.rlx_algo)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_clip_grad_norm" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides _clip_grad_norm, which fires the instruments' on_before_clip: override "
                "_clip_gradients instead (rlx/trainers/common.py)."
            )

    def __init__(
        self, *args, instruments: InstrumentSet | None = None, run: Any = None, guard: Any = None, **kwargs
    ):
        self.instruments = instruments or InstrumentSet([])
        self.rlx_run = run
        self.rlx_guard = guard
        super().__init__(*args, **kwargs)
        self.add_callback(InstrumentCallback(self))
        if guard is not None:
            self.add_callback(guard)

    # -- exact resume: what rlx adds to HF's checkpoints -----------------------------------------------
    def _rlx_trainer_state(self) -> dict[str, Any]:
        """Trainer-owned state HF does not checkpoint (subclasses extend: rollout buffer, KL controller...).

        Here: TRL's running token count behind the logged `num_tokens` (SFT/DPO keep it outside HF's state).
        """
        return {"total_train_tokens": getattr(self, "_total_train_tokens", None)}

    def _rlx_load_trainer_state(self, state: dict[str, Any]) -> None:
        if state.get("total_train_tokens") is not None:
            self._total_train_tokens = state["total_train_tokens"]

    def _save_checkpoint(self, model, trial):
        """HF's checkpoint, then rlx's state per rank, the run's metrics/diagnostics snapshot, and the marker.

        Old checkpoints are rotated only after the new one is complete, so a kill mid-save always leaves one.
        """
        from transformers.trainer_utils import rotate_checkpoints

        self.instruments.flush()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = Path(self._get_output_dir(trial=trial))
        step = int(self.state.global_step)
        folder = run_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        acc = self.accelerator
        state = {
            "step": step,
            "world_size": acc.num_processes,
            "instruments": self.instruments.state_dict(),
            "trainer": self._rlx_trainer_state(),
        }
        torch.save(state, ckpt.state_file(folder, acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.fault_point("in_checkpoint", step)
            ckpt.snapshot_run_files(run_dir, folder, step)
            ckpt.write_marker(folder, step, acc.num_processes)
            ckpt.fault_point("after_checkpoint", step)
            if limit:
                rotate_checkpoints(
                    output_dir=str(run_dir),
                    save_total_limit=limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=True,
                )
        acc.wait_for_everyone()

    def rlx_load_checkpoint_state(self, checkpoint: str | Path) -> None:
        """Restore rlx's part of `checkpoint` on this rank (HF restores its own part inside `train`)."""
        acc = self.accelerator
        info = ckpt.read_marker(Path(checkpoint))
        if int(info["world_size"]) != acc.num_processes:
            raise UserError(
                f"{checkpoint} was written by {info['world_size']} processes; this launch has {acc.num_processes}. "
                f"An exact resume needs the same number of processes: relaunch with {info['world_size']}."
            )
        state = torch.load(
            ckpt.state_file(checkpoint, acc.process_index), map_location="cpu", weights_only=False
        )
        try:
            self.instruments.load_state_dict(state["instruments"])
        except ValueError as e:
            raise UserError(
                f"cannot resume from {checkpoint}: {e}. Resume with the run's own config."
            ) from None
        self._rlx_load_trainer_state(state["trainer"])

    def train(self, *args, **kwargs):
        """TRL's `train`; the instruments' hooks are removed when it ends, however it ends (`Instrument.close`)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.instruments.close()

    def _clip_grad_norm(self, model):
        """The Trainer calls this between the step's last backward and the optimizer step, when it clips: the
        gradient is complete and not yet clipped, which is what `on_before_clip` hands the instruments."""
        self.instruments.call("on_before_clip", self)
        return self._clip_gradients(model)

    def _clip_gradients(self, model):
        """Clip and return the pre-clip norm (the Trainer's own clip). Subclasses that clip differently override this."""
        return super()._clip_grad_norm(model)

    # -- hooks for subclasses ------------------------------------------------------------------------
    def _loss_extras(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _scales(self, num_items_in_batch=None) -> tuple[float, float]:
        """(loss_scale for extra terms, post_scale the Trainer applies) following Trainer.training_step."""
        if not self.model.training:
            return 1.0, 1.0
        ga = self.current_gradient_accumulation_steps
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return (1.0 / ga, 1.0) if scaled else (1.0, 1.0 / ga)

    # -- the seam ------------------------------------------------------------------------------------
    def _instrumented(self, compute, model, inputs, num_items_in_batch=None):
        if not self.instruments:
            return compute()
        if getattr(self, "is_deepspeed_enabled", False):
            track_output_hooks()  # so that instruments' autograd.grad below does not start ZeRO's backward
        taps = self.instruments.taps(model)
        with capture_loss_forward(model, hidden=self.instruments.needs_hidden, taps=taps) as cap:
            out = compute()
        loss = out[0] if isinstance(out, tuple) else out
        loss_scale, post_scale = self._scales(num_items_in_batch)
        ctx = LossContext(
            trainer=self,
            algo=self.rlx_algo,
            spec=self.rlx_spec,
            inputs=inputs,
            loss=loss,
            token_logps=cap.token_logps,
            mask=cap.label_mask,
            hidden=cap.hidden,
            entropy=cap.entropy,
            loss_scale=loss_scale,
            post_scale=post_scale,
            extras=self._loss_extras(inputs),
            taps=cap.taps,
        )
        with inert_output_hooks():
            loss, metrics = self.instruments.on_loss(ctx)
        log_metrics(self, metrics)  # the mean over ranks, into TRL's _metrics
        return (loss, *out[1:]) if isinstance(out, tuple) else loss


def bind(method, *args, **kwargs):
    return partial(method, *args, **kwargs)
