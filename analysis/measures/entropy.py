"""Entropy dynamics beyond the mean.

Two sources, each optional:

- the probe completions of `diagnostics.activations` (per-token policy entropy and log-prob at each saved
  step): token-entropy quantiles, the high-entropy token fraction, and Cov(log pi, A) = mean_t
  (log pi_t - mean log pi)(A_t - mean A), the token-level covariance of Cui et al. (arXiv 2505.22617),
  with A_t the GRPO advantage of the token's completion, (r_i - mean_g r) / (std_g r + 1e-4) over its
  probe group. "High entropy" is a fixed threshold: the 80th percentile of token entropy at the first
  saved step (so that step reads 0.2 and later steps show whether the forking-token share moves);
- `metrics.jsonl`: whatever the trainer and regularizers logged with "entropy" or "cov" in the name
  (TRL's mean `entropy`, Clip-Cov/KL-Cov statistics).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import empty
from analysis.measures.correctness import activation_steps

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
COLUMNS = [
    "step",
    "n_tokens",
    "entropy_mean",
    *[f"entropy_q{int(q * 100)}" for q in QUANTILES],
    "high_entropy_threshold",
    "high_entropy_frac",
    "cov_logp_adv",
    "mean_reward",
]


def group_advantages(reward: np.ndarray, groups: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages (r - mean_g) / (std_g + eps), with TRL's unbiased group std (ddof=1)."""
    adv = np.zeros_like(reward, dtype=np.float64)
    for g in np.unique(groups):
        sel = groups == g
        r = reward[sel].astype(np.float64)
        std = r.std(ddof=1) if len(r) > 1 else 0.0
        adv[sel] = (r - r.mean()) / (std + eps)
    return adv


def token_covariance(token_logp: np.ndarray, token_adv: np.ndarray) -> float:
    """Cov(log pi, A) over tokens: mean((l - mean l)(A - mean A))."""
    if len(token_logp) == 0:
        return float("nan")
    return float(np.mean((token_logp - token_logp.mean()) * (token_adv - token_adv.mean())))


def entropy_dynamics(run: Run, high_quantile: float = 0.8) -> pd.DataFrame:
    """One row per saved activations step (see module doc); empty without `diagnostics.activations`."""
    rows, threshold = [], None
    for step, t in activation_steps(run):
        ent = t["token_entropy"].astype(np.float64)
        if not len(ent):
            continue
        if threshold is None:
            threshold = float(np.quantile(ent, high_quantile))
        adv = group_advantages(t["reward"], t["prompt_id"])
        row = {
            "step": step,
            "n_tokens": len(ent),
            "entropy_mean": float(ent.mean()),
            **{f"entropy_q{int(q * 100)}": float(np.quantile(ent, q)) for q in QUANTILES},
            "high_entropy_threshold": threshold,
            "high_entropy_frac": float((ent > threshold).mean()),
            "cov_logp_adv": token_covariance(t["token_logp"].astype(np.float64), adv[t["token_sample"]]),
            "mean_reward": float(t["reward"].mean()),
        }
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS) if rows else empty(COLUMNS)


def entropy_metrics(run: Run) -> pd.DataFrame:
    """Long table (step, metric, value) of logged metrics whose name mentions entropy or cov."""
    m = run.metrics
    cols = [c for c in m.columns if c != "step" and ("entropy" in c.lower() or "cov" in c.lower())]
    if not cols:
        return empty(["step", "metric", "value"])
    long = m[["step", *cols]].melt(id_vars="step", var_name="metric", value_name="value").dropna()
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    return long.dropna().reset_index(drop=True)
