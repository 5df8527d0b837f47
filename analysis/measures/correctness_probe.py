"""The `correctness_probe` monitor's dumps (rlx/instruments/correctness_probe.py; docs/probes.md).

Input: `rlx.dumps.CORRECTNESS_PROBE` (one row per measured training step and layer: held-out AUROC of the
correctness direction <h, v> at the answer-final token, AUROC of the policy's mean log-prob, their gap, drift to the
first direction, alignment of the loss gradient on the residual stream with v), `CORRECTNESS_PROBE_SCORES` (per
rollout and layer: score, correct, mean log-prob, fit / held-out half) and `CORRECTNESS_PROBE_DIRECTIONS`. Without
the table, the logged `correctness_probe/L{l}/*` metrics of metrics.jsonl.

Unlike `correctness` (which reads `diagnostics.activations`, a fixed probe set re-encoded at saved steps), these
are the training rollouts of each measured step, read off the loss forward.

- `correctness_probe`: the per (step, layer) table;
- `best_of_n`: per step and layer, the share of held-out prompts whose top-scored rollout is correct, picking by the
  probe score, by the mean log-prob, at random (the mean accuracy) and by an oracle (any rollout correct);
- `direction_drift`: per layer, cos of each step's fitted direction with the first one and with the previous one.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import empty
from rlx import dumps

COLUMNS = dumps.CORRECTNESS_PROBE.columns
METRIC = re.compile(r"^correctness_probe/L(\d+)/(\w+)$")
STEP_METRICS = ("auroc_logp", "pairwise_acc_logp", "accuracy", "n_fit_groups", "n_eval")


def _from_metrics(run: Run) -> pd.DataFrame:
    """The per-layer metrics of metrics.jsonl as table rows (the columns the logger carries; others NaN)."""
    m = run.metrics
    if m is None or not len(m) or "step" not in m.columns:
        return empty(COLUMNS)
    rows = []
    per_layer = {}
    for col in m.columns:
        hit = METRIC.match(str(col))
        if hit:
            per_layer.setdefault(int(hit.group(1)), []).append((hit.group(2), col))
    for layer, cols in sorted(per_layer.items()):
        for _, r in m.iterrows():
            vals = {k: r[c] for k, c in cols}
            if all(pd.isna(v) for v in vals.values()):
                continue
            row = {"step": int(r["step"]), "layer": layer, **vals}
            for k in STEP_METRICS:
                col = f"correctness_probe/{k}"
                if col in m.columns:
                    row[k] = r[col]
            rows.append(row)
    if not rows:
        return empty(COLUMNS)
    return pd.DataFrame(rows).reindex(columns=COLUMNS).sort_values(["step", "layer"], ignore_index=True)


def correctness_probe(run: Run) -> pd.DataFrame:
    """One row per (measured step, layer) with the dump's columns (`rlx.dumps.CORRECTNESS_PROBE`), sorted; from the
    logged metrics when the run wrote no table; empty when the monitor was off."""
    df = run.read(dumps.CORRECTNESS_PROBE)
    if df is None or not len(df):
        return _from_metrics(run)
    return df[COLUMNS].sort_values(["step", "layer"], ignore_index=True)


def best_of_n(run: Run, heldout_only: bool = True) -> pd.DataFrame:
    """step, layer, n_prompts, probe, logp, random, oracle: the share of prompts whose rollout with the highest
    probe score (resp. mean log-prob) is correct, the expected share for a random pick (mean accuracy per prompt) and
    the share with any correct rollout. Held-out prompts only by default (the probe was fitted on the others)."""
    cols = ["step", "layer", "n_prompts", "probe", "logp", "random", "oracle"]
    df = run.read(dumps.CORRECTNESS_PROBE_SCORES)
    if df is None or not len(df):
        return empty(cols)
    if heldout_only:
        df = df[df["heldout"]]
    df = df[np.isfinite(df["score"].to_numpy(float))]
    rows = []
    for (step, layer), g in df.groupby(["step", "layer"]):
        picks = {"probe": [], "logp": [], "random": [], "oracle": []}
        for _, p in g.groupby("group_id"):
            c = p["correct"].to_numpy(bool)
            picks["probe"].append(c[int(np.argmax(p["score"].to_numpy(float)))])
            picks["logp"].append(c[int(np.nanargmax(p["mean_logp"].to_numpy(float)))])
            picks["random"].append(c.mean())
            picks["oracle"].append(c.any())
        rows.append(
            {
                "step": int(step),
                "layer": int(layer),
                "n_prompts": len(picks["probe"]),
                **{k: float(np.mean(v)) for k, v in picks.items()},
            }
        )
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)


def direction_drift(run: Run) -> pd.DataFrame:
    """step, layer, cos_to_first, cos_to_previous of the direction fitted at each measured step (the saved
    directions; steps without a fit are left out)."""
    cols = ["step", "layer", "cos_to_first", "cos_to_previous"]
    files = run.read_tensors(dumps.CORRECTNESS_PROBE_DIRECTIONS)
    by_step = {}
    for tf in files:
        by_step[int(tf.metadata.get("step", -1))] = tf
    first, prev, rows = {}, {}, []
    for step in sorted(by_step):
        t = by_step[step]
        for i, layer in enumerate(np.asarray(t["layers"]).tolist()):
            v = np.asarray(t["fitted"][i], dtype=np.float64)
            if not np.all(np.isfinite(v)):
                continue
            v = v / np.linalg.norm(v)
            first.setdefault(layer, v)
            p = prev.get(layer)
            rows.append(
                {
                    "step": step,
                    "layer": int(layer),
                    "cos_to_first": float(v @ first[layer]),
                    "cos_to_previous": float(v @ p) if p is not None else np.nan,
                }
            )
            prev[layer] = v
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)
