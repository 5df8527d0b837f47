"""`diagnostics.activations`: pooled per-layer states of a fixed probe prompt set, saved at chosen steps.

At step 0 (before training), every `every` optimizer steps and at the last step, the instrument samples
`samples_per_prompt` completions for the first `num_prompts` held-out prompts (fixed across steps and
runs: the held-out split does not move with `seed`), scores them with the task reward, re-encodes
prompt+completion with the current policy and stores, per completion,

    last        (N, L+1, d) float16  hidden_states at the last completion token (HF order: embeddings,
                                     block 1 .. block L; the last entry is post final norm)
    mean        (N, L+1, d) float16  the same states averaged over the completion tokens
    reward      (N,)  float32        task reward of the completion (NaN for tasks without one)
    prompt_id   (N,)  int64          row of the probe prompt in the held-out split (the GRPO-style group)
    mean_logp   (N,)  float32        policy mean token log-prob of the completion
    completion_len (N,) int64
    token_logp, token_entropy (T,) float32, token_sample, token_id (T,) int64: every completion token's
                                     log-prob, policy entropy (nats), the index of its completion and its id

in `diagnostics/activations/step_{step:06d}.safetensors` (per rank under multi-process training; each
rank takes probe prompts rank::world_size). Schema version 1. These feed the correctness-direction and
entropy-dynamics analyses (analysis/measures/). Sampling runs under a forked RNG seeded by
(seed, step), so it neither perturbs training nor varies between identical runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from rlx import dumps
from rlx.instruments.base import Instrument, register_instrument, unwrap_policy


@register_instrument("activations")
class ActivationsInstrument(Instrument):
    changes_loss = False

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        self._last_saved: int | None = None
        self._probes: list[tuple[int, Any, str]] | None = None
        self._task = None

    # ---- events ------------------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Any) -> None:
        self.save(trainer, int(trainer.state.global_step))

    def on_step_end(self, trainer: Any) -> None:
        step = int(trainer.state.global_step)
        if self.cfg.every > 0 and step % self.cfg.every == 0:
            self.save(trainer, step)

    def on_train_end(self, trainer: Any) -> None:
        self.save(trainer, int(trainer.state.global_step))

    # ---- work --------------------------------------------------------------------------------------------

    def _probe_set(self) -> list[tuple[int, Any, str]]:
        if self._probes is None:
            from rlx.tasks import get_task

            self._task = get_task(self.run.cfg.task)
            ds = self._task.eval_dataset()
            n = min(int(self.cfg.num_prompts), len(ds))
            rows = [(i, ds[i]["prompt"], str(ds[i]["answer"])) for i in range(n)]
            self._probes = rows[self.run.rank :: max(1, self.run.world_size)]
        return self._probes

    def _max_new_tokens(self, trainer: Any) -> int:
        n = getattr(trainer.args, "max_completion_length", None)
        return int(n or self._task.max_completion_length)

    def save(self, trainer: Any, step: int) -> None:
        if self._last_saved == step:
            return
        self._last_saved = step
        probes = self._probe_set()
        with _generation_model(trainer) as model:
            tensors = collect_activations(
                unwrap_policy(model),
                trainer.processing_class,
                probes,
                score=self._task.score,
                samples_per_prompt=int(self.cfg.samples_per_prompt),
                max_new_tokens=self._max_new_tokens(trainer),
                seed=int(self.run.cfg.seed) * 1_000_003 + step,
            )
        self.run.writer.write(
            dumps.ACTIVATIONS,
            tensors,
            step=step,
            metadata={
                "step": str(step),
                "pooling": "last,mean",
                "num_layers": str(tensors["last"].shape[1] - 1),
            },
            per_rank=self.run.world_size > 1,
        )


@contextlib.contextmanager
def _generation_model(trainer: Any) -> Iterator[torch.nn.Module]:
    """The policy ready for generate(): TRL's unwrap (DDP/FSDP; gathers ZeRO-3 shards), else trainer.model."""
    wrapped, accelerator = getattr(trainer, "model_wrapped", None), getattr(trainer, "accelerator", None)
    if wrapped is None or accelerator is None:
        yield trainer.model
        return
    from trl.models.utils import unwrap_model_for_generation

    kwargs = getattr(trainer.args, "gradient_checkpointing_kwargs", None)
    with unwrap_model_for_generation(wrapped, accelerator, gradient_checkpointing_kwargs=kwargs) as model:
        yield model


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    probes: list[tuple[int, Any, str]],
    *,
    score,
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Sample, score and re-encode completions for `probes` = [(prompt_id, prompt, answer)]; see module doc."""
    from rlx.generation import left_pad, prompt_token_ids

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: dict[str, list] = {
        k: [] for k in ("last", "mean", "reward", "prompt_id", "mean_logp", "completion_len")
    }
    tok_logp, tok_ent, tok_sample, tok_id = [], [], [], []
    n_done = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(probes), batch_size):
            chunk = probes[start : start + batch_size]
            ids, attn = left_pad(prompt_token_ids(tokenizer, [p for _, p, _ in chunk]), pad)
            ids, attn = ids.to(device), attn.to(device)
            seqs = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=samples_per_prompt,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            plen = ids.shape[1]
            comp = seqs[:, plen:]
            # completion mask: tokens up to and including the first eos
            is_eos = comp == eos
            after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
            cmask = ~after_eos  # generate() pads only after eos; a sampled pad id before it is a real token
            full_attn = torch.cat([attn.repeat_interleave(samples_per_prompt, 0), cmask.long()], 1)
            pos = (full_attn.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
            fwd = model(input_ids=seqs, attention_mask=full_attn, position_ids=pos, output_hidden_states=True)
            logits = fwd.logits[:, plen - 1 : -1].float()  # predicts completion tokens
            logprobs = torch.log_softmax(logits, -1)
            tlogp = logprobs.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
            tent = -(logprobs.exp() * logprobs).sum(-1)
            hs = torch.stack([h[:, plen:].float() for h in fwd.hidden_states], 2)  # (n, C, L+1, d)
            m = cmask.float()
            lens = m.sum(1).long()
            last_idx = lens - 1
            out["last"].append(hs[torch.arange(len(hs)), last_idx].half().cpu())
            out["mean"].append(((hs * m[:, :, None, None]).sum(1) / m.sum(1)[:, None, None]).half().cpu())
            texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
            for j, text in enumerate(texts):
                pid, _, answer = chunk[j // samples_per_prompt]
                try:
                    out["reward"].append(float(score(text, answer)))
                except NotImplementedError:  # no verifiable reward (e.g. ultrafeedback): states only
                    out["reward"].append(float("nan"))
                out["prompt_id"].append(pid)
                sel = cmask[j]
                out["mean_logp"].append(float(tlogp[j][sel].mean()))
                out["completion_len"].append(int(lens[j]))
                tok_logp.append(tlogp[j][sel].cpu())
                tok_ent.append(tent[j][sel].cpu())
                tok_sample.append(torch.full((int(sel.sum()),), n_done + j, dtype=torch.long))
                tok_id.append(comp[j][sel].cpu())
            n_done += len(texts)
    model.train(was_training)
    return {
        "last": torch.cat(out["last"]),
        "mean": torch.cat(out["mean"]),
        "reward": torch.tensor(out["reward"], dtype=torch.float32),
        "prompt_id": torch.tensor(out["prompt_id"], dtype=torch.long),
        "mean_logp": torch.tensor(out["mean_logp"], dtype=torch.float32),
        "completion_len": torch.tensor(out["completion_len"], dtype=torch.long),
        "token_logp": torch.cat(tok_logp).float(),
        "token_entropy": torch.cat(tok_ent).float(),
        "token_sample": torch.cat(tok_sample),
        "token_id": torch.cat(tok_id).long(),
    }
