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


def build_dpo_trainer(cfg: Any, run: Any, model_dir: str, task: Any, common: dict[str, Any]) -> RLXDPOTrainer:
    """`algo: dpo`: policy and an explicit reference (ZeRO-3 safe), preference pairs from the task."""
    from rlx.models import load_causal_lm
    from rlx.trainers.construction import make_trainer_config

    args = make_trainer_config(cfg, run, task)
    policy = load_causal_lm(model_dir, cfg)
    train_ds, eval_ds = preference_datasets(cfg, task, policy, common["processing_class"])
    ref = None if cfg.model.lora.enabled else load_causal_lm(model_dir, cfg)
    trainer = RLXDPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds, **common
    )
    if not task.preference_pairs and cfg.diagnostics.rollouts.enabled:  # pairs rlx sampled
        trainer.add_callback(PreferencePairsDump({"train": train_ds, "eval": eval_ds}, run))
    return trainer


def preference_datasets(cfg: Any, task: Any, policy: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Train/held-out preference pairs: the task's own when it serves pairs, else sampled from the policy and
    verified against the task (rlx/preference.py)."""
    if task.preference_pairs:
        return task.train_dataset(), task.eval_dataset()
    from accelerate import PartialState
    from omegaconf import OmegaConf

    from rlx.preference import build_preference_pairs

    state = PartialState()
    with state.main_process_first():  # sampling is deterministic per seed; rank 0 first only for tidy logs
        train = build_preference_pairs(
            policy, tokenizer, task, cfg.preference, "train", cfg.seed, state.is_main_process
        )
        heldout_cfg = OmegaConf.merge(cfg.preference, {"num_pairs": min(64, cfg.task.num_eval)})
        heldout = build_preference_pairs(policy, tokenizer, task, heldout_cfg, "eval", cfg.seed + 1, False)
    return train, heldout
