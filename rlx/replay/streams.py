"""Residual streams at decoder-layer inputs/outputs, captured with hooks and cut short after the last one needed.

Also the eligibility rule (which positions replay may touch) and a context that freezes weights so the
backward of the learnable-offset loop only computes activation gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from rlx.errors import UserError
from rlx.replay.hooks import (
    HookSet,
    StopForward,
    decoder_parts,
    hidden_from,
    layer_output,
    prefill_position_ids,
    with_hidden,
)


def layer_streams(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    inputs: Sequence[int] = (),
    outputs: Sequence[int] = (),
    offsets: torch.Tensor | None = None,
    model_inputs: dict[str, Any] | None = None,
    position_ids: torch.Tensor | None = None,
    record: LayerCalls | None = None,
    last_rows: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward over the prompt; returns ({l: input of layer l}, {l: output of layer l}), each (B, S, d).

    `offsets` (B, S, d), already masked, is added to the input of layer 0 (the layer-0 input is embeddings plus
    offsets, so `inputs[0]` includes them). The forward stops, via `StopForward`, right after the deepest
    requested stream, so later layers and the LM head are never run. Gradients flow if the caller enables them.
    `position_ids` default to the ones `generate` uses at prefill; a packed batch (`rlx.replay.packing`) passes
    its own with `attention_mask=None`. `record` (a fresh `LayerCalls`) keeps what the forward handed each layer
    it ran, so `rerun_streams` can repeat the same layers with other offsets. `last_rows` (flat indices into
    the (B·S) positions): the only positions at which the caller reads the last layer run's output; that
    layer's MLP then runs at those positions only (`restrict_mlp`).
    """
    parts = decoder_parts(model)
    need_in, need_out = sorted(set(inputs)), sorted(set(outputs))
    if not need_in and not need_out:
        return {}, {}
    last_out = need_out[-1] if need_out else -1
    last_in = need_in[-1] if need_in else -1
    if max(last_in, last_out) >= parts.depth:
        raise ValueError(f"layer {max(last_in, last_out)} requested but the model has {parts.depth} layers")
    got_in: dict[int, torch.Tensor] = {}
    got_out: dict[int, torch.Tensor] = {}

    def add_offsets(module, args, kwargs):
        h = hidden_from(args, kwargs)
        return with_hidden(args, kwargs, h + offsets.to(h.dtype))

    def cap_in(idx):
        def hook(module, args, kwargs):
            got_in[idx] = hidden_from(args, kwargs)

        return hook

    def cap_out(idx):
        def hook(module, args, output):
            got_out[idx] = layer_output(output)

        return hook

    def stop_pre(module, args, kwargs):
        raise StopForward

    def stop_post(module, args, output):
        raise StopForward

    n_run = max(last_in, last_out + 1)
    with HookSet() as hooks:
        if record is not None:
            record.arm(hooks, parts, n_run)
        if last_rows is not None and n_run > 0:
            restrict_mlp(hooks, parts.layers[n_run - 1], last_rows)
        if offsets is not None:
            hooks.pre(parts.layers[0], add_offsets)
        for i in need_in:
            hooks.pre(parts.layers[i], cap_in(i))
        for i in need_out:
            hooks.post(parts.layers[i], cap_out(i))
        if last_out >= last_in:
            hooks.post(parts.layers[last_out], stop_post)
        else:
            hooks.pre(parts.layers[last_in], stop_pre)
        kwargs = dict(model_inputs or {})
        pos = position_ids
        if pos is None and attention_mask is not None:
            pos = prefill_position_ids(model, attention_mask)
        if pos is not None:
            kwargs.setdefault("position_ids", pos)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        except StopForward:
            pass
    missing = [i for i in need_in if i not in got_in] + [i for i in need_out if i not in got_out]
    if missing:
        raise RuntimeError(f"layer streams {missing} were not captured; the model did not run those layers")
    return got_in, got_out


