"""A minimal HF-ordered training loop around the grad_alignment instrument (no TRL), for identity and DDP tests.

Event order follows transformers' Trainer and rlx's seam: on_step_begin -> micro-batches (on_loss, backward) ->
on_before_clip -> _clip_grad_norm -> on_pre_optimizer_step -> optimizer.step -> zero_grad -> global_step += 1 ->
on_step_end. The loss is a sigmoid DPO on pairs (rows [chosen; rejected]) of a tiny random Qwen2, a GRPO-like
loss with a k3 KL term, or a PPO clipped loss with token-level advantages whose rollouts last `rollout_steps`
optimizer steps (old log-probs equal the policy's on the first step of each rollout, and differ from them on the
others).
Run as a script under torchrun to get the 2-process DDP numbers: `python _alignment_harness.py OUT_DIR ALGO`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlx.config.schema import RunConfig
from rlx.instruments.base import LossContext
from rlx.instruments.grad_alignment import GradAlignment
from rlx.run import RunContext
from rlx.storage import DiagnosticsWriter

V, PAIRS, SEQ = 24, 8, 10


def tiny_model(
    seed: int = 0, dropout: float = 0.0, dtype=torch.float32, tie: bool = False
) -> Qwen2ForCausalLM:
    """A 4-block Qwen2 with vocab V, hidden 16 (shared by the alignment math and instrument tests)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        attention_dropout=dropout,
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(cfg).to(dtype)


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(2, V, (2 * PAIRS, SEQ), generator=g)
    ids[PAIRS:, :3] = ids[:PAIRS, :3]  # shared prompt
    mask = torch.zeros(2 * PAIRS, SEQ - 1)
    lens = torch.randint(5, SEQ, (2 * PAIRS,), generator=g)
    for i, L in enumerate(lens.tolist()):
        mask[i, 2:L] = 1
    adv = torch.randn(2 * PAIRS, generator=g)
    return ids, mask, adv


