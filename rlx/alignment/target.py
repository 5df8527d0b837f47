"""The target set D' and its gradient g_T = grad R_T, R_T = token-mean NLL of D' (arXiv 2512.00778).

Targets (docs/gradient_alignment.md, options):
- `heldout_chosen` (default for DPO and SFT): held-out prompts with their verified reference completion.
- `probe_rollouts` (default for GRPO and PPO): a fixed probe batch of the run's own rollouts (the first
  completions the run trains on), frozen for the whole run and identical on every rank.
- `responses:<path>`: a .jsonl of an earlier run's responses, rows {"prompt", "completion"} (text) or
  {"prompt_ids", "completion_ids"} (token ids).

The probe pass never touches `.grad`, the optimizer, dropout state or the training RNG stream: it runs in
eval mode (restored afterwards), saves and restores the RNG states, and uses `torch.autograd.grad`.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlx.alignment.math import Vec, head_grad_from_activations
from rlx.errors import UserError


@dataclass
class TargetBatch:
    """D' as padded token ids. `loss_mask[:, j]` is 1 when token j+1 is a response token (scored by R_T)."""

    input_ids: torch.Tensor
    """(N, S) token ids, right-padded."""
    attention_mask: torch.Tensor
    """(N, S) 1 on real tokens."""
    loss_mask: torch.Tensor
    """(N, S-1) float, 1 where the predicted token is a response token."""
    name: str
    """Which target this is (written in every record)."""

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def batch_from_ids(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, name: str
) -> TargetBatch:
    """Right-pad prompt+response id lists into a `TargetBatch`."""
    if not prompts:
        raise UserError(f"target set '{name}' is empty; expected at least one (prompt, response).")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), S), dtype=torch.long)
    lm = torch.zeros((len(seqs), S - 1), dtype=torch.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, : len(s)] = 1
        lm[i, max(len(p) - 1, 0) : len(s) - 1] = 1.0
    return TargetBatch(ids, att, lm, name)


def _prompt_text(tokenizer: Any, prompt: Any) -> str:
    if isinstance(prompt, list):  # conversational
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return str(prompt)


