"""SFT: TRL's SFTTrainer with the rlx instrument seam (the supervised control run for gradient alignment)."""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from rlx.trainers.common import InstrumentedMixin, bind


class RLXSFTTrainer(InstrumentedMixin, SFTTrainer):
    rlx_algo = "sft"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        compute = bind(super().compute_loss, model, inputs, return_outputs, num_items_in_batch)
        return self._instrumented(compute, model, inputs, num_items_in_batch)


def build_sft_trainer(cfg: Any, run: Any, model_dir: str, task: Any, common: dict[str, Any]) -> RLXSFTTrainer:
    """`algo: sft`: supervised on the task's verified reference solutions."""
    from rlx.models import load_causal_lm
    from rlx.trainers.construction import make_trainer_config

    args = make_trainer_config(cfg, run, task)
    train = task.train_dataset()
    sft_ds = train.map(
        lambda r: {"prompt": r["prompt"], "completion": r["solution"]}, remove_columns=train.column_names
    )
    return RLXSFTTrainer(model=load_causal_lm(model_dir, cfg), args=args, train_dataset=sft_ds, **common)
