"""pass@k over training, from the in-training evaluation (`eval.every`, rlx/eval_loop.py).

Input: `diagnostics/eval/step_NNNNNN.parquet` (every held-out completion: prompt_index, kind greedy|sample,
sample, reward, correct, and from schema 2 `replay`: off for the plain evaluation, learnable | direct for the
Activation Replay pass of `eval.replay`) and the `eval/*` and `eval_replay/*` metrics.

- `passk_curves`: unbiased pass@k for every k = 1..n (n samples per prompt) at every evaluated step, of the
  plain evaluation (`replay="off"`, the default; files without a `replay` column are plain) or of a replay pass;
- `replay_curves`: the same for every replay pass in the run, with a `replay` column (empty without eval.replay);
- `replay_gain`: pass@k with and without replay side by side, and the gain (replay minus plain);
- `crossing`: where the base policy (step 0) catches up with the trained one (last step): RL-trained policies
  often win at small k and lose at large k, the question of whether RL expands what the model can solve or
  only sharpens what it already could;
- `eval_over_steps`: the logged eval/* and eval_replay/* metrics per step.
"""

from __future__ import annotations

import pandas as pd

from analysis.loader import Run
from rlx import dumps
from rlx.algorithms.passk import pass_at_k

INSTRUMENT = dumps.EVAL.instrument
CURVE_COLUMNS = ["step", "k", "pass_at_k", "num_prompts"]


def eval_samples(run: Run, replay: str | None = "off") -> pd.DataFrame | None:
    """The saved completions of one pass (`replay`: off, learnable, direct), or of every pass (None), with a
    `replay` column in every case (schema-1 files, which have none, are plain: off)."""
    df = run.read(dumps.EVAL)
    if df is None or not len(df):
        return None
    mode = df["replay"].fillna("off").astype(str) if "replay" in df.columns else "off"
    df = df.assign(replay=mode)
    if replay is not None:
        df = df[df["replay"] == replay]
    return df if len(df) else None


def replay_modes(run: Run) -> list[str]:
    """The Activation Replay passes (learnable, direct) saved beside the plain evaluation."""
    df = eval_samples(run, replay=None)
    return [] if df is None else sorted(m for m in df["replay"].unique() if m != "off")


def passk_curves(run: Run, replay: str = "off") -> pd.DataFrame:
    """Rows (step, k, pass_at_k, num_prompts) for k = 1..n at every evaluated step with samples, of the plain
    evaluation (default) or of the `replay` pass."""
    df = eval_samples(run, replay=replay)
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


def replay_curves(run: Run) -> pd.DataFrame:
    """`passk_curves` of every replay pass, stacked, with a `replay` column (the mode)."""
    frames = [passk_curves(run, replay=m).assign(replay=m) for m in replay_modes(run)]
    frames = [f for f in frames if len(f)]
    return (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*CURVE_COLUMNS, "replay"])
    )


def replay_gain(plain: pd.DataFrame | None, replayed: pd.DataFrame) -> pd.DataFrame:
    """(replay, step, k, plain, with_replay, gain) from `passk_curves` and `replay_curves` of one run."""
    cols = ["replay", "step", "k", "plain", "with_replay", "gain"]
    if plain is None or not len(plain) or not len(replayed):
        return pd.DataFrame(columns=cols)
    both = replayed.merge(plain[["step", "k", "pass_at_k"]], on=["step", "k"], suffixes=("", "_plain"))
    both = both.rename(columns={"pass_at_k": "with_replay", "pass_at_k_plain": "plain"})
    both["gain"] = both["with_replay"] - both["plain"]
    return both[cols].sort_values(["replay", "step", "k"]).reset_index(drop=True)


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
    """Long table (step, metric, value) of the logged eval/* and eval_replay/* metrics (results and cost)."""
    cols = [c for c in run.metrics.columns if str(c).startswith(("eval/", "eval_replay/"))]
    if not cols:
        return pd.DataFrame(columns=["step", "metric", "value"])
    long = run.metrics[["step", *cols]].melt(id_vars="step", var_name="metric", value_name="value")
    return long.dropna().sort_values(["metric", "step"]).reset_index(drop=True)
