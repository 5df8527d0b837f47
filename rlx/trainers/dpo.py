"""DPO: TRL's DPOTrainer with the rlx instrument seam.

The batch is [prompt+chosen ...; prompt+rejected ...] in one forward, so `token_logps` rows 0..B-1 are
the chosen responses and rows B..2B-1 the rejected ones (extras["pair_index"]).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from rlx import dumps
from rlx.trainers.common import InstrumentedMixin, bind


class RLXDPOTrainer(InstrumentedMixin, DPOTrainer):
    rlx_algo = "dpo"

    def _loss_extras(self, inputs):
        n = inputs["input_ids"].size(0) // 2
        idx = torch.arange(n, device=inputs["input_ids"].device)
        return {"pair_index": torch.cat([idx, idx]), "is_chosen": torch.cat([idx >= 0, idx < 0])}

    def _compute_loss(self, model, inputs, return_outputs=False):
        return self._instrumented(bind(super()._compute_loss, model, inputs, return_outputs), model, inputs)


class PreferencePairsDump(TrainerCallback):
    """Writes the preference pairs rlx sampled and verified (`diagnostics/rollouts/preference_pairs.parquet`) when
    a fresh run starts: prompt, chosen, rejected and where each came from, which is also its verification
    (chosen: a policy sample verified correct, or the reference solution; rejected: a policy sample verified
    wrong, or a corruption of the solution), for the train and held-out pairs."""

    def __init__(self, pairs: dict[str, Any], run: Any):
        self.pairs, self.run = pairs, run

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step > 0 or not state.is_world_process_zero or self.run.writer is None:
            return
        rows = []
        for split, ds in self.pairs.items():
            for i, r in enumerate(ds):
                rows.append(
                    {
                        "split": split,
                        "pair_index": i,
                        "prompt": str(r["prompt"]),
                        "chosen": str(r["chosen"]),
                        "rejected": str(r["rejected"]),
                        "chosen_source": r.get("chosen_source"),
                        "rejected_source": r.get("rejected_source"),
                    }
                )
        self.run.writer.write(dumps.PREFERENCE_PAIRS, rows)
