"""Frozen linear probe scores over training, by reward bucket (docs/probes.md, `probes`).

Input: the `probes` instrument's rows (`rlx.dumps.PROBES`: sample_id, step, probe, score, reward), one per rollout
and probe at each scored step; without them, its logged metrics `probes/<name>/{mean,mean_correct,mean_wrong,auroc}`.

- `score_over_steps`: per step, probe and bucket (all / correct / wrong, correct = reward >= the run's
  `diagnostics.probes.threshold`), n, the mean score and its 10-90% quantiles;
- `probe_auroc`: per step and probe, the AUROC of the score against `correct` (P[s(correct) > s(wrong)], ties 1/2).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import auroc, empty
from rlx import dumps

INSTRUMENT = dumps.PROBES.instrument
BUCKETS = ("all", "correct", "wrong")
SCORE_COLUMNS = ["step", "probe", "bucket", "n", "mean", "q10", "q90"]
AUROC_COLUMNS = ["step", "probe", "auroc", "n_correct", "n_wrong"]
_METRIC = re.compile(r"^probes/(.+)/(mean|mean_correct|mean_wrong|auroc)$")
_BUCKET_OF = {"mean": "all", "mean_correct": "correct", "mean_wrong": "wrong"}


def scores(run: Run) -> pd.DataFrame | None:
    """Per rollout and probe rows (`rlx.dumps.PROBES`); None when not recorded."""
    df = run.read(dumps.PROBES)
    return df if df is not None and len(df) else None


def threshold(run: Run) -> float:
    """The run's correct / wrong reward threshold (`diagnostics.probes.threshold`, default 1.0)."""
    return float(run.cfg("diagnostics.probes.threshold", 1.0))


def _buckets(df: pd.DataFrame, thr: float) -> dict[str, np.ndarray]:
    reward = df["reward"].to_numpy(float)
    ok = np.isfinite(reward)
    return {"all": np.ones(len(df), bool), "correct": ok & (reward >= thr), "wrong": ok & (reward < thr)}


def _logged(run: Run) -> dict[tuple[str, str], pd.Series]:
    out = {}
    for col in run.metrics.columns:
        m = _METRIC.match(str(col))
        if m:
            s = run.metric(col)
            if s is not None:
                out[(m.group(1), m.group(2))] = s
    return out


def score_over_steps(run: Run) -> pd.DataFrame:
    """step, probe, bucket (all | correct | wrong), n, mean, q10, q90 of the finite scores. From the logged means
    when the rows are absent (n and quantiles NaN)."""
    df = scores(run)
    out = []
    if df is not None:
        sel = _buckets(df, threshold(run))
        for bucket in BUCKETS:
            for (step, probe), g in df[sel[bucket]].groupby(["step", "probe"]):
                s = g["score"].to_numpy(float)
                s = s[np.isfinite(s)]
                out.append(
                    {
                        "step": int(step),
                        "probe": str(probe),
                        "bucket": bucket,
                        "n": len(s),
                        "mean": float(s.mean()) if len(s) else np.nan,
                        "q10": float(np.quantile(s, 0.1)) if len(s) else np.nan,
                        "q90": float(np.quantile(s, 0.9)) if len(s) else np.nan,
                    }
                )
    else:
        for (probe, key), s in _logged(run).items():
            if key in _BUCKET_OF:
                out += [
                    {"step": int(k), "probe": probe, "bucket": _BUCKET_OF[key], "n": np.nan, "mean": float(v)}
                    for k, v in s.items()
                ]
    if not out:
        return empty(SCORE_COLUMNS)
    return (
        pd.DataFrame(out, columns=SCORE_COLUMNS)
        .sort_values(["probe", "bucket", "step"])
        .reset_index(drop=True)
    )


def probe_auroc(run: Run) -> pd.DataFrame:
    """step, probe, auroc (score vs correct over rollouts with a reward and a finite score; NaN when a class is
    empty), n_correct, n_wrong. From the logged `probes/<name>/auroc` when the rows are absent."""
    df = scores(run)
    out = []
    if df is not None:
        thr = threshold(run)
        for (step, probe), g in df.groupby(["step", "probe"]):
            b = _buckets(g, thr)
            s = g["score"].to_numpy(float)
            keep = np.isfinite(s) & (b["correct"] | b["wrong"])
            out.append(
                {
                    "step": int(step),
                    "probe": str(probe),
                    "auroc": auroc(s[keep], b["correct"][keep]),
                    "n_correct": int((keep & b["correct"]).sum()),
                    "n_wrong": int((keep & b["wrong"]).sum()),
                }
            )
    else:
        for (probe, key), s in _logged(run).items():
            if key == "auroc":
                out += [{"step": int(k), "probe": probe, "auroc": float(v)} for k, v in s.items()]
    if not out:
        return empty(AUROC_COLUMNS)
    return pd.DataFrame(out, columns=AUROC_COLUMNS).sort_values(["probe", "step"]).reset_index(drop=True)
