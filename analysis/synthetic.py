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
    hidden_rank: bool = False,
    probes: bool = False,
    h_neurons: bool = False,
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
        if hidden_rank and rank == 0:
            _hidden_rank(w, steps, np.random.default_rng(seed + 1017))
        if probes and rank == 0:
            _probes(w, steps, np.random.default_rng(seed + 2017))
        if h_neurons and rank == 0:
            _h_neurons(w, steps, np.random.default_rng(seed + 3017))
    return path


def _hidden_rank(w: DiagnosticsWriter, steps: int, rng) -> None:
    """The layout of rlx/instruments/hidden_rank.py (every=2): per measured step one shard of 32 rollouts; correct
    rollouts planted with a higher effective rank that grows over training."""
    for s in [1, *range(2, steps + 1, 2)]:
        reward = (rng.random(32) < 0.5).astype(float)
        erank = 2.0 + 0.1 * s + reward + 0.2 * rng.standard_normal(32)
        rows = [
            {"sample_id": (s << 32) | i, "step": s, "reward": float(r), "length": 12, "erank": float(e)}
            | {"d1": float(0.3 * e + 0.05 * rng.standard_normal()), "d2": float(0.01 * rng.standard_normal())}
            | {"n_prefixes": 11}
            for i, (r, e) in enumerate(zip(reward, erank))
        ]
        w.write(dumps.HIDDEN_RANK, rows, step=s, description="synthetic")


def _probes(w: DiagnosticsWriter, steps: int, rng) -> None:
    """The layout of rlx/instruments/probes.py (every=1, two probes): `planted` separates correct from wrong
    rollouts more over training, `noise` does not."""
    for s in range(1, steps + 1):
        reward = (rng.random(32) < 0.5).astype(float)
        rows = []
        for probe, gap in (("planted", 0.3 * s), ("noise", 0.0)):
            score = gap * reward + rng.standard_normal(32)
            rows += [
                {"sample_id": (s << 32) | i, "step": s, "probe": probe, "score": float(x), "reward": float(r)}
                for i, (x, r) in enumerate(zip(score, reward))
            ]
        w.write(dumps.PROBES, rows, step=s, description="synthetic")


def _h_neurons(w: DiagnosticsWriter, steps: int, rng) -> None:
    """The layout of rlx/instruments/h_neurons.py (every=2, refit_every=4, L=4, m=512): step-1 fit of a 20-neuron
    H0 whose CETT mass is higher on wrong rollouts than on correct ones (control sets below), a gradient share
    about 5x chance (activation-matched sets 3x), and refits that keep half of H0 (Jaccard 1/3, far above chance)."""
    n_neurons, width = 2048, 512
    h0 = np.sort(rng.choice(n_neurons, 20, replace=False))
    for s in [1, *range(2, steps + 1, 2)]:
        reward = (rng.random(32) < 0.5).astype(float)
        mass = 0.2 + 0.1 * (reward == 0) + 0.02 * rng.standard_normal(32)
        rollouts = [
            {
                "step": s,
                "sample_id": (s << 32) | i,
                "group_id": i // 8,
                "reward": float(r),
                "wrong": bool(r < 1),
            }
            | {"n_answer_tokens": 2, "n_other_tokens": 6, "mass": float(m), "mass_other": 0.08}
            | {"mass_random": 0.03, "mass_matched": 0.15, "score": float(10 * (m - 0.25))}
            | {"used_in_fit": True if s == 1 else None}
            for i, (r, m) in enumerate(zip(reward, mass))
        ]
        w.write(dumps.H_NEURONS_ROLLOUTS, rollouts, step=s, description="synthetic")
        share = {"grad_share_down": 0.05, "grad_share_mlp": 0.04, "grad_share_down_random": 0.01}
        share |= {"grad_share_mlp_random": 0.01, "grad_share_chance": 20 / n_neurons}
        share |= {"grad_share_down_matched": 0.03, "grad_share_mlp_matched": 0.03}
        rows = []
        for b, sel in (("all", reward >= 0), ("correct", reward >= 1), ("wrong", reward < 1)):
            row = {"step": s, "bucket": b, "n_rollouts": int(sel.sum()), "set_size": 20.0}
            row |= {
                "mass": float(mass[sel].mean()),
                "mass_sem": 0.005,
                "mass_random": 0.03,
                "mass_other": 0.08,
                "mass_matched": 0.15,
            }
            if b == "all":
                row |= {"auroc": 0.8 - 0.02 * s, "auroc_mass": 0.7, **share}
            rows.append(row)
        w.write(dumps.H_NEURONS_STEPS, rows, step=s, description="synthetic")
        if s == 1 or s % 4 == 0:
            hs = (
                h0 if s == 1 else np.sort(np.concatenate([h0[:10], rng.choice(n_neurons, 10, replace=False)]))
            )
            fit = {"step": s, "fit": "full", "C": 10.0, "data": "consistent", "note": "", "n_rollouts": 32}
            fit |= {"set_size": len(hs), "converged": True, "split_jaccard": 0.25}
            if s > 1:
                inter = len(set(hs) & set(h0))
                e = len(hs) * len(h0) / n_neurons
                fit |= {
                    "jaccard": inter / len(set(hs) | set(h0)),
                    "overlap": inter / 20,
                    "cross_jaccard": 0.2,
                }
                fit |= {"jaccard_chance": e / (40 - e), "overlap_chance": e / 20}
            w.write(dumps.H_NEURONS_FITS, [fit], step=s, description="synthetic")
            neurons = [
                {"step": s, "fit": "full", "layer": int(j // width), "neuron": int(j % width), "weight": 1.0}
                | {"in_set": True}
                for j in hs
            ]
            w.write(dumps.H_NEURONS_SET, neurons, step=s, description="synthetic")


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
