"""Supervised warm start of the embedded model on a (deliberately imperfect) teacher's solutions, cached on disk.

The random tiny model is trained with next-token cross-entropy on `prompt + target + eos` (loss on the
target tokens only) for `warmstart.steps` AdamW steps. The target is the verified solution, except on a
`warmstart.teacher_bug_rate` fraction of problems where it is a systematically buggy solver's answer (for
arithmetic, the forgotten carry and smaller-from-larger subtraction): the base policy learns a structural flaw
next to partial competence, the situation RL with a verifiable reward is meant to repair (docs/tiny_rl.md).
The result is saved with `save_pretrained` (model and tokenizer) to `<cache>/warmstart/<key>/`, where key
hashes everything that determines it (model shape, task, warm-start settings, seed, code version), so every
later load is the real `from_pretrained` path and identical configs reuse it. Written to a temp dir and renamed, so a killed
build never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from rlx.embedded.model import build_model
from rlx.embedded.tokenizer import build_tokenizer
from rlx.tasks import get_task

WARMSTART_VERSION = 2


def cache_root(cfg) -> Path:
    return Path(cfg.warmstart.cache_dir or os.environ.get("RLX_CACHE") or Path.home() / ".cache" / "rlx")


def warmstart_key(cfg) -> str:
    ws = OmegaConf.to_container(cfg.warmstart)
    ws.pop("cache_dir", None)
    task = OmegaConf.to_container(cfg.task)
    blob = {
        "version": WARMSTART_VERSION,
        "model": OmegaConf.to_container(cfg.model.embedded),
        "task": task,
        "warmstart": ws,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _batches(tokenizer, rows: list[tuple[str, str]], batch_size: int, rng: random.Random):
    """Endless shuffled batches of (input_ids, attention_mask, labels), right padded, loss on the solution."""
    encoded = []
    for prompt, solution in rows:
        p = tokenizer(text=prompt)["input_ids"]
        s = tokenizer(text=solution)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p, s))
    while True:
        rng.shuffle(encoded)
        for i in range(0, len(encoded) - batch_size + 1, batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(p) + len(s) for p, s in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (p, s) in enumerate(chunk):
                seq = torch.tensor(p + s)
                ids[j, : len(seq)] = seq
                mask[j, : len(seq)] = 1
                labels[j, len(p) : len(seq)] = torch.tensor(s)
            yield ids, mask, labels


def teacher_rows(task, bug_rate: float, rng: random.Random) -> tuple[list[tuple[str, str]], int]:
    """(prompt, target) pairs for the warm start and how many targets are buggy.

    Each training problem's target is the task's `buggy_solution` with probability `bug_rate` (drawn once per
    problem, in dataset order, from `rng`), else its verified solution. Problems the bug does not affect, and
    tasks without a bug, keep the correct solution.
    """
    train = task.train_dataset()
    rows, num_buggy = [], 0
    for prompt, solution in zip(train["prompt"], train["solution"]):
        wrong = task.buggy_solution(prompt) if rng.random() < bug_rate else None
        rows.append((prompt, solution if wrong is None else wrong))
        num_buggy += wrong is not None
    return rows, num_buggy


def train_warmstart(cfg, out_dir: Path, progress: bool = True) -> dict:
    """Build the tiny model and tokenizer, run the SFT warm start, save both to `out_dir`. Returns stats."""
    tokenizer = build_tokenizer()
    model = build_model(cfg.model.embedded, tokenizer, seed=cfg.seed)
    task = get_task(cfg.task)
    ws = cfg.warmstart
    rng = random.Random(cfg.seed)
    rows, num_buggy = teacher_rows(task, ws.teacher_bug_rate, rng)
    opt = torch.optim.AdamW(
        model.parameters(), lr=ws.learning_rate, weight_decay=ws.weight_decay, betas=(0.9, 0.98)
    )
    warmup = max(1, ws.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (
                ws.min_lr_ratio
                + (1 - ws.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, ws.steps) / ws.steps))
            )
        ),
    )
    model.train()
    batches = _batches(tokenizer, rows, ws.batch_size, rng)
    torch.manual_seed(cfg.seed)
    t0, losses = time.time(), []
    bar = tqdm(range(ws.steps), desc="warm start (SFT)", disable=not progress)
    for _ in bar:
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stats = {
        "steps": ws.steps,
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "seconds": round(time.time() - t0, 2),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "task": cfg.task.name,
        "teacher_bug_rate": ws.teacher_bug_rate,
        "num_buggy_targets": num_buggy,
        "num_targets": len(rows),
    }
    (out_dir / "warmstart.json").write_text(json.dumps(stats, indent=1))
    return stats


def ensure_warm_started(cfg, progress: bool = True) -> Path:
    """Path of the warm-started embedded model for `cfg`, training and caching it on first use."""
    import fcntl

    final = cache_root(cfg) / "warmstart" / warmstart_key(cfg)
    if (final / "warmstart.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per key: concurrent runs (ranks, parallel jobs) wait for it instead of each training a copy.
    with open(final.with_name(f".{final.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "warmstart.json").exists():
            return final
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        train_warmstart(cfg, tmp, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return final
