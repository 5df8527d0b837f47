"""DPO preference pairs from a verifiable task: chosen = verified correct, rejected = verified wrong."""

from __future__ import annotations

import random

from datasets import Dataset
from tqdm.auto import tqdm

from rlx.generation import generate_texts


def corrupt(solution: str, task, answer: str, rng: random.Random) -> str | None:
    """A verified-wrong variant of `solution`: change one digit (or append one) until the task rejects it."""
    for _ in range(20):
        chars = list(solution)
        digits = [i for i, c in enumerate(chars) if c.isdigit()]
        if digits and rng.random() < 0.8:
            i = rng.choice(digits)
            chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
        else:
            chars.append(rng.choice("0123456789"))
        cand = "".join(chars)
        if not task.is_correct(cand, answer):
            return cand
    return None


def _on_this_rank(model, input_ids, attention_mask, **kwargs):
    """`generate` with the whole model on this rank alone: once a ZeRO-3 trainer config exists HF would otherwise
    run it in lockstep with the other ranks (`synced_gpus`), which here are not generating (rank 0 goes first)."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=False, **kwargs)


def build_preference_pairs(
    model, tokenizer, task, pcfg, split: str = "train", seed: int = 0, progress: bool = True
) -> Dataset:
    """`pcfg.num_pairs` rows {prompt, chosen, rejected, chosen_source, rejected_source}.

    source=policy samples `pcfg.samples_per_prompt` completions per prompt from `model`; a verified-correct sample
    is chosen and a verified-wrong one rejected. A prompt without a correct sample falls back to the reference
    solution, and one without a wrong sample to a corruption of the solution (the `*_source` columns say which).
    """
    rng = random.Random(seed)
    ds = task.train_dataset() if split == "train" else task.eval_dataset()
    idx = list(range(len(ds)))
    rng.shuffle(idx)
    ds = ds.select(idx[: min(pcfg.num_pairs, len(ds))])
    prompts, answers, solutions = list(ds["prompt"]), list(ds["answer"]), list(ds["solution"])
    if pcfg.source == "policy":
        samples = generate_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=task.max_completion_length,
            num_samples=pcfg.samples_per_prompt,
            do_sample=True,
            temperature=pcfg.temperature,
            seed=seed,
            progress=progress,
            generate_fn=_on_this_rank,
        )
    else:
        samples = [[] for _ in prompts]
    rows = {k: [] for k in ("prompt", "chosen", "rejected", "chosen_source", "rejected_source")}
    for p, a, sol, cands in tqdm(zip(prompts, answers, solutions, samples), total=len(prompts), disable=True):
        good = [c for c in cands if task.is_correct(c, a)]
        bad = [c for c in cands if not task.is_correct(c, a) and c.strip()]
        chosen, csrc = (good[0], "policy") if good else (sol, "reference")
        rejected, rsrc = (bad[0], "policy") if bad else (corrupt(sol, task, a, rng), "corruption")
        if rejected is None:
            continue
        for k, v in zip(rows, (p, chosen, rejected, csrc, rsrc)):
            rows[k].append(v)
    return Dataset.from_dict(rows)
