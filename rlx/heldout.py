"""Held-out evaluation: greedy accuracy and unbiased pass@k of a policy on a task."""

from __future__ import annotations

from typing import Any

from rlx.algorithms.passk import pass_at_k
from rlx.generation import generate_texts


def evaluate_policy(
    model,
    tokenizer,
    task,
    *,
    num_prompts: int | None = None,
    num_samples: int = 16,
    ks: tuple[int, ...] = (1, 4, 16),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    greedy_only: bool = False,
    progress: bool = False,
    generate_fn=None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (`summary`, `samples`).

    summary: `greedy_accuracy`, `pass@k` for each k (unbiased estimator over `num_samples` samples at
    `temperature`), `mean_reward`, `num_prompts`, `num_samples`. samples: one dict per prompt with the
    prompt, answer, greedy completion and reward, sampled completions and rewards.
    """
    ds = task.eval_dataset()
    if num_prompts is not None:
        ds = ds.select(range(min(num_prompts, len(ds))))
    prompts, answers = list(ds["prompt"]), list(ds["answer"])
    max_new = max_new_tokens or task.max_completion_length
    greedy = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new,
        batch_size=batch_size,
        progress=progress,
        generate_fn=generate_fn,
    )
    greedy_rewards = [task.score(g[0], a) for g, a in zip(greedy, answers)]
    summary: dict[str, Any] = {
        "num_prompts": len(prompts),
        "greedy_accuracy": sum(r >= 1.0 for r in greedy_rewards) / max(len(prompts), 1),
        "greedy_mean_reward": sum(greedy_rewards) / max(len(prompts), 1),
    }
    samples = [
        {"prompt": p, "answer": a, "greedy": g[0], "greedy_reward": r}
        for p, a, g, r in zip(prompts, answers, greedy, greedy_rewards)
    ]
    if greedy_only or num_samples == 0:
        return summary, samples
    ks = tuple(k for k in ks if k <= num_samples)
    sampled = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new,
        num_samples=num_samples,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        batch_size=max(1, batch_size // max(1, num_samples // 4)),
        seed=seed,
        progress=progress,
        generate_fn=generate_fn,
    )
    rewards = [[task.score(c, a) for c in cs] for cs, a in zip(sampled, answers)]
    for k in ks:
        summary[f"pass@{k}"] = (
            sum(pass_at_k(num_samples, sum(r >= 1.0 for r in rs), k) for rs in rewards) / len(rs_all)
            if (rs_all := rewards)
            else 0.0
        )
    summary["sample_mean_reward"] = sum(map(sum, rewards)) / max(1, sum(map(len, rewards)))
    summary.update(num_samples=num_samples, temperature=temperature, top_p=top_p, ks=list(ks))
    for s, cs, rs in zip(samples, sampled, rewards):
        s["completions"], s["rewards"] = cs, rs
    return summary, samples


def greedy_accuracy_all_ranks(
    trainer,
    tokenizer,
    task,
    *,
    num_prompts: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out greedy accuracy of the policy a trainer trains; a collective that every rank must call.

    The held-out prompts are split over the ranks and each rank generates its share with the whole model (under
    DeepSpeed ZeRO-3 the partitioned weights are gathered as TRL does for rollouts; under FSDP generation runs in
    lockstep): `rlx.eval_loop.evaluate_sharded`, greedy only. The same summary on every rank.
    """
    from rlx.eval_loop import evaluate_sharded, summarize

    rows = evaluate_sharded(
        trainer,
        tokenizer,
        task,
        num_prompts=num_prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return {"num_prompts": len(rows), **summarize(rows, [])}
