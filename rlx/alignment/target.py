"""The target set D' and its gradient g_T = grad R_T, R_T = token-mean NLL of D' (arXiv 2512.00778).

Targets (docs/gradient_alignment.md, "The target set D'"):
- `heldout_chosen` (the default for every algorithm): held-out prompts with their verified reference
  completion (or the chosen answer of a preference task).
- `final:<run_dir>` (label `final_pilot`): the paper's D' in pilot form, the greedy responses of an earlier
  run's final model on the held-out prompts, written by `python -m rlx.alignment.final_responses RUN_DIR`.
- `responses:<path>`: any .jsonl of responses, rows {"prompt", "completion"} (text) or
  {"prompt_ids", "completion_ids"} (token ids).
- `probe_rollouts` (an option, not the paper's D'): the first rollouts of the run's own first training
  micro-batch, frozen for the whole run and identical on every rank.

The probe pass never touches `.grad`, the optimizer, dropout state or the training RNG stream: it runs in
eval mode (restored afterwards), saves and restores the RNG states, and uses `torch.autograd.grad`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlx.alignment.functional import Vec, head_grad_from_activations
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


def _responses_file_missing(path: str, option: str) -> UserError:
    return UserError(
        f"diagnostics.grad_alignment.target={option}: file {path} not found. Expected a .jsonl with rows "
        '{"prompt": ..., "completion": ...} or {"prompt_ids": ..., "completion_ids": ...}; write one from an '
        "earlier run or use target=auto."
    )


def check_responses_file(path: str) -> Path:
    """The file of `target=responses:<path>`, which must exist."""
    if not Path(path).is_file():
        raise _responses_file_missing(path, f"responses:{path}")
    return Path(path)


def batch_from_jsonl(
    tokenizer: Any, path: str, size: int, name: str | None = None, option: str | None = None
) -> TargetBatch:
    """Responses of an earlier run: the first `size` rows {"prompt", "completion"} or {"prompt_ids", "completion_ids"}.

    Token ids are used as they are when present (the exact tokens a model produced); text rows are tokenized as
    TRL does. `name` labels the target (default `responses:<file name>`); `option` is the setting named in errors.
    """
    p = Path(path)
    option = option or f"responses:{path}"
    if not p.exists():
        raise _responses_file_missing(path, option)
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()][:size]
    name = name or f"responses:{p.name}"
    if rows and "prompt_ids" in rows[0]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            return batch_from_ids(
                [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad, name
            )
        except KeyError as e:
            raise UserError(f"{path}: rows with prompt_ids also need completion_ids; missing {e}.") from None
    try:
        return batch_from_texts(
            tokenizer,
            [r["prompt"] for r in rows],
            [r["completion"] if "completion" in r else r["response"] for r in rows],
            name,
        )
    except KeyError as e:
        raise UserError(
            f"{path}: rows need 'prompt' and 'completion' (or prompt_ids/completion_ids); missing {e}."
        ) from None


FINAL_PILOT = "final_pilot"
"""The label of `target=final:<run_dir>` in the table, the summary and the logs."""


def check_final_target(run_dir: str, cfg: Any) -> Path:
    """The final_responses.jsonl of `target=final:<run_dir>`, checked against this run's config `cfg`.

    The pilot run must be finished, its responses written, and its task and base model the same as this run's
    (D' is the pilot's responses to the task's held-out prompts, tokenized by the same tokenizer). A different
    seed is allowed (several seeds can share one pilot) but is reported, since the paper's pilot form uses the
    same config.
    """
    import sys

    from omegaconf import OmegaConf

    from rlx.alignment.final_responses import responses_path

    option = f"diagnostics.grad_alignment.target=final:{run_dir}"
    d = Path(run_dir)
    if not (d / "config.yaml").exists():
        raise UserError(
            f"{option}: {run_dir} has no config.yaml; expected the directory of a finished rlx run."
        )
    if not (d / "final").is_dir():
        raise UserError(
            f"{option}: {run_dir} has no final/ model (did training finish?); expected a finished rlx run."
        )
    f = responses_path(d)
    if not f.is_file():
        raise UserError(
            f"{option}: {f} not found. Write the final model's responses first: "
            f"python -m rlx.alignment.final_responses {run_dir}"
        )
    pilot = OmegaConf.load(d / "config.yaml")
    for key in ("task.name", "model.name_or_path"):
        mine, theirs = OmegaConf.select(cfg, key), OmegaConf.select(pilot, key)
        if mine != theirs:
            raise UserError(
                f"{option}: that run has {key}={theirs}, this run {key}={mine}; D' must come from a run on "
                "the same task and base model. Use a pilot run of this config."
            )
    seed = OmegaConf.select(pilot, "seed")
    if seed != OmegaConf.select(cfg, "seed") and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"warning: {option}: that run used seed={seed}, this run seed={cfg.seed}; the pilot form of D' "
            "assumes the same config and seed.",
            file=sys.stderr,
        )
    return f


def batch_from_final(tokenizer: Any, run_dir: str, size: int) -> TargetBatch:
    """D' = the first `size` final responses of the run in `run_dir` (its final_responses.jsonl), `final_pilot`."""
    from rlx.alignment.final_responses import responses_path

    return batch_from_jsonl(tokenizer, str(responses_path(run_dir)), size, FINAL_PILOT, f"final:{run_dir}")


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
