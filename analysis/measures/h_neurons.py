"""H-Neurons over training (arXiv 2512.01797; docs/probes.md, `## h_neurons`).

Input: the `h_neurons` monitor's dumps (rlx/instruments/h_neurons.py, `rlx.dumps.H_NEURONS_*`): per measured step
the CETT mass of the frozen set H0 by reward bucket next to layer-matched random sets and activation-matched
sets, the frozen probe's AUROC and
the share of the unclipped gradient on H0's MLP weights; per fit (step 1 = H0 on the base model, then every
`refit_every` steps) the set, its size, its split-half reproducibility and its overlap with H0 against chance. When
the step shards are absent the logged `h_neurons/*` metrics stand in (mass and gradient share only).

- `mass_by_bucket`: step, bucket (correct / wrong), set (H0 / random / matched), mass, sem;
- `gradient_share`: step, share of ||grad||^2 on H0's W_down columns (and W_down + W_up + W_gate), the control
  sets' shares (random: layer-matched; matched: layer and mean-CETT matched, the fair control since the gradient
  of a W_down column scales with its neuron's activation) and the chance level |H0| / (L m), and share / chance;
- `transfer`: step, AUROC of the frozen probe and of the H0 mass alone, wrong vs correct;
- `stability`: per fit step, |H_t|, Jaccard and overlap with H0, their chance levels, the split-half Jaccard
  (same model, disjoint halves of the data) and the half-vs-half Jaccard across time (cross_jaccard);
- `layer_histogram`: per fit step, neurons of the set per decoder block;
- `fits`: the fits table as written (data filter, sizes, solver convergence).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import empty
from rlx import dumps

INSTRUMENT = dumps.H_NEURONS_STEPS.instrument
PREFIX = "h_neurons/"
MASS_COLUMNS = ["step", "bucket", "set", "mass", "sem", "n_rollouts"]
SHARE_COLUMNS = [
    "step",
    "grad_share_down",
    "grad_share_mlp",
    "grad_share_down_random",
    "grad_share_mlp_random",
    "grad_share_down_matched",
    "grad_share_mlp_matched",
    "grad_share_chance",
    "ratio_down",
    "ratio_mlp",
    "ratio_down_random",
    "ratio_down_matched",
]
TRANSFER_COLUMNS = ["step", "auroc", "auroc_mass"]
STABILITY_COLUMNS = [
    "step",
    "data",
    "set_size",
    "jaccard",
    "jaccard_chance",
    "overlap",
    "overlap_chance",
    "split_jaccard",
    "cross_jaccard",
    "n_rollouts",
]
LAYER_COLUMNS = ["step", "fit", "layer", "n_neurons", "fraction"]


def _steps(run: Run) -> pd.DataFrame | None:
    df = run.read(dumps.H_NEURONS_STEPS)
    return df.sort_values(["step", "bucket"]).reset_index(drop=True) if df is not None and len(df) else None


def _metric_table(run: Run, names: list[str]) -> pd.DataFrame | None:
    """step + the logged h_neurons/<name> metrics (NaN where a step lacks one); None when none was logged."""
    cols = {n: run.metric(PREFIX + n) for n in names}
    cols = {n: s for n, s in cols.items() if s is not None}
    if not cols:
        return None
    return pd.DataFrame(cols).rename_axis("step").reset_index()


def mass_by_bucket(run: Run) -> pd.DataFrame:
    """CETT mass on answer tokens per step and reward bucket (long) of H0 and of the control sets: `random`
    (layer-matched) and `matched` (activation-matched)."""
    df = _steps(run)
    sets = {"H0": "mass", "random": "mass_random", "matched": "mass_matched"}
    rows = []
    if df is not None:
        for r in df[df["bucket"] != "all"].to_dict("records"):
            for name, col in sets.items():
                sem = r["mass_sem"] if name == "H0" else np.nan
                rows.append(
                    {"step": r["step"], "bucket": r["bucket"], "set": name, "mass": r[col], "sem": sem}
                    | {"n_rollouts": r["n_rollouts"]}
                )
    else:
        names = [f"mass{s}_{b}" for s in ("", "_random", "_matched") for b in ("correct", "wrong")]
        m = _metric_table(run, names)
        if m is None:
            return empty(MASS_COLUMNS)
        for r in m.to_dict("records"):
            for b in ("correct", "wrong"):
                for name, col in sets.items():
                    key = f"{col}_{b}"
                    if key in r:
                        rows.append(
                            {"step": r["step"], "bucket": b, "set": name, "mass": r[key], "sem": np.nan}
                            | {"n_rollouts": np.nan}
                        )
    out = pd.DataFrame(rows, columns=MASS_COLUMNS)
    return out.dropna(subset=["mass"]).reset_index(drop=True) if len(out) else empty(MASS_COLUMNS)


def gradient_share(run: Run) -> pd.DataFrame:
    """Share of the step's squared gradient norm on H0's MLP weights against the random sets and chance."""
    names = SHARE_COLUMNS[1:8]
    df = _steps(run)
    if df is not None:
        t = df[df["bucket"] == "all"][["step", *names]].copy()
    else:
        t = _metric_table(run, names)
        if t is None:
            return empty(SHARE_COLUMNS)
        for n in names:
            if n not in t:
                t[n] = np.nan
    t = t.dropna(subset=["grad_share_down"])
    t["ratio_down"] = t["grad_share_down"] / t["grad_share_chance"]
    t["ratio_mlp"] = t["grad_share_mlp"] / t["grad_share_chance"]
    t["ratio_down_random"] = t["grad_share_down_random"] / t["grad_share_chance"]
    t["ratio_down_matched"] = t["grad_share_down_matched"] / t["grad_share_chance"]
    return t[SHARE_COLUMNS].reset_index(drop=True) if len(t) else empty(SHARE_COLUMNS)


def transfer(run: Run) -> pd.DataFrame:
    """AUROC of the frozen step-1 probe (and of the H0 mass alone) on each measured step's rollouts."""
    df = _steps(run)
    if df is not None:
        t = df[df["bucket"] == "all"][TRANSFER_COLUMNS]
    else:
        t = _metric_table(run, ["auroc", "auroc_mass"])
        if t is None:
            return empty(TRANSFER_COLUMNS)
        t = t.reindex(columns=TRANSFER_COLUMNS)
    t = t.dropna(subset=["auroc"])
    return t.reset_index(drop=True) if len(t) else empty(TRANSFER_COLUMNS)


