"""Tiny random (base, RL) model pairs for tests and benchmarks (no hub access needed).

The RL model is the base plus small Gaussian weight noise. The LM head is scaled up so logit-lens
distributions are peaked at some positions and flat at others, as in trained models (a freshly initialised
head gives near-uniform distributions everywhere, so no position would pass the rho * max entropy rule).
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = ("llama", "qwen2", "qwen3")


def tiny_config(arch: str = "qwen2", layers: int = 3, hidden: int = 32, vocab: int = 97, **extra):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(extra)
    if arch == "qwen3":
        kw.setdefault("head_dim", hidden // kw["num_attention_heads"])
    return cls(**kw)


def tiny_pair(
    arch: str = "qwen2",
    layers: int = 3,
    hidden: int = 32,
    vocab: int = 97,
    seed: int = 0,
    noise: float = 0.05,
    head_scale: float = 100.0,
    dtype: torch.dtype = torch.float32,
    **config: object,
) -> tuple[nn.Module, nn.Module]:
    """(base, rl) causal LMs in eval mode with frozen weights; rl = base + noise · std(weight) · N(0, 1)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, layers, hidden, vocab, **config)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(head_scale)
    rl = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    rl.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in rl.parameters():
            scale = float(p.float().std()) if p.numel() > 1 and float(p.float().std()) > 0 else 1.0
            p.add_(noise * scale * torch.randn(p.shape, generator=g).to(dtype))
    base.requires_grad_(False)
    rl.requires_grad_(False)
    return base, rl


def left_padded_batch(lengths: list[int], vocab: int = 97, seed: int = 0, pad: int = 0):
    """Random prompts of the given lengths, left padded: (input_ids, attention_mask), ids in [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask
