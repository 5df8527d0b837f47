"""Exception-safe forward hooks on decoder layers, and where those layers live in each architecture.

`HookSet` is a context manager in the spirit of baukit's `Trace`: every hook it registers is checked to be
present on its module, and all of them are removed in `finally`, also when the forward (or `generate`)
raises. `decoder_parts(model)` finds the decoder layers, the final norm and the LM head for Llama, Qwen2,
Qwen3 (`model.model.layers`), the Qwen2.5-VL layout (`model.model.language_model.layers`) and PEFT wrappers.

Prefill detection uses the KV cache, never `seq_len > 1`: a decoder layer is in a prefill when the cache it
is handed holds nothing for that layer yet (or there is no cache at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlx.errors import UserError


class StopForward(Exception):
    """Raised by a hook to end a forward early once everything the caller needs has been captured."""


@dataclass
class DecoderParts:
    """The pieces of a causal LM the replay needs."""

    layers: nn.ModuleList
    """Decoder blocks, in order."""
    norm: nn.Module
    """Final norm applied before the LM head."""
    head: nn.Module
    """LM head (unembedding)."""
    image_token_ids: tuple[int, ...]
    """Image/video pad token ids for VLMs (empty for text models)."""

    @property
    def depth(self) -> int:
        return len(self.layers)


_LAYER_PATHS = (
    "model.language_model.layers",  # Qwen2.5-VL / Qwen2-VL (transformers >= 4.52)
    "model.layers",  # Llama, Qwen2, Qwen3, Mistral, ...
    "language_model.model.layers",  # older VLM layouts
    "language_model.layers",
    "layers",  # a bare decoder (e.g. Qwen2Model)
)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT: PeftModel.get_base_model() -> the transformers model with adapters injected in place.
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate decoder layers, final norm and LM head; raise a clear error when the layout is unknown."""
    inner = _unwrap(model)
    for path in _LAYER_PATHS:
        layers = _get(inner, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            owner = _get(inner, path.rsplit(".", 1)[0]) if "." in path else inner
            norm = getattr(owner, "norm", None)
            head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
            if norm is None or head is None:
                continue
            cfg = getattr(inner, "config", None)
            ids = tuple(
                int(i)
                for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
                if i is not None
            )
            return DecoderParts(layers=layers, norm=norm, head=head, image_token_ids=ids)
    raise UserError(
        f"cannot find decoder layers in {type(inner).__name__}: expected one of "
        f"{', '.join('model.' + p if p != 'layers' else p for p in _LAYER_PATHS)} with a sibling `norm` and an "
        "output embedding. Activation Replay supports Llama, Qwen2, Qwen3 and Qwen2.5-VL causal LMs; pass one of those."
    )


def hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden_states a decoder layer was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with hidden_states replaced, for a `with_kwargs=True` pre-hook's return value."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_output(output: Any) -> torch.Tensor:
    """Decoder-layer output: a tensor in transformers >= 5, a tuple whose first item is the tensor before."""
    return output[0] if isinstance(output, (tuple, list)) else output


def is_prefill(kwargs: dict, layer_idx: int) -> bool:
    """True when the layer's KV cache is empty (or absent): the call is a prefill, not a decode step."""
    cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
    if cache is None:
        return True
    try:
        return cache.get_seq_length(layer_idx) == 0
    except TypeError:  # caches whose get_seq_length takes no layer index
        return cache.get_seq_length() == 0


class HookSet:
    """Registers forward hooks, asserts they are in place, removes them all on exit (also on exceptions).

    Use as `with HookSet() as hooks: hooks.pre(layer, fn); model(...)`. `remove(handle)` lets a one-shot hook
    take itself off (e.g. after the prefill); removing twice is harmless.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[nn.Module, str, torch.utils.hooks.RemovableHandle]] = []

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove_all()

    def pre(
        self, module: nn.Module, fn: Callable, with_kwargs: bool = True
    ) -> torch.utils.hooks.RemovableHandle:
        """Forward pre-hook `fn(module, args, kwargs) -> None | (args, kwargs)`."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        return self._track(module, "_forward_pre_hooks", handle)

    def post(
        self, module: nn.Module, fn: Callable, with_kwargs: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        """Forward hook `fn(module, args, output)` (or `(module, args, kwargs, output)` with kwargs)."""
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        return self._track(module, "_forward_hooks", handle)

    def _track(self, module: nn.Module, table: str, handle: torch.utils.hooks.RemovableHandle):
        self._entries.append((module, table, handle))
        if handle.id not in getattr(module, table):
            self.remove_all()
            raise RuntimeError(
                f"hook on {type(module).__name__} did not register; refusing to run without it"
            )
        return handle

    @property
    def active(self) -> int:
        """Number of this set's hooks still registered."""
        return sum(h.id in getattr(m, t) for m, t, h in self._entries)

    def remove(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        handle.remove()

    def remove_all(self) -> None:
        for _, _, handle in self._entries:
            handle.remove()
        leftover = self.active
        self._entries.clear()
        if leftover:
            raise RuntimeError(f"{leftover} replay hook(s) could not be removed")


def count_hooks(model: nn.Module) -> int:
    """All forward (pre-)hooks on `model` and its submodules; tests compare it before and after."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def prefill_position_ids(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Position ids `generate` uses at prefill for text models (cumsum of the mask, pads at 0).

    VLMs compute their own (M-RoPE) positions from the inputs, so None is returned for them.
    """
    if decoder_parts(model).image_token_ids or hasattr(_unwrap(model), "get_rope_index"):
        return None
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)
