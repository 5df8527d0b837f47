"""GRPO: TRL's GRPOTrainer with the rlx instrument seam (two small overrides, no copied bodies)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from trl import GRPOTrainer

from rlx.trainers.common import InstrumentedMixin, bind


@contextlib.contextmanager
def preloaded_reference(ref_model: torch.nn.Module | None) -> Iterator[None]:
    """While a GRPOTrainer is constructed, hand it `ref_model` as its reference (no-op when None).

    GRPOTrainer has no `ref_model` argument: with beta != 0 it builds the reference with
    `create_model_from_path`, which under ZeRO-3 runs under `zero.Init` and fails on CPU (research/stack.md
    §6). Pass the policy as a model instance so this is the only call; raises if TRL never asked for it.
    """
    if ref_model is None:
        yield
        return
    import trl.trainer.grpo_trainer as grpo_module

    original, asked = grpo_module.create_model_from_path, []

    def reference(model_id, *args, **kwargs):
        asked.append(model_id)
        return ref_model

    grpo_module.create_model_from_path = reference
    try:
        yield
    finally:
        grpo_module.create_model_from_path = original
    if len(asked) != 1:
        raise RuntimeError(
            f"expected GRPOTrainer to build its reference model once, it asked {len(asked)} times"
        )


class RLXGRPOTrainer(InstrumentedMixin, GRPOTrainer):
    rlx_algo = "grpo"

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        # Tag each completion with its prompt group before TRL shuffles and splits the generation batch.
        n = batch["completion_ids"].size(0)
        start = self.accelerator.process_index * n
        batch["rlx_group_ids"] = (
            torch.arange(start, start + n, device=batch["completion_ids"].device) // self.num_generations
        )
        return batch

    def _loss_extras(self, inputs):
        return {
            "advantages": inputs["advantages"],
            "old_logps": inputs.get("old_per_token_logps"),
            "ref_logps": inputs.get("ref_per_token_logps"),
            "group_ids": inputs.get("rlx_group_ids"),
            "completion_len": inputs["completion_ids"].size(1),
        }

    def _compute_loss(self, model, inputs):
        return self._instrumented(bind(super()._compute_loss, model, inputs), model, inputs)
