"""Training curves from metrics.jsonl: the TRL metrics every run logs."""

from __future__ import annotations

import pandas as pd

from analysis.loader import RunSet

# TRL names (GRPO: reward, kl, completions/mean_length; DPO: rewards/accuracies, rewards/margins). Entropy
# has its own report section (diagnostics/entropy.py).
STANDARD = (
    "reward",
    "reward_std",
    "loss",
    "grad_norm",
    "kl",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "completions/mean_length",
    "learning_rate",
)


def training_curves(runs: RunSet, names: tuple[str, ...] = STANDARD) -> pd.DataFrame:
    """Long table run, step, metric, value for the standard metrics each run logged (steps aligned)."""
    return runs.metrics(list(names))


def eval_summary(runs: RunSet) -> pd.DataFrame:
    """One row per run: algo, logged steps, last reward, and the before/after eval numbers when present."""
    rows = []
    for r in runs:
        row = {"run": r.label, "algo": r.algo, "recipe": r.recipe, "logged_steps": len(r.metrics)}
        row["last_step"] = int(r.metrics["step"].max()) if len(r.metrics) else None
        for m in ("reward", "rewards/accuracies", "loss"):
            s = r.metric(m)
            if s is not None:
                row[f"last_{m}"] = float(s.iloc[-1])
        sources = [(r.eval_before_after, "")] + [(v, f"{k}/") for k, v in r.evals.items()]
        for src, prefix in sources:
            if isinstance(src, dict):
                for k, v in _flatten(src).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and _headline(k):
                        row[prefix + k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _headline(key: str) -> bool:
    """Eval numbers worth a column: accuracies, pass@k, rewards, deltas (not counts or settings)."""
    return any(w in key for w in ("accuracy", "pass@", "reward", "delta"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
