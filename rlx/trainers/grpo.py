"""GRPO: TRL's GRPOTrainer with the rlx instrument seam (two small overrides, no copied bodies)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
            "buffered_inputs": None if buf is None else [{k: to_cpu(v) for k, v in b.items()} for b in buf],
        }

    def _rlx_load_trainer_state(self, state):
        super()._rlx_load_trainer_state(state)
        self._step = int(state["micro_step"])
        buf = state["buffered_inputs"]
        dev = self.accelerator.device
        to_dev = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
        self._buffered_inputs = None if buf is None else [{k: to_dev(v) for k, v in b.items()} for b in buf]

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
