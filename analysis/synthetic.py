"""Synthetic run directories written through the real `DiagnosticsWriter` (tests, docs, notebook smoke runs).

`make_run(path, algo, ...)` writes config.yaml, metrics.jsonl, eval_before_after.json and, on request,
the files each instrument writes, each through its declaration in `rlx.dumps` (so a fixture cannot drift from
what the writers emit), with planted structure the analyses must recover (e.g. a correctness
direction along a known axis, positive G for DPO, a low-entropy-heavy activation shift).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rlx import dumps
from rlx.config.schema import RunConfig
from rlx.storage import DiagnosticsWriter


def make_run(
    path: str | Path,
    algo: str = "grpo",
    steps: int = 10,
    *,
    grad_alignment: bool = False,
    relax: bool = False,
    activations: bool = False,
    activation_shift: bool = False,
    world_size: int = 1,
    seed: int = 0,
    recipe: str | None = None,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cfg = OmegaConf.structured(RunConfig)
    cfg.algo, cfg.recipe, cfg.output_dir = algo, recipe or f"synthetic_{algo}", str(path)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with open(path / "metrics.jsonl", "w") as fh:
        for s in range(1, steps + 1):
            row = {
                "step": s,
                "loss": float(1 / s),
                "grad_norm": float(1 + rng.random()),
                "learning_rate": 1e-5,
            }
            if algo == "grpo":
                row.update(reward=float(0.3 + 0.05 * s), entropy=float(2.0 - 0.1 * s), kl=float(0.01 * s))
                if relax:
                    row["relax/dsd_mean"] = float(1 + s)
            else:
                row.update({"rewards/accuracies": min(1.0, 0.5 + 0.05 * s), "rewards/margins": 0.1 * s})
            fh.write(json.dumps(row) + "\n")
    ba = {
        "before": {"greedy_accuracy": 0.4, "num_prompts": 200},
        "after": {"greedy_accuracy": 0.55, "num_prompts": 200},
    }
    (path / "eval_before_after.json").write_text(json.dumps(ba))
    for rank in range(world_size):
        w = DiagnosticsWriter(path, rank=rank, world_size=world_size)
        per_rank = world_size > 1
        if grad_alignment and rank == 0:
            _grad_alignment(w, algo, steps, rng)
        if relax:
            _relax(w, steps, rng, per_rank)
        if activations:
            _activations(w, steps, rng, rank, world_size)
        if activation_shift and rank == 0:
            _activation_shift(w, rng)
    return path


def _grad_alignment(w: DiagnosticsWriter, algo: str, steps: int, rng) -> None:
    """The layout of rlx/instruments/grad_alignment/: one table shard and one sketch file per logged step."""
    for s in range(1, steps + 1):
        rows = []
        if algo == "dpo":
            pos, neg, kl = 1.0 / s + 0.2, 0.1 * s / steps, 0.0
        else:
            pos, neg, kl = 0.3 * rng.standard_normal() + 0.1, -0.3 * rng.standard_normal(), 0.01
        total = pos + neg + kl
        top, mid = 0.6 * total + 0.05 * rng.standard_normal(), 0.3 * total
        base = {
            "step": s,
            "target": "heldout_chosen",
            "variant": "param",
            "norm_target": 2.0,
            "R_T": 1.0,
        }
        cpn = float(np.tanh(rng.standard_normal()))
        rows.append(
            {
                **base,
                "component": "total",
                "G": total,
                "cos": float(np.tanh(total)),
                "norm": abs(total) + 1,
                "n_tokens": 100.0,
                "drift": float("nan") if s == 1 else 0.5,
            }
        )
        for comp, G in (("pos", pos), ("neg", neg), ("kl", kl)):
            rows.append(
                {
                    **base,
                    "component": comp,
                    "G": G,
                    "cos": float(np.tanh(G)),
                    "norm": abs(G) + 1,
                    "n_tokens": 50.0,
                    "cos_pos_neg": cpn if comp != "kl" else float("nan"),
                }
            )
        for comp, G in (("top", top), ("mid", mid), ("bot", total - top - mid)):
            rows.append(
                {
                    **base,
                    "component": comp,
                    "G": G,
                    "cos": float("nan"),
                    "norm": float("nan"),
                    "n_tokens": 33.0,
                }
            )
        rows.append(
            {
                **base,
                "component": "other",
                "G": 0.0,
                "cos": float("nan"),
                "norm": float("nan"),
                "n_tokens": 0.0,
            }
        )
        for g, share in (("embed", 0.1), ("blocks0-1", 0.5), ("blocks2-3", 0.3), ("head", 0.1)):
            rows.append(
                {
                    **base,
                    "component": f"layer:{g}",
                    "G": share * total,
                    "cos": float(np.tanh(share * total)),
                    "norm": 1.0,
                    "n_tokens": 100.0,
                }
            )
        rows.append(
            {
                **base,
                "component": "update",
                "G": 0.8 * total,
                "cos": 0.1,
                "norm": 0.01,
                "n_tokens": 100.0,
                "delta_R": -0.01 * total,
            }
        )
        offset = 2.0 if algo == "dpo" else 0.0
        sk = {
            f"loss/{s:06d}": torch.tensor(rng.standard_normal(64) + offset, dtype=torch.float16),
            f"target/{s:06d}": torch.tensor(rng.standard_normal(64), dtype=torch.float16),
        }
        w.write(dumps.GRAD_ALIGNMENT_SKETCHES, sk, step=s, metadata={"step": str(s)}, description="synthetic")
        w.write(dumps.GRAD_ALIGNMENT, rows, step=s, description="synthetic")


def _relax(w: DiagnosticsWriter, steps: int, rng, per_rank: bool) -> None:
    """The layout of rlx/instruments/relax.py: per step a trajectory shard and the full spectra (one micro-batch
    of 16 trajectories per rank)."""
    for s in range(1, steps + 1):
        adv = rng.standard_normal(16)
        dsd = np.exp(rng.standard_normal(16)) * (1 + s)
        rows = [
            {
                "step": s,
                "micro_step": 0,
                "index": i,
                "sample_id": -1,
                "group_id": i // 4,
                "advantage": float(a),
                "a": float(max(a, 0.0)),
                "length": 8,
                "dsd": float(d),
                "masked": bool(d > 8 and a > 0),
                "xi": 8.0,
            }
            for i, (d, a) in enumerate(zip(dsd, adv))
        ]
        w.write(dumps.RELAX_TRAJECTORIES, rows, step=s, per_rank=per_rank, description="synthetic")
        sv = np.sort(np.abs(rng.standard_normal((16, 10))) * (1 + s / steps), axis=1)[:, ::-1].copy()
        w.write(
            dumps.RELAX_SPECTRA,
            {
                "singular_values": torch.tensor(sv, dtype=torch.float32),
                "step": torch.full((16,), s),
                "micro_step": torch.zeros(16, dtype=torch.long),
                "index": torch.arange(16),
                "dsd": torch.tensor(dsd, dtype=torch.float32),
            },
            step=s,
            per_rank=per_rank,
            metadata={"step": str(s), "spectrum": "svd"},
            description="synthetic",
        )
    if w.rank == 0:  # two dictionary fits with decaying residuals (schema 2 of dictionary_fit.json)
        fits = []
        for fit_step in (0, 50):
            losses = (2.0 * np.exp(-np.arange(32) / 12) + 0.1 * rng.random(32) + 1).tolist()
            fits.append(
                {
                    "fit_step": fit_step,
                    "n_trajectories": 64,
                    "world_size": 2 if per_rank else 1,
                    "adam_steps": 32,
                    "lr": 1e-3,
                    "loss_before": losses[0],
                    "loss_after": losses[-1],
                    "weight_change": 0.3,
                    "seconds": 0.1,
                    "losses": losses,
                }
            )
        w.write(
            dumps.RELAX_DICTIONARY_FIT, {"xi": 8.0, "xi_median": 0.32, "fits": fits}, description="synthetic"
        )


def _activations(
    w: DiagnosticsWriter, steps: int, rng, rank: int, world_size: int, layers: int = 3, d: int = 8
) -> None:
    prompts = list(range(rank, 16, world_size))
    axis = np.zeros(d)
    axis[0] = 1.0
    for s in (0, steps // 2, steps):
        n_per = 4
        pid = np.repeat(prompts, n_per)
        reward = (rng.random(len(pid)) < 0.5).astype(np.float32)
        h = rng.standard_normal((len(pid), layers + 1, d))
        for layer in range(1, layers + 1):  # correctness readable from layer 1 on, strongest late
            h[:, layer] += np.outer(2 * reward - 1, axis) * layer
        lens = rng.integers(2, 6, len(pid))
        tok_sample = np.repeat(np.arange(len(pid)), lens)
        w.write(
            dumps.ACTIVATIONS,
            {
                "last": torch.tensor(h, dtype=torch.float16),
                "mean": torch.tensor(h * 0.5, dtype=torch.float16),
                "reward": torch.tensor(reward),
                "prompt_id": torch.tensor(pid, dtype=torch.long),
                "mean_logp": torch.tensor(rng.standard_normal(len(pid)), dtype=torch.float32),
                "completion_len": torch.tensor(lens, dtype=torch.long),
                "token_logp": torch.tensor(-rng.random(len(tok_sample)) * (1 + s), dtype=torch.float32),
                "token_entropy": torch.tensor(
                    rng.random(len(tok_sample)) * 3 / (1 + 0.1 * s), dtype=torch.float32
                ),
                "token_sample": torch.tensor(tok_sample, dtype=torch.long),
                "token_id": torch.tensor(rng.integers(0, 32, len(tok_sample)), dtype=torch.long),
            },
            step=s,
            description="synthetic",
            metadata={"step": str(s), "pooling": "last,mean", "num_layers": str(layers)},
            per_rank=world_size > 1,
        )


def _activation_shift(w: DiagnosticsWriter, rng) -> None:
    """The bucket table of `python -m rlx.replay.analysis` (absolute bucketing, 4 buckets)."""
    rows = []
    edges = [0.0, 1.0, 2.0, 3.0, 4.5]
    for layer in range(4):
        for b in range(4):
            rows.append(
                {
                    "schema_version": dumps.REPLAY_KL_BUCKETS.version,
                    "layer": layer,
                    "bucket": b,
                    "bucketing": "absolute",
                    "bucket_lo": edges[b],
                    "bucket_hi": edges[b + 1],
                    "entropy_lo": edges[b],
                    "entropy_hi": edges[b + 1],
                    "n_positions": 50,
                    "kl_mean": float((4 - b) * 0.1 * (1 + layer) + 0.01 * rng.random()),
                    "base_model": "base",
                    "rl_model": "rl",
                }
            )
    w.write(dumps.REPLAY_KL_BUCKETS, rows, description="synthetic")
