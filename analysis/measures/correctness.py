"""Correctness direction from GRPO-style groups (docs/analysis.md; RepE/LAT, arXiv 2512.07404).

Input: the `diagnostics.activations` files (rlx/instruments/activations.py): per saved step, per sampled
probe completion, the per-layer state at the last completion token, its reward, its probe prompt (the
group) and the policy's mean token log-prob.

Per step and layer l, with correct = reward >= `threshold`, and probe prompts split in two halves
(even / odd rank of the prompt id: directions are fitted on one half and scored on the other):

- difference of means: v_dm = mean over mixed groups g of (mean_{i correct in g} h_i - mean_{i wrong in g} h_i);
- first PC: the first principal component of the correct-minus-wrong pair differences h_i+ - h_i- within
  mixed groups, each difference given a random sign before centring (RepE), then signed so that correct
  completions project higher on the fit half;
- read-out: AUROC of s(x) = <h_l(x), v> against `correct` on the held-out half, next to the AUROC of the
  policy's own mean log-prob ("knows vs says" gap = AUROC(s) - AUROC(logp));
- pairwise accuracy: P[s(i+) > s(i-)] (ties 1/2) over correct/wrong pairs within the held-out prompts'
  groups, free of between-prompt confounds; next to the same for the mean log-prob;
- drift: cos(v at this step, v at the first saved step).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import auroc, empty
from rlx import dumps

COLUMNS = [
    "step",
    "layer",
    "direction",
    "auroc",
    "auroc_logp",
    "gap",
    "pairwise_acc",
    "pairwise_acc_logp",
    "cos_to_first",
    "n_fit_groups",
    "n_eval",
    "accuracy",
]


def activation_steps(run: Run) -> list[tuple[int, dict[str, np.ndarray]]]:
    """[(step, tensors)] from the activations files, per-rank files concatenated, sorted by step."""
    by_step: dict[int, list] = {}
    for tf in run.read_tensors(dumps.ACTIVATIONS):
        step = int(tf.metadata.get("step", -1))
        by_step.setdefault(step, []).append(tf)
    out = []
    for step in sorted(by_step):
        parts = sorted(by_step[step], key=lambda t: t.rank)
        merged: dict[str, np.ndarray] = {}
        offset = 0
        for p in parts:
            for k, v in p.tensors.items():
                v = v + offset if k == "token_sample" else v
                merged.setdefault(k, []).append(v)  # type: ignore[arg-type]
            offset += len(p.tensors["reward"])
        out.append((step, {k: np.concatenate(v) for k, v in merged.items()}))
    return out


def _pc1_direction(diffs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    signs = rng.choice([-1.0, 1.0], size=len(diffs))[:, None]
    x = diffs * signs
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return vt[0]


def fit_directions(
    h: np.ndarray, correct: np.ndarray, groups: np.ndarray, seed: int = 0
) -> dict[str, np.ndarray]:
    """Directions (d,) from states `h` (N, d), boolean `correct` (N,) and group ids (N,); empty when no
    group has both correct and wrong completions."""
    means, diffs = [], []
    for g in np.unique(groups):
        sel = groups == g
        c, w = h[sel & correct], h[sel & ~correct]
        if len(c) == 0 or len(w) == 0:
            continue
        means.append(c.mean(0) - w.mean(0))
        diffs.append((c[:, None, :] - w[None, :, :]).reshape(-1, h.shape[1]))
    if not means:
        return {}
    v_dm = np.mean(means, 0)
    v_pc = _pc1_direction(np.concatenate(diffs), np.random.default_rng(seed)) if len(diffs) else v_dm
    # sign so that correct completions project higher on the fit data
    if (h[correct] @ v_pc).mean() < (h[~correct] @ v_pc).mean():
        v_pc = -v_pc
    unit = lambda v: v / (np.linalg.norm(v) + 1e-12)  # noqa: E731
    return {"diff_means": unit(v_dm), "pc1": unit(v_pc), "_n_groups": np.array(len(means))}


def pairwise_accuracy(scores: np.ndarray, correct: np.ndarray, groups: np.ndarray) -> float:
    """P[s(i+) > s(i-)] + P[tie]/2 over (correct, wrong) pairs of the same group; NaN without pairs."""
    wins, n = 0.0, 0
    for g in np.unique(groups):
        sel = groups == g
        c, w = scores[sel & correct], scores[sel & ~correct]
        if len(c) and len(w):
            diff = c[:, None] - w[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            n += diff.size
    return wins / n if n else float("nan")


def correctness_direction(
    run: Run, threshold: float = 1.0, pooling: str = "last", seed: int = 0
) -> pd.DataFrame:
    """Tidy table: one row per (step, layer, direction) with held-out AUROC, AUROC of mean log-prob,
    their gap, drift to the first step's direction, and the probe accuracy. Empty when the run saved no
    activations or no step had both correct and wrong completions of a prompt."""
    rows, first = [], {}
    for step, t in activation_steps(run):
        states = t[pooling].astype(np.float64)  # (N, L+1, d)
        correct = t["reward"] >= threshold
        groups = t["prompt_id"]
        uniq = np.unique(groups)
        fit_ids = set(uniq[::2].tolist())
        fit = np.array([g in fit_ids for g in groups])
        ev = ~fit
        auc_logp = auroc(t["mean_logp"][ev], correct[ev])
        pw_logp = pairwise_accuracy(t["mean_logp"][ev], correct[ev], groups[ev])
        for layer in range(states.shape[1]):
            h = states[:, layer]
            if not np.any(h.std(0) > 0):  # e.g. the embedding of a shared final (EOS) token: no information
                continue
            dirs = fit_directions(h[fit], correct[fit], groups[fit], seed=seed)
            n_groups = int(dirs.pop("_n_groups", 0))
            for name, v in dirs.items():
                auc = auroc(h[ev] @ v, correct[ev])
                pw = pairwise_accuracy(h[ev] @ v, correct[ev], groups[ev])
                key = (layer, name)
                first.setdefault(key, v)
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "direction": name,
                        "auroc": auc,
                        "auroc_logp": auc_logp,
                        "gap": auc - auc_logp,
                        "pairwise_acc": pw,
                        "pairwise_acc_logp": pw_logp,
                        "cos_to_first": float(v @ first[key]),
                        "n_fit_groups": n_groups,
                        "n_eval": int(ev.sum()),
                        "accuracy": float(correct.mean()),
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS) if rows else empty(COLUMNS)


def probe_accuracy(run: Run, threshold: float = 1.0) -> pd.DataFrame:
    """step, accuracy, mean_reward, mixed_groups (prompts with both correct and wrong samples), n."""
    rows = []
    for step, t in activation_steps(run):
        correct = t["reward"] >= threshold
        df = pd.DataFrame({"g": t["prompt_id"], "c": correct})
        mixed = int((df.groupby("g")["c"].nunique() == 2).sum())
        rows.append(
            {
                "step": step,
                "accuracy": float(correct.mean()),
                "mean_reward": float(t["reward"].mean()),
                "mixed_groups": mixed,
                "n": len(correct),
            }
        )
    cols = ["step", "accuracy", "mean_reward", "mixed_groups", "n"]
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)
