"""GRPO: TRL's GRPOTrainer with the rlx instrument seam (two small overrides, no copied bodies)."""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from rlx.trainers.common import InstrumentedMixin, bind


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
