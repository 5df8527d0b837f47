"""DPO: TRL's DPOTrainer with the rlx instrument seam.

The batch is [prompt+chosen ...; prompt+rejected ...] in one forward, so `token_logps` rows 0..B-1 are
the chosen responses and rows B..2B-1 the rejected ones (extras["pair_index"]).
"""

from __future__ import annotations

import torch
from trl import DPOTrainer

from rlx.trainers.common import InstrumentedMixin, bind


class RLXDPOTrainer(InstrumentedMixin, DPOTrainer):
    rlx_algo = "dpo"

    def _loss_extras(self, inputs):
        n = inputs["input_ids"].size(0) // 2
        idx = torch.arange(n, device=inputs["input_ids"].device)
        return {"pair_index": torch.cat([idx, idx]), "is_chosen": torch.cat([idx >= 0, idx < 0])}

    def _compute_loss(self, model, inputs, return_outputs=False):
        return self._instrumented(bind(super()._compute_loss, model, inputs, return_outputs), model, inputs)
