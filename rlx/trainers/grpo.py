"""GRPO: TRL's GRPOTrainer with the rlx instrument seam (two small overrides, no copied bodies)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from rlx.trainers.common import InstrumentedMixin, bind


@contextlib.contextmanager
def preloaded_reference(ref_model: torch.nn.Module | None) -> Iterator[None]:
    """While a GRPOTrainer is constructed, hand it `ref_model` as its reference (no-op when None).

    GRPOTrainer has no `ref_model` argument: with beta != 0 it builds the reference with
    `create_model_from_path`, which under ZeRO-3 runs under `zero.Init` and fails on CPU (a DeepSpeed
    batch-size assertion, docs/distributed.md). Pass the policy as a model instance so this is the only call; raises if TRL never asked for it.
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


class ResumableRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler whose epoch-e order is a function of (seed, e), so a resumed run sees the same order.

    TRL draws each epoch's permutation from one generator seeded once; a resumed run would restart it at the
    first permutation. Here epoch e re-seeds and draws e + 1 permutations (the same sequence TRL produces).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def __iter__(self):
        if self.shuffle:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            for _ in range(self.epoch):
                torch.randperm(self.num_samples, generator=self.generator)
        self.epoch += 1
        return super().__iter__()


class RLXGRPOTrainer(InstrumentedMixin, GRPOTrainer):
    rlx_algo = "grpo"

    def _get_train_sampler(self, dataset=None):
        s = super()._get_train_sampler(dataset)
        self._rlx_sampler = ResumableRepeatSampler(
            data_source=s.data_source,
            mini_repeat_count=s.mini_repeat_count,
            batch_size=s.batch_size,
            repeat_count=s.repeat_count,
            shuffle=s.shuffle,
            seed=s.seed,
        )
        return self._rlx_sampler

    def _init_training_state(self, *args, **kwargs):
        epochs_trained, steps_in_epoch = super()._init_training_state(*args, **kwargs)
        sampler = getattr(self, "_rlx_sampler", None)
        if sampler is not None:
            sampler.epoch = epochs_trained  # the next iter() starts the epoch being resumed
        return epochs_trained, steps_in_epoch

    def _rlx_trainer_state(self):
        """The rollout buffer TRL reuses across `steps_per_generation * num_iterations` micro-steps, and its counter."""
        buf = self._buffered_inputs
        to_cpu = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return {
            **super()._rlx_trainer_state(),
            "micro_step": self._step,
            "rollout_round": getattr(self, "_rlx_round", 0),
            "buffered_inputs": None if buf is None else [{k: to_cpu(v) for k, v in b.items()} for b in buf],
        }

    def _rlx_load_trainer_state(self, state):
        super()._rlx_load_trainer_state(state)
        self._step = int(state["micro_step"])
        self._rlx_round = int(state.get("rollout_round", 0))
        buf = state["buffered_inputs"]
        dev = self.accelerator.device
        to_dev = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
        self._buffered_inputs = None if buf is None else [{k: to_dev(v) for k, v in b.items()} for b in buf]

    def _generate_and_score_completions(self, inputs):
        from rlx.instruments.rollouts import sample_ids

        batch = super()._generate_and_score_completions(inputs)
        # Tag each completion with its prompt group and a run-wide sample id before TRL shuffles and splits
        # the generation batch.
        n, rank = batch["completion_ids"].size(0), self.accelerator.process_index
        dev = batch["completion_ids"].device
        batch["rlx_group_ids"] = torch.arange(rank * n, rank * n + n, device=dev) // self.num_generations
        round_ = getattr(self, "_rlx_round", 0)
        batch["rlx_sample_ids"] = sample_ids(round_, rank, n, dev)
        gathered = getattr(self, "_rlx_rewards_per_func", None)
        if (
            gathered is not None
        ):  # the weighted task reward of each local completion (NaN where no function scored)
            local = gathered[rank * n : rank * n + n].float()
            w = self.reward_weights.to(local.device).float()
            total = (local * w.unsqueeze(0)).nansum(dim=1)
            batch["rlx_rewards"] = torch.where(torch.isnan(local).all(dim=1), torch.nan, total).to(dev)
        self._rlx_round = round_ + 1
        self._rlx_pending_rollout = (round_, batch)  # dumped once subclasses have finished the batch
        return batch

    def _calculate_rewards(self, *args, **kwargs):
        rewards = super()._calculate_rewards(*args, **kwargs)
        self._rlx_rewards_per_func = rewards  # gathered over ranks: (world * n, num_reward_funcs)
        return rewards

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        pending, self._rlx_pending_rollout = getattr(self, "_rlx_pending_rollout", None), None
        if pending is not None:
            self._rlx_dump_rollout(*pending)
        return inputs

    def _rlx_dump_rollout(self, round_: int, batch: dict) -> None:
        from rlx import dumps
        from rlx.instruments import rollouts

        run = getattr(self, "rlx_run", None)
        cfg = None if run is None or run.cfg is None else run.cfg.diagnostics.rollouts
        if cfg is None or not cfg.enabled or run.writer is None or round_ % cfg.every:
            return
        keep = rollouts.kept(batch["rlx_sample_ids"], cfg.fraction, self.args.seed)
        n, rank = batch["completion_ids"].size(0), self.accelerator.process_index
        gathered = getattr(self, "_rlx_rewards_per_func", None)
        local = None if gathered is None else gathered[rank * n : rank * n + n]
        rows = rollouts.rollout_rows(
            batch,
            self.processing_class,
            local,
            list(self.reward_func_names),
            getattr(self, "reward_weights", None),
            round_=round_,
            step=int(self.state.global_step) + 1,
            rank=rank,
            keep=keep,
        )
        if rows:
            run.writer.write(dumps.ROLLOUTS, rows, round=round_)

    def _loss_extras(self, inputs):
        return {
            "advantages": inputs["advantages"],
            "old_logps": inputs.get("old_per_token_logps"),
            "ref_logps": inputs.get("ref_per_token_logps"),
            "group_ids": inputs.get("rlx_group_ids"),
            "sample_ids": inputs.get("rlx_sample_ids"),
            "rewards": inputs.get("rlx_rewards"),
            "completion_len": inputs["completion_ids"].size(1),
        }

    def _compute_loss(self, model, inputs):
        return self._instrumented(bind(super()._compute_loss, model, inputs), model, inputs)


def build_grpo_trainer(
    cfg: Any,
    run: Any,
    model_dir: str,
    task: Any,
    common: dict[str, Any],
    trainer_class: type[RLXGRPOTrainer] = RLXGRPOTrainer,
) -> RLXGRPOTrainer:
    """`algo: grpo`: policy and TRL's reference loaded by rlx, the task's prompts and reward functions (trainers that
    only change GRPO's advantage build through this with their own `trainer_class`)."""
    from rlx.models import load_causal_lm
    from rlx.trainers.construction import grpo_needs_reference, make_trainer_config, rollout_prompts

    # rlx loads the policy and TRL's reference itself (same `model.*` settings for both, full weights also under
    # ZeRO-3); TRL, given a path, would apply none of model.dtype / attn_implementation / ...
    policy = load_causal_lm(model_dir, cfg)
    ref = load_causal_lm(model_dir, cfg) if grpo_needs_reference(cfg) else None
    args = make_trainer_config(cfg, run, task)
    with preloaded_reference(ref):
        return trainer_class(
            model=policy,
            reward_funcs=task.reward_funcs,
            args=args,
            train_dataset=rollout_prompts(cfg, task, common["processing_class"], policy, args),
            **common,
        )
