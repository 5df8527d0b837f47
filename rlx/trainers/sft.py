"""SFT: TRL's SFTTrainer with the rlx instrument seam (the supervised control run for gradient alignment)."""

from __future__ import annotations

from trl import SFTTrainer

from rlx.trainers.common import InstrumentedMixin, bind


class RLXSFTTrainer(InstrumentedMixin, SFTTrainer):
    rlx_algo = "sft"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        compute = bind(super().compute_loss, model, inputs, return_outputs, num_items_in_batch)
        return self._instrumented(compute, model, inputs, num_items_in_batch)