def restrict_mlp(hooks: HookSet, layer: nn.Module, rows: torch.Tensor) -> bool:
    """Run `layer`'s MLP only at the flat positions `rows`, zero elsewhere (hooks on the MLP module).

    For the last layer a forward runs, whose output the caller reads at `rows` only: the MLP is position-wise,
    so its value at those positions is unchanged, and the other positions' outputs (residual + 0 instead of
    residual + MLP) are never read, nor do they reach anything that is (no later layer runs). Gradients flow
    to the same places as through the full MLP at the read positions. Only MLP modules called with one
    (..., d) tensor and returning one (Llama/Qwen2/Qwen3 `*MLP`); False (nothing registered) otherwise.
    """
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not type(mlp).__name__.endswith("MLP"):
        return False
    shape: list[torch.Size] = []

    def pre(module, args):
        x = args[0]
        shape[:] = [x.shape]
        return (x.reshape(-1, x.shape[-1]).index_select(0, rows).unsqueeze(0), *args[1:])

    def post(module, args, out):
        full = out.new_zeros(shape[0].numel() // shape[0][-1], out.shape[-1])
        return full.index_copy(0, rows, out[0]).view(*shape[0][:-1], out.shape[-1])

    hooks.pre(mlp, pre, with_kwargs=False)
    hooks.post(mlp, post)
    return True


class LayerCalls:
    """What one forward handed decoder layers 0..n-1: the layer-0 input before offsets and each layer's other
    arguments (attention mask, position embeddings, ...), none of which depend on the offsets.

    The optimisation loop runs the same batch 25 times with new offsets only; rerunning the recorded layer calls
    (`rerun_streams`) skips what the model's forward recomputes identically every time before the first layer
    (embedding lookup, vision tower for VLMs, causal/packed mask, rotary tables). It is used only when each
    recorded layer's input was the previous layer's output object (`chained`), i.e. the model does nothing
    between layers; otherwise the caller keeps running full forwards.
    """

    def __init__(self) -> None:
        self.embeds: torch.Tensor | None = None
        self.calls: list[tuple[bool, tuple, dict]] = []
        self.chained = True
        self._last_out: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.embeds is not None and self.chained

    def arm(self, hooks: HookSet, parts, n_run: int) -> None:
        """Register the recording hooks (before any other hook on layer 0, so the input is the raw one)."""

        def first(module, args, kwargs):
            self.embeds = hidden_from(args, kwargs).detach()

        hooks.pre(parts.layers[0], first)

        def pre(idx):
            def hook(module, args, kwargs):
                h = hidden_from(args, kwargs)
                if idx > 0 and h is not self._last_out:
                    self.chained = False
                positional = bool(args)
                rest = args[1:] if positional else args
                kw = kwargs if positional else {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.calls.append((positional, rest, dict(kw)))

            return hook

        def post(module, args, output):
            self._last_out = layer_output(output)

        for i in range(n_run):
            hooks.pre(parts.layers[i], pre(i))
            hooks.post(parts.layers[i], post)

    def release(self) -> None:
        self._last_out = None


def rerun_streams(
    model: nn.Module,
    record: LayerCalls,
    *,
    inputs: Sequence[int] = (),
    outputs: Sequence[int] = (),
    offsets: torch.Tensor | None = None,
    last_rows: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """`layer_streams` for the batch `record` was made on, with new offsets: the recorded layer calls only."""
    layers = decoder_parts(model).layers
    need_in, need_out = set(inputs), set(outputs)
    h = record.embeds if offsets is None else record.embeds + offsets.to(record.embeds.dtype)
    got_in: dict[int, torch.Tensor] = {}
    got_out: dict[int, torch.Tensor] = {}
    with HookSet() as hooks:
        if last_rows is not None and record.calls:
            restrict_mlp(hooks, layers[len(record.calls) - 1], last_rows)
        for i, (positional, rest, kwargs) in enumerate(record.calls):
            if i in need_in:
                got_in[i] = h
            layer = layers[i]
            out = layer(h, *rest, **kwargs) if positional else layer(*rest, hidden_states=h, **kwargs)
            h = layer_output(out)
            if i in need_out:
                got_out[i] = h
    if len(record.calls) in need_in:
        got_in[len(record.calls)] = h
    missing = [i for i in need_in if i not in got_in] + [i for i in need_out if i not in got_out]
    if missing:
        raise RuntimeError(f"layer streams {missing} were not recorded")
    return got_in, got_out


@contextlib.contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on all weights (restored on exit) so backward computes activation grads only."""
    saved = [(p, p.requires_grad) for m in models for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def eligible_positions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rule: str,
    mode: str,
    special_ids: Sequence[int] = (),
    exclude_special: bool = True,
) -> torch.Tensor:
    """(B, S) bool: where replay may act.

    auto: image/video pad tokens for VLM prompts that contain them, else prompt tokens (learnable);
    every non-pad token (direct, as the released agent/video scripts). prompt: non-pad tokens minus special
    tokens when `exclude_special`; visual: image/video pad tokens; all: every non-pad token.
    """
    real = attention_mask.bool()
    visual_ids = decoder_parts(model).image_token_ids
    if rule == "auto":
        if mode == "direct":
            rule = "all"
        elif visual_ids and torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device)).any():
            rule = "visual"
        else:
            rule = "prompt"
    if rule == "all":
        return real
    if rule == "visual":
        if not visual_ids:
            raise UserError(
                "replay.positions=visual but the model has no image/video token ids; use positions=prompt or auto."
            )
        return real & torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device))
    if rule == "prompt":
        if exclude_special and len(special_ids):
            return real & ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
        return real
    raise UserError(f"replay.positions={rule!r}: expected auto, prompt, visual or all.")
