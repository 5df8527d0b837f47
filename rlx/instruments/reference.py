"""Reference-policy log-probs on demand, for the adaptive KL of ReLaX.

The adaptive KL only touches trajectories with A > 0 and DSD > xi, so the reference pass is run on those
rows only, and skipped when there are none (the common case early in training). TRL's GRPO computes
reference log-probs for every row, and only when trainer.beta != 0; when it did (`ref_logps` in the seam
extras) those are used instead.

The reference is the initial policy: with PEFT the policy with its adapters disabled, otherwise the model
re-loaded from `config._name_or_path` (the directory the run started from, also right after a resume) with the
policy's dtype and attention implementation.

Under DeepSpeed ZeRO-3 the reference is a whole, frozen copy on every rank, loaded outside `zero.Init` and never
handed to DeepSpeed. Each rank scores only its own masked rows, often none, so a partitioned reference (whose
forward is a collective every rank must join) would wait forever for ranks that had nothing to score. The cost
is one unpartitioned copy of the model per rank; with `trainer.beta > 0` TRL's partitioned reference is used.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rlx.instruments.base import unwrap_policy


class LazyReference:
    """Loads the reference on first use and scores completion tokens of chosen rows."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def _peft(self, trainer: Any):
        model = trainer.model
        while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        return model if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model") else None

    def _load(self, policy: torch.nn.Module) -> torch.nn.Module:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            from rlx.models import outside_zero3_init

            path = policy.config._name_or_path
            with outside_zero3_init():
                ref = AutoModelForCausalLM.from_pretrained(
                    path,
                    dtype=policy.dtype,
                    attn_implementation=policy.config._attn_implementation,
                    # the policy runs custom code only when the user allowed it (model.trust_remote_code)
                    trust_remote_code=type(policy).__module__.startswith("transformers_modules"),
                )
            self.model = ref.to(policy.device).eval().requires_grad_(False)
        return self.model

    @torch.no_grad()
    def logps(self, trainer: Any, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), C) log pi_ref of the completion tokens of `rows`, at the trainer's temperature."""
        p = inputs["prompt_ids"].shape[1]
        comp = inputs["completion_ids"][rows]
        ids = torch.cat([inputs["prompt_ids"][rows], comp], 1)
        att = torch.cat([inputs["prompt_mask"][rows], inputs["completion_mask"][rows]], 1)
        peft = self._peft(trainer)
        if peft is not None:
            model, ctx = peft, peft.disable_adapter()
        else:
            model, ctx = self._load(unwrap_policy(trainer.model)), contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=ids, attention_mask=att).logits[:, p - 1 : -1].float()
        temperature = float(getattr(trainer, "temperature", 1.0) or 1.0)
        logp = torch.log_softmax(logits / temperature, -1)
        return logp.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
