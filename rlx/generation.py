"""Batched HF generation for evaluation and data building (left padding, plain or chat prompts)."""

from __future__ import annotations

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


@torch.no_grad()
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
    out: list[list[str]] = []
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    for start in tqdm(range(0, len(ids), batch_size), desc="generate", disable=not progress, leave=False):
        input_ids, attention_mask = left_pad(ids[start : start + batch_size], tokenizer.pad_token_id)
        seqs = gen(model, input_ids.to(device), attention_mask.to(device), **kwargs)
        texts = tokenizer.batch_decode(seqs[:, input_ids.shape[1] :], skip_special_tokens=True)
        out += [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
    model.train(was_training)
    return out