def batch_from_texts(
    tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any], name: str
) -> TargetBatch:
    """Tokenize prompts and responses separately (as TRL does) and append EOS to each response."""
    from rlx.tasks.base import completion_text

    eos = tokenizer.eos_token_id
    p_ids, r_ids = [], []
    for p, r in zip(prompts, responses):
        p_ids.append(tokenizer(_prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"])
        ids = tokenizer(completion_text(r), add_special_tokens=False)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        r_ids.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    return batch_from_ids(p_ids, r_ids, pad, name)


def batch_from_rollouts(
    inputs: dict[str, Any], size: int, pad_id: int, name: str = "probe_rollouts"
) -> TargetBatch:
    """The first `size` rollouts of a GRPO/PPO micro-batch (`prompt_ids`/`prompt_mask`, `completion_ids`/`completion_mask`)."""
    P, PM = inputs["prompt_ids"].cpu(), inputs["prompt_mask"].cpu()
    C, CM = inputs["completion_ids"].cpu(), inputs["completion_mask"].cpu()
    prompts, responses = [], []
    for i in range(min(size, C.size(0))):
        prompts.append(P[i][PM[i].bool()].tolist())
        responses.append(C[i][CM[i].bool()].tolist())
    return batch_from_ids(prompts, responses, pad_id, name)


def batch_from_jsonl(tokenizer: Any, path: str, size: int) -> TargetBatch:
    """Responses of an earlier run: rows {"prompt", "completion"} or {"prompt_ids", "completion_ids"}."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"diagnostics.grad_alignment.target=responses:{path}: file not found. Expected a .jsonl with rows "
            '{"prompt": ..., "completion": ...}; write one from an earlier run or use target=auto.'
        )
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()][:size]
    name = f"responses:{p.name}"
    if rows and "prompt_ids" in rows[0]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return batch_from_ids([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad, name)
    try:
        return batch_from_texts(
            tokenizer,
            [r["prompt"] for r in rows],
            [r.get("completion", r.get("response")) for r in rows],
            name,
        )
    except KeyError as e:
        raise UserError(
            f"{path}: rows need 'prompt' and 'completion' (or prompt_ids/completion_ids); missing {e}."
        ) from None


def gather_batch(batch: TargetBatch) -> TargetBatch:
    """Under torch.distributed, replace every rank's batch by rank 0's, so g_T is identical on all ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batch
    obj = [(batch.input_ids, batch.attention_mask, batch.loss_mask, batch.name)]
    dist.broadcast_object_list(obj, src=0)
    return TargetBatch(*obj[0])


# ---- the probe pass -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Eval mode and saved RNG states for a probe pass; both restored on exit."""
    modes = {m: m.training for m in model.modules()}
    cpu_rng, py_rng = torch.get_rng_state(), random.getstate()
    cuda_rng = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t
        torch.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _token_logps(model: nn.Module, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _chunk(model: nn.Module, batch: TargetBatch, chunk: int | None) -> int:
    """Sequences per forward: as many as keep the (chunk, S, V) logits under 2^26 elements."""
    if chunk:
        return chunk
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 50_000)
    return max(1, min(batch.input_ids.size(0), (1 << 26) // max(batch.input_ids.size(1) * vocab, 1)))


def target_gradient(
    model: nn.Module, batch: TargetBatch, params: Sequence[torch.Tensor], chunk: int | None = None
) -> tuple[Vec, float]:
    """(g_T, R_T): the gradient of the token-mean NLL of D' w.r.t. `params` (float32) and the NLL itself.

    `model` is the unwrapped causal LM (its plain forward). Sequences are processed `chunk` at a time, each
    chunk's summed NLL divided by the total token count, so the result is exact for any chunk size.
    """
    device = next(model.parameters()).device
    n_tok = max(batch.n_tokens, 1)
    chunk = _chunk(model, batch, chunk)
    grads: Vec | None = None
    nll_total = 0.0
    with isolated(model), torch.enable_grad():
        for s in range(0, batch.input_ids.size(0), chunk):
            ids = batch.input_ids[s : s + chunk].to(device)
            att = batch.attention_mask[s : s + chunk].to(device)
            lm = batch.loss_mask[s : s + chunk].to(device)
            nll = -(_token_logps(model, ids, att) * lm).sum() / n_tok
            g = torch.autograd.grad(nll, list(params), allow_unused=True)
            g = [
                torch.zeros_like(p, dtype=torch.float32) if x is None else x.float()
                for p, x in zip(params, g)
            ]
            grads = g if grads is None else [a.add_(b) for a, b in zip(grads, g)]
            nll_total += float(nll.detach())
    return grads, nll_total


@torch.no_grad()
def target_nll(model: nn.Module, batch: TargetBatch, chunk: int | None = None) -> float:
    """R_T alone (no gradient), e.g. after the optimizer step for the measured change of R_T."""
    device = next(model.parameters()).device
    n_tok = max(batch.n_tokens, 1)
    chunk = _chunk(model, batch, chunk)
    total = 0.0
    with isolated(model):
        for s in range(0, batch.input_ids.size(0), chunk):
            ids = batch.input_ids[s : s + chunk].to(device)
            att = batch.attention_mask[s : s + chunk].to(device)
            lm = batch.loss_mask[s : s + chunk].to(device)
            total += float(-(_token_logps(model, ids, att) * lm).sum() / n_tok)
    return total


@torch.no_grad()
def target_head_gradient(
    model: nn.Module, backbone: nn.Module, batch: TargetBatch
) -> tuple[torch.Tensor, float]:
    """Activation-space g_T restricted to the LM head weight (V, d), from a no-grad forward (ZeRO-safe)."""
    device = next(model.parameters()).device
    ids, att, lm = batch.input_ids.to(device), batch.attention_mask.to(device), batch.loss_mask.to(device)
    cap: dict[str, torch.Tensor] = {}
    handle = backbone.register_forward_hook(
        lambda m, a, out: cap.__setitem__("h", out[0] if isinstance(out, tuple) else out.last_hidden_state)
    )
    try:
        with isolated(model):
            logp = _token_logps(model, ids, att)
    finally:
        handle.remove()
    n_tok = max(batch.n_tokens, 1)
    sel = lm > 0
    h = cap["h"][:, :-1][sel]
    head = model.get_output_embeddings()
    gather = contextlib.nullcontext()
    if hasattr(head.weight, "ds_id"):  # ZeRO-3: outside a forward the head weight is a partition (collective)
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None)
    with gather:
        g = head_grad_from_activations(
            h, head.weight, ids[:, 1:][sel], -torch.ones(h.size(0), device=device) / n_tok, 1.0, head.bias
        )
    return g, float(-(logp * lm).sum() / n_tok)