def fits(run: Run) -> pd.DataFrame:
    """Every fit's row of the fits dump (step, fit = full / half_a / half_b, data, sizes, solver, stability)."""
    df = run.read(dumps.H_NEURONS_FITS)
    if df is None or not len(df):
        return empty([f.name for f in dumps.H_NEURONS_FITS.fields])
    return df.sort_values(["step", "fit"]).reset_index(drop=True)


def stability(run: Run) -> pd.DataFrame:
    """The full fit of each fit step: |H_t|, Jaccard / overlap with H0 and their chance levels, split-half and
    cross-time half-vs-half Jaccard (step 1: H0 itself, only its split-half Jaccard)."""
    f = fits(run)
    if not len(f):
        return empty(STABILITY_COLUMNS)
    full = f[f["fit"] == "full"].copy()
    return full[STABILITY_COLUMNS].reset_index(drop=True)


def layer_histogram(run: Run) -> pd.DataFrame:
    """Neurons of each fit's set (in_set: positive weight) per decoder block; fraction = share of the set."""
    df = run.read(dumps.H_NEURONS_SET)
    if df is None or not len(df):
        return empty(LAYER_COLUMNS)
    df = df[df["in_set"].astype(bool)]
    if not len(df):
        return empty(LAYER_COLUMNS)
    h = df.groupby(["step", "fit", "layer"]).size().rename("n_neurons").reset_index()
    h["fraction"] = h["n_neurons"] / h.groupby(["step", "fit"])["n_neurons"].transform("sum")
    return h[LAYER_COLUMNS].sort_values(["step", "fit", "layer"]).reset_index(drop=True)
