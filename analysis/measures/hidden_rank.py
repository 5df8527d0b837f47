"""Effective rank of the last hidden states over the response, by reward bucket (docs/probes.md, `hidden_rank`).

Input: the `hidden_rank` instrument's per-rollout rows (`rlx.dumps.HIDDEN_RANK`: sample_id, step, reward, length,
erank, d1, d2, n_prefixes); without them, its logged metrics `hidden_rank/<v>[_correct|_wrong]`.

- `rank_over_steps`: per step and bucket (all / correct / wrong, correct = reward >= the run's
  `diagnostics.hidden_rank.threshold`), the mean erank with its 10-90% quantiles and the mean d1, d2;
- `rank_and_dsd`: the mean erank of all rollouts next to ReLaX's mean DSD per step (the `relax` measure), for runs
  that have both (an outer join on the step).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures import relax
from analysis.measures._util import empty
from rlx import dumps

INSTRUMENT = dumps.HIDDEN_RANK.instrument
VALUES = ("erank", "d1", "d2")
BUCKETS = ("all", "correct", "wrong")
COLUMNS = ["step", "bucket", "n", "erank", "erank_q10", "erank_q90", "d1", "d2"]
_METRIC = re.compile(r"^hidden_rank/(erank|d1|d2)(?:_(correct|wrong))?$")


def rows(run: Run) -> pd.DataFrame | None:
    """Per-rollout rows (`rlx.dumps.HIDDEN_RANK`); None when not recorded."""
    df = run.read(dumps.HIDDEN_RANK)
    return df if df is not None and len(df) else None


def threshold(run: Run) -> float:
    """The run's correct / wrong reward threshold (`diagnostics.hidden_rank.threshold`, default 1.0)."""
    return float(run.cfg("diagnostics.hidden_rank.threshold", 1.0))


def _finite_mean(x: pd.Series) -> float:
    v = x.to_numpy(float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else np.nan


def rank_over_steps(run: Run) -> pd.DataFrame:
    """step, bucket (all | correct | wrong), n (rollouts), erank, erank_q10, erank_q90, d1, d2 (means over the
    bucket's rollouts with a finite value). From the logged metrics when the rows are absent (n and quantiles NaN)."""
    df = rows(run)
    out = []
    if df is not None:
        thr = threshold(run)
        reward = df["reward"].to_numpy(float)
        ok = np.isfinite(reward)
        sel = {"all": np.ones(len(df), bool), "correct": ok & (reward >= thr), "wrong": ok & (reward < thr)}
        for bucket in BUCKETS:
            sub = df[sel[bucket]]
            for step, g in sub.groupby("step"):
                e = g["erank"].to_numpy(float)
                e = e[np.isfinite(e)]
                out.append(
                    {
                        "step": int(step),
                        "bucket": bucket,
                        "n": len(g),
                        "erank": float(e.mean()) if len(e) else np.nan,
                        "erank_q10": float(np.quantile(e, 0.1)) if len(e) else np.nan,
                        "erank_q90": float(np.quantile(e, 0.9)) if len(e) else np.nan,
                        "d1": _finite_mean(g["d1"]),
                        "d2": _finite_mean(g["d2"]),
                    }
                )
        if not out:
            return empty(COLUMNS)
        return pd.DataFrame(out, columns=COLUMNS).sort_values(["bucket", "step"]).reset_index(drop=True)
    by: dict[tuple[int, str], dict] = {}
    for col in run.metrics.columns:
        m = _METRIC.match(str(col))
        if not m:
            continue
        value, bucket = m.group(1), m.group(2) or "all"
        s = run.metric(col)
        for step, v in [] if s is None else s.items():
            by.setdefault((int(step), bucket), {"step": int(step), "bucket": bucket, "n": np.nan})[value] = (
                float(v)
            )
    if not by:
        return empty(COLUMNS)
    return (
        pd.DataFrame(list(by.values()), columns=COLUMNS)
        .sort_values(["bucket", "step"])
        .reset_index(drop=True)
    )


def rank_and_dsd(run: Run) -> pd.DataFrame:
    """step, erank (mean over all rollouts), dsd (ReLaX's mean DSD over all trajectories): both series of a run
    on the steps either was recorded at; empty unless the run has both."""
    cols = ["step", "erank", "dsd"]
    rank = rank_over_steps(run)
    dsd = relax.dsd_over_steps(run)
    if not len(rank) or not len(dsd):
        return empty(cols)
    a = rank[rank["bucket"] == "all"][["step", "erank"]]
    b = dsd[dsd["subset"] == "all"][["step", "mean"]].rename(columns={"mean": "dsd"})
    return a.merge(b, on="step", how="outer").sort_values("step").reset_index(drop=True)[cols]
