"""Where the tokens of a left-padded batch sit when replay runs its forwards: padded as given, or packed.

Replay's forwards (the base pass and every optimisation step) only need the real tokens of each row, and in the
optimisation loop only each row's tokens up to the last position a loss term reads (causal attention: later
positions cannot change earlier streams, and their offsets get exactly zero gradient). For text models the
kept tokens are packed: rows are placed first-fit-decreasing into R rows of width W, each row a sequence of
segments with position ids restarting at 0, attention_mask None. transformers then builds a block-diagonal
causal mask from the position ids (`masking_utils.find_packed_sequence_indices`), so each segment attends only
to itself, with the same positions as in the left-padded batch: per position the same computation, without
the padding (at B = 4 prompts of 40–64 tokens a fifth of every forward and backward was padding). W is chosen
by a cost model (linear-layer work per token + attention work per query-key pair), so packing never makes
attention dearer than the padding it removes. Positions left over in a packed row form one extra segment of
pad tokens (position ids 0..p-1) whose streams nothing reads.

VLMs (image/video token ids, M-RoPE positions computed from the inputs) and forwards with extra model inputs
keep the padded layout unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlx.replay.hooks import decoder_parts, prefill_position_ids


@dataclass
class Layout:
    """The (R, W) batch a forward runs on and where each (row, column) of the caller's (B, S) batch sits in it."""

    input_ids: torch.Tensor
    """(R, W) token ids."""
    attention_mask: torch.Tensor | None
    """(R, W) for the padded layout; None when packed (the mask comes from the position ids)."""
    position_ids: torch.Tensor | None
    """(R, W) position ids, or None to let the model compute its own (VLMs)."""
    flat: torch.Tensor
    """(B, S) long: index into the flattened (R·W) positions of each kept token, -1 where not kept."""
    packed: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def gather(self, stream: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Rows (N, d) of a (R, W, d) stream at the caller's (rows, cols) positions (which must be kept)."""
        return stream.reshape(-1, stream.shape[-1])[self.flat[rows, cols]]

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """A (R, W, d) tensor back in the caller's (B, S, d) layout, zero at positions that were not kept."""
        out = torch.zeros(*self.flat.shape, x.shape[-1], dtype=x.dtype, device=x.device)
        kept = self.flat >= 0
        out[kept] = x.reshape(-1, x.shape[-1])[self.flat[kept]]
        return out

    def place(self, mask: torch.Tensor) -> torch.Tensor:
        """A (B, S) bool mask in this layout's (R, W) shape (False where nothing was placed)."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=mask.device).flatten()
        kept = self.flat >= 0
        out[self.flat[kept]] = mask[kept]
        return out.view(self.shape)


def padded_layout(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Layout:
    """The batch as given (what the prefill of `generate` runs)."""
    b, s = input_ids.shape
    flat = torch.arange(b * s, device=input_ids.device).view(b, s)
    return Layout(input_ids, attention_mask, prefill_position_ids(model, attention_mask), flat, False)


def _costs(model: nn.Module) -> tuple[float, float]:
    """(linear work per token, attention work per query-key pair) of one decoder layer, in multiply-adds."""
    layer = decoder_parts(model).layers[0]
    lin = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return float(lin), float(2 * heads * head_dim)


def _first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices per bin of `width` (first fit, longest first; ties by row index, so deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for j, r in enumerate(room):
            if lengths[i] <= r:
                bins[j].append(i)
                room[j] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(width - lengths[i])
    return bins


def can_pack(model: nn.Module, model_inputs: dict | None) -> bool:
    """Text models without extra inputs, on a transformers that builds packed-sequence masks."""
    if model_inputs:
        return False
    if prefill_position_ids(model, torch.ones(1, 1, dtype=torch.long)) is None:  # VLM: own positions
        return False
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - older transformers
        return False
    impl = getattr(model.config, "_attn_implementation", None)
    return hasattr(masking_utils, "find_packed_sequence_indices") and impl in ("sdpa", "eager")


def packed_layout(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: torch.Tensor,
    pad_id: int = 0,
) -> Layout:
    """Pack each row's kept tokens (`keep` (B, S) bool: a prefix of the row's real tokens) into the cheapest
    (R, W) of the first-fit-decreasing packings at widths max_len .. total (see the module docstring)."""
    real = attention_mask.bool()
    if bool((keep & ~real).any()):
        raise ValueError("packed_layout: keep must select real (non-pad) tokens only")
    lengths = keep.sum(1).tolist()
    first = real.float().argmax(1)  # left padding: the first real column of each row
    b, s = input_ids.shape
    dev = input_ids.device
    total, longest = sum(lengths), max(lengths, default=0)
    if total == 0:
        empty = torch.zeros(0, 0, dtype=input_ids.dtype, device=dev)
        return Layout(empty, None, empty.long(), torch.full((b, s), -1, device=dev), True)
    lin, att = _costs(model)
    best = None
    for r in range(1, b + 1):
        width = max(longest, -(-total // r))
        bins = _first_fit_decreasing(lengths, width)
        cost = len(bins) * width * lin + len(bins) * width * width * att
        if best is None or cost < best[0]:
            best = (cost, width, bins)
    _, width, bins = best
    n_rows = len(bins)
    ids = torch.full((n_rows, width), pad_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((n_rows, width), dtype=torch.long, device=dev)
    flat = torch.full((b, s), -1, dtype=torch.long, device=dev)
    for r, members in enumerate(bins):
        at = 0
        for i in sorted(members):
            n = lengths[i]
            if n == 0:
                continue
            c0 = int(first[i])
            if not bool(keep[i, c0 : c0 + n].all()):
                raise ValueError("packed_layout: keep must be a prefix of each row's real tokens")
            ids[r, at : at + n] = input_ids[i, c0 : c0 + n]
            pos[r, at : at + n] = torch.arange(n, device=dev)
            flat[i, c0 : c0 + n] = r * width + at + torch.arange(n, device=dev)
            at += n
        pos[r, at:] = torch.arange(width - at, device=dev)  # the leftover room: one pad segment
    return Layout(ids, None, pos, flat, True)


def replay_layout(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: torch.Tensor | None = None,
    model_inputs: dict | None = None,
    pad_id: int = 0,
) -> Layout:
    """Packed layout of the kept tokens (all real tokens by default) when the model allows it, else padded."""
    if can_pack(model, model_inputs):
        return packed_layout(
            model, input_ids, attention_mask, attention_mask.bool() if keep is None else keep, pad_id
        )
    return padded_layout(model, input_ids, attention_mask)
