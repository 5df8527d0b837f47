"""Divergence guard: stop a run that has diverged or collapsed, with exit code 3 and a checkpoint.

Two checks, trainer-independent (a `TrainerCallback` every rlx trainer installs):

- **non-finite gradient**, before the optimizer step: the update is not applied, so the weights that get
  checkpointed are the last finite ones;
- **non-finite weights**, after the optimizer step (a finite gradient times a huge learning rate): the
  weights in memory are lost, so nothing is checkpointed and the message names the last complete checkpoint;
- **collapse**, on logged metrics: for `collapse_steps` consecutive logged steps, the mean token entropy at
  its uniform maximum (>= `entropy_fraction` * ln |V|), or every reward function returning NaN.

Either raises `Diverged` (exit code 3); `rlx/train.py` writes the checkpoint (unless `guard.checkpoint=false`)
and exits. A non-finite *loss* shows up as a non-finite gradient, which is why the loss (which HF filters
out of its logs) is not checked on its own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from rlx.errors import Diverged

__all__ = ["Diverged", "DivergenceGuard"]


def _entropy_at_max(entropy: float, vocab_size: int, fraction: float) -> bool:
    return vocab_size > 1 and entropy >= fraction * math.log(vocab_size)


def _all_rewards_nan(logs: dict[str, Any]) -> bool:
    means = [v for k, v in logs.items() if k.startswith("rewards/") and k.endswith("/mean")]
    return bool(means) and all(isinstance(v, float) and math.isnan(v) for v in means)


def last_checkpoint(run_dir: Any) -> str:
    """One sentence naming the run's last complete checkpoint, for messages about weights not worth saving."""
    from rlx.checkpoint import complete_checkpoints

    done = complete_checkpoints(run_dir)
    if not done:
        return "No checkpoint was written before it."
    return f"The last complete checkpoint is {done[-1][1]}."


def sampling_diverged(e: RuntimeError, step: int, run_dir: Any) -> Diverged | None:
    """torch's multinomial error on NaN/inf probabilities, as the divergence it is (finite but exploded weights)."""
    if "probability tensor contains either" not in str(e):
        return None
    return Diverged(
        f"diverged at step {step + 1}: sampling met non-finite probabilities (the weights have exploded). "
        f"Lower trainer.learning_rate. {last_checkpoint(run_dir)}",
        step,
        checkpoint=False,
    )


class DivergenceGuard(TrainerCallback):
    """See the module docstring; `cfg` is the run's `guard` section, `vocab_size` the policy's."""

    def __init__(self, cfg: Any, vocab_size: int):
        self.cfg = cfg
        self.vocab_size = int(vocab_size)
        self.streak: dict[str, int] = {"entropy": 0, "rewards": 0}

    def check_gradients(self, trainer: Any) -> None:
        """Called by the instrument callback before `optimizer.step` (gradients all-reduced)."""
        if not self.cfg.nonfinite or getattr(trainer, "is_deepspeed_enabled", False):
            return  # under DeepSpeed the engine has already stepped here; collapse checks still apply
        total = torch.zeros((), dtype=torch.float64)
        sharded = False
        for p in trainer.model.parameters():
            if p.grad is not None:
                g = p.grad.detach()
                if hasattr(g, "to_local"):  # FSDP2: a DTensor, of which this rank holds one shard
                    g, sharded = g.to_local(), True
                total += g.float().pow(2).sum().double().cpu()
        if sharded:  # every rank must reach the same verdict (a collective the others would wait on)
            total = _sum_over_ranks(total)
        if not torch.isfinite(total):
            step = int(trainer.state.global_step) + 1
            raise Diverged(
                f"diverged at step {step}: the gradient is not finite (grad_norm = {total.sqrt().item()}); "
                f"the update was not applied. Lower trainer.learning_rate or check the reward and the data.",
                step - 1,
            )

    def on_step_end(self, args, state, control, model=None, **kw):
        if not self.cfg.nonfinite or model is None:
            return
        # under ZeRO-3 each rank checks its own partition (ds_tensor), under FSDP2 its shard; else the full parameter
        bad = next(
            (n for n, p in model.named_parameters() if not torch.isfinite(_local(p)).all()),
            None,
        )
        if any(hasattr(p, "to_local") for p in model.parameters()):  # FSDP2: the same verdict on every rank
            flags = _sum_over_ranks(torch.tensor(float(bad is not None), dtype=torch.float64))
            bad = bad or ("a parameter sharded on another rank" if flags > 0 else None)
        if bad is not None:
            raise Diverged(
                f"diverged at step {state.global_step}: the update made the weights non-finite ({bad}). "
                f"Lower trainer.learning_rate. {last_checkpoint(args.output_dir)}",
                int(state.global_step),
                checkpoint=False,
            )

    def on_log(self, args, state, control, logs=None, **kw):
        k = int(self.cfg.collapse_steps)
        if not logs or k <= 0:
            return
        step = int(state.global_step)
        checks = {}  # only the metrics this log row carries (an eval/* row says nothing about training)
        if "entropy" in logs:
            checks["entropy"] = _entropy_at_max(
                float(logs["entropy"]), self.vocab_size, self.cfg.entropy_fraction
            )
        if any(k.startswith("rewards/") and k.endswith("/mean") for k in logs):
            checks["rewards"] = _all_rewards_nan(logs)
        for name, hit in checks.items():
            self.streak[name] = self.streak[name] + 1 if hit else 0
        if self.streak["entropy"] >= k:
            raise Diverged(
                f"collapsed at step {step}: mean token entropy {float(logs['entropy']):.4f} has been at its uniform "
                f"maximum ln|V| = {math.log(self.vocab_size):.4f} for {k} logged steps (guard.collapse_steps). "
                "Lower trainer.learning_rate; guard.enabled=false turns this check off.",
                step,
            )
        if self.streak["rewards"] >= k:
            raise Diverged(
                f"collapsed at step {step}: every reward function returned NaN for {k} logged steps "
                "(rewards/*/mean). Check the reward functions and the completions they receive.",
                step,
            )


def _local(p: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: ZeRO-3's partition, FSDP2's shard (DTensor), or the whole parameter."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    on_gpu = dist.get_backend() == "nccl"
    y = x.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(y)
    return y.cpu()
