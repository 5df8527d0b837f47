"""Prefill-only injection of a prepared replay into the RL model's decoder layers.

Hooks are armed on entry, fire once at the prefill (the layer's KV cache is empty), then take themselves off,
so decode steps run with no hook at all; the effect reaches decoding through the KV cache. The prepared
(B, S, ...) tensors are repeat-interleaved to the prefill's batch (B·K for `num_return_sequences=K`, as
`generate` expands its inputs). A prefill of a different length, or a decode step reaching an armed hook, is
an error, never a silent no-op. All hooks are removed on exit, also when `generate` raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from rlx.replay.direct import DirectReplay
from rlx.replay.hooks import HookSet, decoder_parts, hidden_from, is_prefill, with_hidden
from rlx.replay.learnable import LearnableReplay


@dataclass
class InjectionLog:
    """What the hooks did: prefill injections per layer and the batch sizes they saw."""

    fired: dict[int, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    state: LearnableReplay | DirectReplay | None = None
    """The prepared replay (offsets and loss trace, or masks)."""


def _expand(x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    if x.shape[1] != seq:
        raise RuntimeError(
            f"replay prepared for sequence length {x.shape[1]} but the prefill has {seq}; prepare the replay on the "
            "exact input_ids/attention_mask passed to generate"
        )
    if batch == x.shape[0]:
        return x
    if batch % x.shape[0]:
        raise RuntimeError(f"replay prepared for batch {x.shape[0]} but the prefill has batch {batch}")
    return x.repeat_interleave(batch // x.shape[0], dim=0)


@contextlib.contextmanager
def inject(model: nn.Module, state: LearnableReplay | DirectReplay | None) -> Iterator[InjectionLog]:
    """Arm one-shot prefill hooks for `state` on `model` for the duration of the block (one generate call)."""
    log = InjectionLog(state=state)
    if state is None:
        yield log
        return
    layers = decoder_parts(model).layers
    with HookSet() as hooks:

        def one_shot(idx: int, apply):
            handle = None

            def hook(module, args, kwargs):
                if not is_prefill(kwargs, idx):
                    raise RuntimeError(
                        f"armed replay hook on layer {idx} reached a decode step before any prefill"
                    )
                h = hidden_from(args, kwargs)
                out = apply(h)
                log.fired[idx] = log.fired.get(idx, 0) + 1
                if idx == 0:
                    log.batch_sizes.append(h.shape[0])
                hooks.remove(handle)
                return with_hidden(args, kwargs, out)

            handle = hooks.pre(layers[idx], hook)

        if isinstance(state, LearnableReplay):
            offsets = state.offsets

            def add(h):
                return h + _expand(offsets, h.shape[0], h.shape[1]).to(h.device, h.dtype)

            one_shot(0, add)
        else:
            for layer in range(state.num_layers):

                def replace(h, layer=layer):
                    m = _expand(state.masks[layer], h.shape[0], h.shape[1]).to(h.device)
                    src = _expand(state.base_inputs[layer], h.shape[0], h.shape[1]).to(h.device, h.dtype)
                    return torch.where(m[..., None], src, h)

                one_shot(layer, replace)
        yield log