def write_target(path: Path) -> str:
    rows = [
        {"prompt_ids": [3, 4, 5], "completion_ids": [6, 7, 8, 9]},
        {"prompt_ids": [4, 5], "completion_ids": [10, 11, 2]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return f"responses:{path}"


class _Accel:
    def __init__(self, world):
        self.num_processes, self.device = world, torch.device("cpu")

    def unwrap_model(self, m):
        return m.module if hasattr(m, "module") else m


def token_logps(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def run(
    out: Path,
    algo: str = "dpo",
    steps: int = 3,
    ga: int = 1,
    every: int = 1,
    rank: int = 0,
    world: int = 1,
    dropout: float = 0.0,
    instrument: bool = True,
    fast: bool = True,
    kl: bool = True,
    rollout_steps: int = 1,
    targs: dict | None = None,
    is_weights: bool = False,
    **over,
):
    """Train `steps` optimizer steps; returns (instrument, checks, model).

    `targs` are extra trainer arguments (GRPOConfig names); the GRPO-like loss follows
    `use_bias_correction_kl` (KL times rho), and `is_weights` multiplies its surrogate by fixed per-token
    weights (as vLLM's importance-sampling correction does) without saying so in `targs`.

    checks[i] = (sum_t w_t <v, grad l_t>, <v, optimizer gradient>, head-only reference G) for a random v.
    """
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(dropout=dropout)
    model.train()
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    cfg = OmegaConf.structured(RunConfig)
    cfg.algo, cfg.output_dir = algo, str(out)
    ga_cfg = cfg.diagnostics.grad_alignment
    ga_cfg.enabled, ga_cfg.every, ga_cfg.layer_groups, ga_cfg.sketch_dim = True, every, 2, 1024
    ga_cfg.target = write_target(out / "target.jsonl")
    for k, v in over.items():
        setattr(ga_cfg, k, v)
    runctx = RunContext(
        cfg=cfg, run_dir=out, rank=rank, world_size=world, writer=DiagnosticsWriter(out, rank, world)
    )
    inst = GradAlignment(ga_cfg, runctx)
    inst.allow_fast = fast
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = SimpleNamespace(
        model=wrapped,
        accelerator=_Accel(world),
        state=SimpleNamespace(global_step=0),
        args=SimpleNamespace(
            max_grad_norm=0.5,
            gradient_accumulation_steps=ga,
            steps_per_generation=ga,
            num_iterations=rollout_steps,
            **(targs or {}),
        ),
        _metrics={"train": defaultdict(list)},
        rlx_algo=algo,
        processing_class=SimpleNamespace(pad_token_id=0, eos_token_id=1),
        beta=0.04 if (algo == "grpo" and kl) else 0.0,
    )
    trainer._clip_grad_norm = lambda m: torch.nn.utils.clip_grad_norm_(
        m.parameters(), trainer.args.max_grad_norm
    )
    if instrument:
        inst.on_train_begin(trainer)
    checks = []
    for step in range(steps):
        if instrument:
            inst.on_step_begin(trainer)
        ids, mask, adv = global_batch(step)
        # rank r takes pairs [r*P/W, (r+1)*P/W) (chosen and rejected rows); micro-batches split them further
        per = PAIRS // world
        local = list(range(rank * per, (rank + 1) * per))
        micro = [local[i * per // ga : (i + 1) * per // ga] for i in range(ga)]
        v = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + i))
            for i, p in enumerate(model.parameters())
        ]
        dv = 0.0
        cap = {}
        hook = model.model.register_forward_hook(
            lambda mod, a, o, c=cap: c.__setitem__("h", o.last_hidden_state)
        )
        for m, pairs in enumerate(micro):
            rows = pairs + [p + PAIRS for p in pairs]
            x, mk = ids[rows], mask[rows]
            if world > 1 and m < ga - 1:
                sync = wrapped.no_sync()
            else:
                sync = torch.enable_grad()
            with sync:
                lp = token_logps(wrapped, x)
                if algo == "dpo":
                    with torch.no_grad():
                        ref = lp.detach() - 0.03 * torch.arange(lp.shape[1]).float()
                    h = ((lp - ref) * mk).sum(-1)
                    n = len(pairs)
                    loss = -torch.nn.functional.logsigmoid(0.1 * (h[:n] - h[n:])).mean()
                    extras = {"pair_index": torch.cat([torch.arange(n), torch.arange(n)])}
                elif algo == "ppo":  # clipped PPO surrogate, token-level A, token-mean
                    a = torch.randn(mask.shape, generator=torch.Generator().manual_seed(200 + step))[rows]
                    with torch.no_grad():
                        old = lp.detach()
                        if step % rollout_steps:  # a later step of the rollout: off-policy
                            old = old - 0.15 * torch.cos(torch.arange(lp.numel()).float()).view_as(lp)
                    rho = torch.exp(lp - old)
                    per_tok = -torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)
                    loss = (per_tok * mk).sum() / mk.sum()
                    extras = {
                        "advantages": a,
                        "old_logps": old,
                        "ref_logps": None,
                        "completion_len": lp.shape[1],
                    }
                else:  # grpo-like 'bnpo' loss with k3 KL; advantages per sequence
                    a = adv[rows]
                    with torch.no_grad():
                        ref = lp.detach() + 0.1 * torch.cos(torch.arange(lp.numel()).float()).view_as(lp)
                    k3 = torch.exp(ref - lp) - (ref - lp) - 1
                    rho = torch.exp(lp - lp.detach())
                    if getattr(trainer.args, "use_bias_correction_kl", False):
                        k3 = k3 * rho
                    surrogate = -rho * a[:, None]
                    if is_weights:
                        surrogate = surrogate * (
                            1.0 + 0.5 * torch.sin(torch.arange(lp.numel()).float())
                        ).view_as(lp)
                    per_tok = surrogate + trainer.beta * k3
                    loss = (per_tok * mk).sum() / mk.sum()
                    extras = {
                        "advantages": a,
                        "ref_logps": ref if kl else None,
                        "completion_len": lp.shape[1],
                    }
                ctx = LossContext(
                    trainer=trainer,
                    algo=algo,
                    inputs={"input_ids": x},
                    loss=loss,
                    token_logps=lp,
                    mask=mk,
                    hidden=cap["h"],
                    extras=extras,
                )
                ctx.post_scale = 1.0 / ga
                if instrument:
                    inst.on_loss(ctx)
                w = ctx.token_weights() / ga
                gl = torch.autograd.grad(lp, list(model.parameters()), grad_outputs=w, retain_graph=True)
                dv += sum(float((a.double() * b.double()).sum()) for a, b in zip(v, gl))
                (loss / ga).backward()
        hook.remove()
        grad_v = sum(float((a.double() * p.grad.double()).sum()) for a, p in zip(v, model.parameters()))
        head_ref = float("nan")
        if instrument and inst.target is not None:
            from rlx.alignment.target import target_head_gradient

            gh, _ = target_head_gradient(model, model.model, inst.target)
            head_ref = float((gh.double() * model.lm_head.weight.grad.double()).sum())
        checks.append((dv, grad_v, head_ref))
        if instrument:
            inst.on_before_clip(trainer)  # as InstrumentedMixin._clip_grad_norm does before it clips
        trainer._clip_grad_norm(wrapped)
        if instrument:
            inst.on_pre_optimizer_step(trainer)
        opt.step()
        opt.zero_grad()
        trainer.state.global_step += 1
        if instrument:
            inst.on_step_end(trainer)
    if instrument:
        inst.on_train_end(trainer)
    return inst, checks, model


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out, algo = Path(sys.argv[1]), sys.argv[2]
    r, w = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    inst, _, _ = run(out, algo=algo, steps=2, rank=r, world=w, sketch_dim=16384)
    if r == 0:
        (out / "metrics.json").write_text(json.dumps(inst.last_metrics))
    dist.destroy_process_group()
    os._exit(0)
