"""Batched HF generation for evaluation and data building (left padding, plain or chat prompts)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm


def prompt_token_ids(tokenizer, prompts: list[Any]) -> list[list[int]]:
    """Token ids exactly as TRL builds them: chat template for conversational prompts, plain text otherwise."""
    if prompts and isinstance(prompts[0], list):
        out = tokenizer.apply_chat_template(
            prompts, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [list(x) for x in out["input_ids"]]
    return [list(x) for x in tokenizer(text=list(prompts))["input_ids"]]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _generate(
    model,
    tokenizer,
    prompts: list[Any],
    *,
    max_new_tokens: int,
    num_samples: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int | None,
    progress: bool,
    generate_fn,
    desc: str = "generate",
) -> Iterator[tuple[list[list[int]], torch.Tensor]]:
    """Per batch: the prompts' token ids and the generated part (batch * num_samples, new) of each sequence."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = generate_fn or (
        lambda m, input_ids, attention_mask, **kw: m.generate(
            input_ids=input_ids, attention_mask=attention_mask, **kw
        )
    )
    if seed is not None:
        torch.manual_seed(seed)
    ids = prompt_token_ids(tokenizer, prompts)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = ids[start : start + batch_size]
            input_ids, attention_mask = left_pad(chunk, tokenizer.pad_token_id)
            with torch.no_grad():
                seqs = gen(model, input_ids.to(device), attention_mask.to(device), **kwargs)
            yield chunk, seqs[:, input_ids.shape[1] :].cpu()
    finally:
        model.train(was_training)


def generate_texts(
    model,
    tokenizer,
    prompts: list[Any],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int | None = None,
    progress: bool = False,
    generate_fn=None,
) -> list[list[str]]:
    """`num_samples` completions (decoded, special tokens dropped) for each prompt.

    `generate_fn(model, input_ids, attention_mask, **gen_kwargs)` replaces `model.generate` (Activation Replay
    passes one that injects at prefill); decoding settings are identical either way.
    """
    out: list[list[str]] = []
    for _, new in _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        generate_fn=generate_fn,
    ):
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        out += [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
    return out


def until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is padding)."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def generate_greedy_ids(
    model,
    tokenizer,
    prompts: list[Any],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of one greedy response per prompt; a response ends at its first EOS (kept)."""
    prompt_ids: list[list[int]] = []
    response_ids: list[list[int]] = []
    for chunk, new in _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_samples=1,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        batch_size=batch_size,
        seed=None,
        progress=progress,
        generate_fn=None,
        desc=desc,
    ):
        prompt_ids += chunk
        response_ids += [until_eos(r, tokenizer.eos_token_id) for r in new.tolist()]
    return prompt_ids, response_ids
