"""Evaluation during training (`eval.every=N`): held-out greedy accuracy and unbiased pass@k over training.

At step 0 (the base policy; skipped when resuming), every N optimizer steps and at the last step, every rank
evaluates its share of the held-out prompts with the policy being trained and the results are gathered:

- greedy: prompts are cut into fixed batches of `eval.batch_size` (the same batches whatever the world size),
  dealt round-robin to the ranks;
- sampled: `eval.num_samples` completions per prompt at `eval.temperature` / `eval.top_p`, one generate call
  per prompt seeded by (seed, step, prompt index) inside a forked RNG, so the samples do not depend on how
  prompts are spread over ranks and training's random streams are untouched.

So a 2-process run reports the numbers a 1-process run does. Under DeepSpeed ZeRO-3 the partitioned weights are
gathered for generation (as TRL does for rollouts); under FSDP every rank makes the same number of generate
calls in lockstep (`synced_gpus`). Each evaluation logs `eval/greedy_accuracy`, `eval/greedy_mean_reward`,
`eval/pass@k` for `eval.ks`, `eval/sample_mean_reward` to every logger (metrics.jsonl, TensorBoard, W&B) and
writes every completion to `diagnostics/eval/step_NNNNNN.parquet` (schema below).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from rlx.algorithms.passk import pass_at_k
from rlx.generation import generate_texts

SCHEMA_VERSION = 1
SAMPLE_COLUMNS = {
    "step": "optimizer step the policy had taken (0 = base policy)",
    "prompt_index": "row of the held-out split",
    "kind": "greedy | sample",
    "sample": "sample number within the prompt (0 for greedy)",
    "completion": "decoded completion",
    "reward": "the task's reward (task.score) of the completion",
    "correct": "reward >= 1",
}


def pass_at_k_table(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, float]:
    """Mean unbiased pass@k over prompts from sampled rows (`kind == 'sample'`), for each k <= samples per prompt."""
    per_prompt: dict[int, list[bool]] = {}
    for r in rows:
        if r["kind"] == "sample":
            per_prompt.setdefault(r["prompt_index"], []).append(bool(r["correct"]))
    if not per_prompt:
        return {}
    n = min(len(v) for v in per_prompt.values())
    return {
        f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_prompt.values()) / len(per_prompt)
        for k in ks
        if k <= n
    }


def summarize(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, float]:
    greedy = [r for r in rows if r["kind"] == "greedy"]
    sampled = [r for r in rows if r["kind"] == "sample"]
    out: dict[str, float] = {}
    if greedy:
        out["greedy_accuracy"] = sum(r["correct"] for r in greedy) / len(greedy)
        out["greedy_mean_reward"] = sum(r["reward"] for r in greedy) / len(greedy)
    if sampled:
        out.update(pass_at_k_table(rows, ks))
        out["sample_mean_reward"] = sum(r["reward"] for r in sampled) / len(sampled)
    return out


def _sample_seed(seed: int, step: int, prompt_index: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + prompt_index) % (2**31 - 1)


def evaluate_sharded(
    trainer: Any,
    tokenizer: Any,
    task: Any,
    *,
    num_prompts: int | None,
    max_new_tokens: int | None,
    batch_size: int,
    num_samples: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    step: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Every completion of one evaluation (all ranks' shares, gathered, on every rank). A collective.

    `num_samples=0`: greedy only. The policy is the one `trainer` trains, whatever wraps it.
    """
    from accelerate.utils import gather_object
    from trl.models import unwrap_model_for_generation

    acc = trainer.accelerator
    ds = task.eval_dataset()
    if num_prompts is not None:
        ds = ds.select(range(min(num_prompts, len(ds))))
    prompts, answers = list(ds["prompt"]), list(ds["answer"])
    n, world, rank = len(prompts), acc.num_processes, acc.process_index
    max_new = (
        max_new_tokens or getattr(trainer.args, "max_completion_length", None) or task.max_completion_length
    )
    lockstep = acc.distributed_type.name == "FSDP"

    def gen(model, input_ids, attention_mask, **kw):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=lockstep, **kw)

    bs = max(1, int(batch_size))
    batches = [list(range(b, min(b + bs, n))) for b in range(0, n, bs)]
    my_batches = batches[rank::world]
    my_prompts = list(range(n))[rank::world] if num_samples > 0 else []
    greedy_calls = math.ceil(len(batches) / world)
    sample_calls = math.ceil(n / world) if num_samples > 0 else 0
    local: list[dict[str, Any]] = []

    def record(i: int, kind: str, j: int, text: str) -> None:
        reward = float(task.score(text, answers[i]))
        local.append(
            {
                "step": step,
                "prompt_index": i,
                "kind": kind,
                "sample": j,
                "completion": text,
                "reward": reward,
                "correct": reward >= 1.0,
            }
        )

    bar = tqdm(
        total=greedy_calls + sample_calls,
        desc=f"eval step {step}",
        disable=not acc.is_main_process,
        leave=False,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with (
        unwrap_model_for_generation(trainer.model_wrapped, acc, gather_deepspeed3_params=True) as model,
        torch.random.fork_rng(devices=devices),
    ):
        for c in range(greedy_calls):  # the same number of calls on every rank; fillers are discarded
            real = c < len(my_batches)
            idx = my_batches[c] if real else batches[-1]
            texts = generate_texts(
                model,
                tokenizer,
                [prompts[i] for i in idx],
                max_new_tokens=max_new,
                batch_size=bs,
                generate_fn=gen,
            )
            if real:
                for i, t in zip(idx, texts):
                    record(i, "greedy", 0, t[0])
            bar.update()
        for c in range(sample_calls):
            real = c < len(my_prompts)
            i = my_prompts[c] if real else n - 1
            texts = generate_texts(
                model,
                tokenizer,
                [prompts[i]],
                max_new_tokens=max_new,
                num_samples=num_samples,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                batch_size=1,
                seed=_sample_seed(seed, step, i),
                generate_fn=gen,
            )[0]
            if real:
                for j, t in enumerate(texts):
                    record(i, "sample", j, t)
            bar.update()
    bar.close()
    rows = gather_object(local) if world > 1 else local
    return sorted(rows, key=lambda r: (r["prompt_index"], r["kind"], r["sample"]))


class EvalCallback(TrainerCallback):
    """Runs `evaluate_sharded` at step 0, every `eval.every` steps and at the end; logs and saves the results."""

    def __init__(self, trainer: Any, tokenizer: Any, task: Any, cfg: Any, run: Any):
        self.trainer, self.tokenizer, self.task, self.run = trainer, tokenizer, task, run
        self.ecfg, self.seed, self.every = cfg.eval, int(cfg.seed), int(cfg.eval.every)
        self.last_step: int | None = None

    def _evaluate(self, args, state, control) -> None:
        step = int(state.global_step)
        e = self.ecfg
        rows = evaluate_sharded(
            self.trainer,
            self.tokenizer,
            self.task,
            num_prompts=e.num_prompts,
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size,
            num_samples=e.num_samples,
            temperature=e.temperature,
            top_p=e.top_p,
            step=step,
            seed=self.seed,
        )
        summary = summarize(rows, list(self.ecfg.ks))
        self.last_step = step
        if self.trainer.accelerator.is_main_process and self.run.writer is not None:
            self.run.writer.write_parquet(
                f"eval/step_{step:06d}.parquet",
                rows,
                schema_version=SCHEMA_VERSION,
                instrument="eval",
                description="every held-out completion of the in-training evaluation at this step",
            )
        # to every logger, without touching the trainer's own metric buffers (GRPO's `log` would flush them);
        # HF's handler clears control.should_log, which this step's own train row still needs
        should_log = control.should_log
        self.trainer.callback_handler.on_log(
            args, state, control, {f"eval/{k}": v for k, v in summary.items()}
        )
        control.should_log = should_log

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step == 0:
            self._evaluate(args, state, control)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0:
            self._evaluate(args, state, control)

    def on_train_end(self, args, state, control, **kw):
        if self.last_step != state.global_step:
            self._evaluate(args, state, control)
