"""pass@k over training, from the in-training evaluation (`eval.every`, rlx/eval_loop.py).

Input: `diagnostics/eval/step_NNNNNN.parquet` (every held-out completion: prompt_index, kind greedy|sample,
sample, reward, correct) and the `eval/*` metrics.

- `passk_curves`: unbiased pass@k for every k = 1..n (n samples per prompt) at every evaluated step;
- `crossing`: where the base policy (step 0) catches up with the trained one (last step): RL-trained policies
  often win at small k and lose at large k, the question of whether RL expands what the model can solve or
  only sharpens what it already could;
- `eval_over_steps`: the logged eval/* metrics per step.
"""

from __future__ import annotations

import pandas as pd

from analysis.loader import Run
from rlx.algorithms.passk import pass_at_k

INSTRUMENT = "eval"
CURVE_COLUMNS = ["step", "k", "pass_at_k", "num_prompts"]


def eval_samples(run: Run) -> pd.DataFrame | None:
    df = run.table(instrument=INSTRUMENT)
    return None if df is None or not len(df) else df


def passk_curves(run: Run) -> pd.DataFrame:
    """Rows (step, k, pass_at_k, num_prompts) for k = 1..n at every evaluated step with samples."""
    df = eval_samples(run)
    if df is None:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    rows = []
    sampled = df[df["kind"] == "sample"]
    for step, g in sampled.groupby("step"):
        per_prompt = g.groupby("prompt_index")["correct"].agg(["size", "sum"])
        n = int(per_prompt["size"].min())
        for k in range(1, n + 1):
            value = sum(pass_at_k(int(s), int(c), k) for s, c in zip(per_prompt["size"], per_prompt["sum"]))
            rows.append(
                {
                    "step": int(step),
                    "k": k,
                    "pass_at_k": value / len(per_prompt),
                    "num_prompts": len(per_prompt),
                }
            )
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def crossing(curves: pd.DataFrame, base_step: int | None = None, policy_step: int | None = None) -> dict:
    """Compare the base (default: first evaluated step) and the policy (default: last) over k.

    Returns base/policy pass@1 and pass@n, `policy_wins_at_1`, and `crossing_k`: the smallest k at which the
    base's pass@k is at least the policy's after the policy led at k = 1 (None when the curves never cross
    that way, e.g. the policy leads at every k, or never led).
    """
    if not len(curves):
        return {}
    steps = sorted(curves["step"].unique())
    base_step = steps[0] if base_step is None else base_step
    policy_step = steps[-1] if policy_step is None else policy_step
    b = curves[curves["step"] == base_step].set_index("k")["pass_at_k"]
    p = curves[curves["step"] == policy_step].set_index("k")["pass_at_k"]
    ks = sorted(set(b.index) & set(p.index))
    if not ks:
        return {}
    lead = p[ks[0]] > b[ks[0]]
    cross = next((k for k in ks if b[k] >= p[k]), None) if lead else None
    return {
        "base_step": int(base_step),
        "policy_step": int(policy_step),
        "n": int(ks[-1]),
        "base_pass@1": float(b[ks[0]]),
        "policy_pass@1": float(p[ks[0]]),
        f"base_pass@{ks[-1]}": float(b[ks[-1]]),
        f"policy_pass@{ks[-1]}": float(p[ks[-1]]),
        "policy_wins_at_1": bool(lead),
        "crossing_k": cross,
    }


def eval_over_steps(run: Run) -> pd.DataFrame:
    """Long table (step, metric, value) of the logged eval/* metrics."""
    cols = [c for c in run.metrics.columns if str(c).startswith("eval/")]
    if not cols:
        return pd.DataFrame(columns=["step", "metric", "value"])
    long = run.metrics[["step", *cols]].melt(id_vars="step", var_name="metric", value_name="value")
    return long.dropna().sort_values(["metric", "step"]).reset_index(drop=True)
