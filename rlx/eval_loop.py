"""Evaluation during training (`eval.every=N`): held-out greedy accuracy and unbiased pass@k over training.

At step 0 (the base policy; skipped when resuming), every N optimizer steps and at the last step, every rank
evaluates its share of the held-out prompts with the policy being trained and the results are gathered:

- greedy: prompts are cut into fixed batches of `eval.batch_size` (the same batches whatever the world size),
  dealt round-robin to the ranks;
- sampled: `eval.num_samples` completions per prompt at `eval.temperature` / `eval.top_p`, one generate call
  per prompt seeded by (seed, step, prompt index) inside a forked RNG, so the samples do not depend on how
  prompts are spread over ranks and training's random streams are untouched.

So a 2-process run reports the numbers a 1-process run does. Under DeepSpeed ZeRO-3 the partitioned weights are
gathered for generation (as TRL does for rollouts); under FSDP and ZeRO-3 every rank makes the same number of generate
calls in lockstep (`synced_gpus`). Each evaluation logs `eval/greedy_accuracy`, `eval/greedy_mean_reward`,
`eval/pass@k` for `eval.ks`, `eval/sample_mean_reward` to every logger (metrics.jsonl, TensorBoard, W&B) and
writes every completion to `diagnostics/eval/step_NNNNNN.parquet` (schema below).

`eval.replay=learnable|direct` evaluates the same policy a second time with Activation Replay (rlx/replay) at
each evaluation: the same prompts, batches, seeds and decoding, with the replay prepared per batch against a
frozen base model (`replay.base_model` if set, else the model the run started from, i.e. the policy at step 0)
and injected into each prefill, with every other `replay.*` setting. It logs `eval_replay/*` (the same keys,
plus `eval_replay/gain_*` = replay minus plain, and what the replay did) and adds its rows to the step's
parquet with `replay` = the mode (the plain rows have `replay` = "off"). FSDP is refused (rlx/run.py).

Cost: `eval/seconds` and `eval/cpu_seconds` are the wall and process CPU time of the whole evaluation (both
passes, gathering and writing; rank 0's process in metrics.jsonl), `eval_replay/seconds` and
`eval_replay/cpu_seconds` the replay pass's share (its first one includes loading the base model). rlx/train.py
writes the totals and their fraction of the training loop to run_info.json (`eval_cost`, `EvalCallback.cost`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from rlx import dumps
from rlx.algorithms.passk import pass_at_k
from rlx.generation import generate_texts

COST_KEYS = ("seconds", "cpu_seconds")
"""Logged per evaluation under eval/ and eval_replay/: timings, which differ between otherwise identical runs."""


def is_cost_metric(key: str) -> bool:
    """`eval/seconds`, `eval_replay/cpu_seconds`, ...: the evaluation's cost, not its result."""
    return key.split("/", 1)[0] in ("eval", "eval_replay") and key.rsplit("/", 1)[-1] in COST_KEYS


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
    generate_fn: Any = None,
    replay: str = "off",
) -> list[dict]:
    """Every completion of one evaluation (all ranks' shares, gathered, on every rank). A collective.

    `num_samples=0`: greedy only. The policy is the one `trainer` trains, whatever wraps it. `generate_fn`
    (`rlx.replay.replay_generate_fn`) replaces `model.generate` for the Activation Replay pass; `replay` is
    the label its rows carry ("off" for the plain pass).
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
    # Sharded weights (FSDP, DeepSpeed ZeRO-3) make every forward a collective: each rank makes the same number of
    # generate calls (fillers are discarded) and generates in lockstep. Under ZeRO-3 TRL's unwrap gathers the
    # weights and removes its hooks, yet the post-training evaluation was seen blocked in the hooks' collective when
    # one rank had fewer calls, so ZeRO-3 is kept in lockstep too.
    from trl.distributed import DistributedBackend

    backend = DistributedBackend(acc)
    lockstep = world > 1 and (backend.is_fsdp or backend.is_zero3)

    def gen(model, input_ids, attention_mask, **kw):
        if generate_fn is not None:
            return generate_fn(model, input_ids, attention_mask, synced_gpus=lockstep, **kw)
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
                "replay": replay,
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
        for c in range(greedy_calls):  # lockstep: the same number of calls on every rank
            real = c < len(my_batches)
            if not (real or lockstep):
                break
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
            if not (real or lockstep):
                break
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


def replay_mode(cfg: Any) -> str:
    """`eval.replay`, normalised ("off" also when YAML read `off` as a boolean)."""
    from rlx.replay import normalise_mode

    return normalise_mode(getattr(cfg.eval, "replay", "off"))


def replay_base_path(cfg: Any, model_dir: str | None) -> str:
    """The base model of the in-training replay: `replay.base_model` when set (`embedded` = the warm start),
    else the model the run started from (`model_dir`, the policy at step 0: the pre-RL model of this run)."""
    from rlx.replay import default_base_model

    if cfg.replay.base_model or not model_dir:
        return default_base_model(cfg)
    return str(model_dir)


class EvalCallback(TrainerCallback):
    """Runs `evaluate_sharded` at step 0, every `eval.every` steps and at the end; logs and saves the results.

    With `eval.replay` on, each evaluation runs a second pass with Activation Replay (see the module docstring).
    `cost` accumulates the evaluations' wall and CPU time over this `train()` call and `cost_summary()` relates
    it to the whole training loop (rlx/train.py writes it to run_info.json as `eval_cost`).
    """

    def __init__(
        self, trainer: Any, tokenizer: Any, task: Any, cfg: Any, run: Any, model_dir: str | None = None
    ):
        self.trainer, self.tokenizer, self.task, self.run = trainer, tokenizer, task, run
        self.ecfg, self.seed, self.every = cfg.eval, int(cfg.seed), int(cfg.eval.every)
        self.cfg, self.model_dir = cfg, model_dir
        self.replay = replay_mode(cfg)
        self.last_step: int | None = None
        self.base_model: Any = None
        self.base_model_path: str | None = None
        self.cost: dict[str, float] = {"evaluations": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        if self.replay != "off":
            self.cost.update(replay_seconds=0.0, replay_cpu_seconds=0.0)
        self._span_start: tuple[float, float] | None = None
        self._span_end: tuple[float, float] | None = None

    def _sharded(self, step: int, **kw: Any) -> list[dict]:
        e = self.ecfg
        return evaluate_sharded(
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
            **kw,
        )

    def _load_base(self) -> Any:
        """The frozen base model, loaded once per run (per rank) in the policy's dtype, on its device."""
        if self.base_model is None:
            from rlx.models import load_causal_lm

            like = next(self.trainer.accelerator.unwrap_model(self.trainer.model).parameters())
            self.base_model_path = replay_base_path(self.cfg, self.model_dir)
            base = load_causal_lm(self.base_model_path, self.cfg, dtype=like.dtype)
            self.base_model = base.to(like.device).eval().requires_grad_(False)
        return self.base_model

    def _replay_pass(self, step: int) -> tuple[list[dict], dict[str, float]]:
        """The replay rows and what replay did (summed over ranks)."""
        from accelerate.utils import gather_object

        from rlx.config.schema import ReplayConfig
        from rlx.replay import ReplayStats, replay_generate_fn

        base = self._load_base()
        rcfg = {f.name: getattr(self.cfg.replay, f.name) for f in dataclasses.fields(ReplayConfig)}
        rcfg["mode"] = self.replay
        lr = float(rcfg["lr"]) if self.replay == "learnable" else None
        stats = ReplayStats(lr=lr)
        fn = replay_generate_fn(base, self.tokenizer, rcfg, stats)
        rows = self._sharded(step, generate_fn=fn, replay=self.replay)
        if self.trainer.accelerator.num_processes > 1:
            total = ReplayStats(lr=lr)
            for other in gather_object([stats]):
                total.absorb(other)
            stats = total
        info = {k.removeprefix("replay_"): v for k, v in stats.summary().items()}
        if self.replay != "learnable":
            for key in ("loss_first", "loss_last", "loss_rose_prompts"):
                info.pop(key)
        return rows, info

    def _evaluate(self, args, state, control) -> None:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        step = int(state.global_step)
        ks = list(self.ecfg.ks)
        rows = self._sharded(step)
        summary = summarize(rows, ks)
        metrics = {f"eval/{k}": v for k, v in summary.items()}
        if self.replay != "off":
            wall1, cpu1 = time.perf_counter(), time.process_time()
            replay_rows, info = self._replay_pass(step)
            replayed = summarize(replay_rows, ks)
            metrics.update({f"eval_replay/{k}": v for k, v in replayed.items()})
            metrics.update(
                {f"eval_replay/gain_{k}": replayed[k] - summary[k] for k in summary if k in replayed}
            )
            metrics.update({f"eval_replay/{k}": v for k, v in info.items()})
            rows = rows + replay_rows
            replay_wall, replay_cpu = time.perf_counter() - wall1, time.process_time() - cpu1
            metrics.update({"eval_replay/seconds": replay_wall, "eval_replay/cpu_seconds": replay_cpu})
            self.cost["replay_seconds"] += replay_wall
            self.cost["replay_cpu_seconds"] += replay_cpu
        self.last_step = step
        if self.trainer.accelerator.is_main_process and self.run.writer is not None:
            self.run.writer.write(
                dumps.EVAL,
                rows,
                step=step,
                description="every held-out completion of the in-training evaluation at this step"
                + (f" (replay = off, and {self.replay}: Activation Replay)" if self.replay != "off" else ""),
            )
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        metrics.update({"eval/seconds": wall, "eval/cpu_seconds": cpu})
        self.cost["evaluations"] += 1
        self.cost["seconds"] += wall
        self.cost["cpu_seconds"] += cpu
        # to every logger, without touching the trainer's own metric buffers (GRPO's `log` would flush them);
        # HF's handler clears control.should_log, which this step's own train row still needs
        should_log = control.should_log
        self.trainer.callback_handler.on_log(args, state, control, metrics)
        control.should_log = should_log

    def cost_summary(self) -> dict[str, Any]:
        """Totals of this `train()` call's evaluations and their share of the training loop: `loop_seconds` /
        `loop_cpu_seconds` run from `on_train_begin` (before the step-0 evaluation) to the end of the last
        evaluation; `fraction` / `cpu_fraction` = the evaluations' share of them. Rank 0's process."""
        out: dict[str, Any] = {"replay": self.replay, **self.cost}
        if self.base_model_path is not None:
            out["replay_base_model"] = self.base_model_path
        if self._span_start is not None:
            end = self._span_end or (time.perf_counter(), time.process_time())
            loop_wall, loop_cpu = end[0] - self._span_start[0], end[1] - self._span_start[1]
            out.update(
                loop_seconds=loop_wall,
                loop_cpu_seconds=loop_cpu,
                fraction=self.cost["seconds"] / loop_wall if loop_wall > 0 else None,
                cpu_fraction=self.cost["cpu_seconds"] / loop_cpu if loop_cpu > 0 else None,
            )
        return out

    def on_train_begin(self, args, state, control, **kw):
        self._span_start = (time.perf_counter(), time.process_time())
        if state.global_step == 0:
            self._evaluate(args, state, control)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0:
            self._evaluate(args, state, control)

    def on_train_end(self, args, state, control, **kw):
        if self.last_step != state.global_step:
            self._evaluate(args, state, control)
        self._span_end = (time.perf_counter(), time.process_time())
