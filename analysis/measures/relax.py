"""ReLaX dynamics (arXiv 2512.07558; docs/relax.md).

DSD(x) = sample variance of the smoothed singular values r_j = sqrt(s_j^2 + eps) of the per-trajectory
Koopman matrix K fitted on the last-layer states (the code's variant; `spectrum: eig` uses eigenvalue
moduli, paper Eq. 6). Input: the `relax` instrument's per-trajectory table (step, dsd, advantage, masked,
xi; `rlx.dumps.RELAX_TRAJECTORIES`), its spectrum summaries and full spectra (`RELAX_SPECTRA_SUMMARY`,
`RELAX_SPECTRA`); the `relax/dsd_mean`, `relax/dsd_pos_mean` and `relax/masked_frac` metrics from metrics.jsonl
when the table is absent.

- `dsd_over_steps`: DSD mean and quantiles per step over all trajectories and over positive-advantage
  ones (the only ones the loss pushes);
- `masked_fraction`: share of trajectories with DSD > xi (their DSD push is detached and they get KL);
- `spectra`: the sorted singular-value spectrum per step (mean and 10/90% quantiles over trajectories):
  exact from the full spectra (step 1 and every `full_spectra_every` steps; every recorded step in runs
  before spectra schema 2), from the fp16 per-micro-batch summaries at the other steps (`source` says which).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import empty
from rlx import dumps

INSTRUMENT = dumps.RELAX_TRAJECTORIES.instrument
DSD_METRICS = {"relax/dsd_mean": "all", "relax/dsd_pos_mean": "positive"}
"""The instrument's logged DSD means (rlx/instruments/relax.py) by subset: the fallback without the table."""


def trajectories(run: Run) -> pd.DataFrame | None:
    """Per-trajectory rows (`rlx.dumps.RELAX_TRAJECTORIES`, all ranks); None when not recorded."""
    df = run.read(dumps.RELAX_TRAJECTORIES)
    return df if df is not None and len(df) else None


def _quantile_rows(step: int, subset: str, x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    base = {"step": step, "subset": subset, "n": len(x)}
    if not len(x):
        return {**base, "mean": np.nan, "q10": np.nan, "median": np.nan, "q90": np.nan}
    return {
        **base,
        "mean": float(x.mean()),
        "q10": float(np.quantile(x, 0.1)),
        "median": float(np.median(x)),
        "q90": float(np.quantile(x, 0.9)),
    }


def dsd_over_steps(run: Run) -> pd.DataFrame:
    """step, subset in (all, positive), n, mean, q10, median, q90 of per-trajectory DSD.

    Falls back to the logged `DSD_METRICS` (only `mean` filled)."""
    cols = ["step", "subset", "n", "mean", "q10", "median", "q90"]
    df = trajectories(run)
    rows = []
    if df is not None:
        for step, g in df.groupby("step"):
            dsd = g["dsd"].to_numpy(float)
            rows.append(_quantile_rows(int(step), "all", dsd))
            rows.append(_quantile_rows(int(step), "positive", dsd[g["advantage"].to_numpy(float) > 0]))
        return pd.DataFrame(rows, columns=cols)
    for c, subset in DSD_METRICS.items():
        s = run.metric(c)
        if s is not None:
            rows += [{"step": int(k), "subset": subset, "n": np.nan, "mean": float(v)} for k, v in s.items()]
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)


def masked_fraction(run: Run) -> pd.DataFrame:
    """step, masked_fraction (of all trajectories), masked_fraction_positive, xi (when logged)."""
    cols = ["step", "masked_fraction", "masked_fraction_positive", "xi"]
    df = trajectories(run)
    if df is not None:
        rows = []
        for step, g in df.groupby("step"):
            m = g["masked"].astype(float).to_numpy()
            pos = g["advantage"].to_numpy(float) > 0
            xi = float(g["xi"].iloc[-1])
            rows.append(
                {
                    "step": int(step),
                    "masked_fraction": float(m.mean()),
                    "masked_fraction_positive": float(m[pos].mean()) if pos.any() else np.nan,
                    "xi": xi,
                }
            )
        return pd.DataFrame(rows, columns=cols)
    s = run.metric("relax/masked_frac")
    if s is not None:
        xi = run.metric("relax/xi")
        return pd.DataFrame(
            {
                "step": s.index.astype(int),
                "masked_fraction": s.to_numpy(float),
                "masked_fraction_positive": np.nan,
                "xi": xi.reindex(s.index).to_numpy(float) if xi is not None else np.nan,
            }
        )[cols]
    return empty(cols)


def spectra(run: Run) -> pd.DataFrame:
    """step, index (j-th largest singular value, 0-based), mean, q10, q90 over trajectories, n, source.

    source = full: computed from every trajectory's full spectrum (exact); summary: from the fp16 summaries of
    the step's micro-batches (mean exact up to fp16; q10/q90 exact for a step with one micro-batch on one rank,
    else the n-weighted mean of the micro-batches' quantiles). A step with full spectra is never taken from
    the summaries."""
    cols = ["step", "index", "mean", "q10", "q90", "n", "source"]
    rows: list[dict] = []
    blocks: dict[int, list[np.ndarray]] = {}
    summaries: dict[int, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for tf in run.read_tensors(dumps.RELAX_SPECTRA_SUMMARY):
        _collect_summary(tf, summaries)
    for tf in run.read_tensors(dumps.RELAX_SPECTRA):  # v1 and v2: singular_values (N, m), step (N,)
        sv = -np.sort(-np.abs(np.asarray(tf["singular_values"], dtype=np.float64)), axis=1)
        step_of_row = np.asarray(tf["step"]).astype(int)
        for step in np.unique(step_of_row):
            blocks.setdefault(int(step), []).append(sv[step_of_row == step])
    for step, parts in sorted(blocks.items()):  # ranks' trajectories of one step merged
        width = min(p.shape[1] for p in parts)
        block = np.concatenate([p[:, :width] for p in parts])
        for j in range(width):
            col = block[:, j]
            rows.append(
                {
                    "step": step,
                    "index": j,
                    "mean": float(col.mean()),
                    "q10": float(np.quantile(col, 0.1)),
                    "q90": float(np.quantile(col, 0.9)),
                    "n": len(col),
                    "source": "full",
                }
            )
    for step, parts in sorted(summaries.items()):
        if step in blocks:
            continue
        width = min(len(p[1]) for p in parts)
        n = np.array([p[0] for p in parts], dtype=np.float64)
        wts = n / n.sum() if n.sum() > 0 else np.full(len(n), 1.0 / len(n))
        stat = {
            k: sum(w * p[i][:width] for w, p in zip(wts, parts))
            for k, i in (("mean", 1), ("q10", 2), ("q90", 3))
        }
        for j in range(width):
            rows.append(
                {
                    "step": step,
                    "index": j,
                    "mean": float(stat["mean"][j]),
                    "q10": float(stat["q10"][j]),
                    "q90": float(stat["q90"][j]),
                    "n": int(n.sum()),
                    "source": "summary",
                }
            )
    if not rows:
        return empty(cols)
    return pd.DataFrame(rows, columns=cols).sort_values(["step", "index"]).reset_index(drop=True)


def _collect_summary(tf, out: dict[int, list]) -> None:
    """(n, mean, q10, q90) per recorded micro-batch of a `spectra_summary_step*` file, by step."""
    levels = np.asarray(tf["levels"], dtype=np.float64)
    q = np.asarray(tf["quantiles"], dtype=np.float64)  # (K, Q, m)
    mean = np.asarray(tf["mean"], dtype=np.float64)  # (K, m)
    i10, i90 = int(np.argmin(np.abs(levels - 0.1))), int(np.argmin(np.abs(levels - 0.9)))
    for k, step in enumerate(np.asarray(tf["step"]).astype(int)):
        live = np.isfinite(mean[k])  # summaries of narrower micro-batches are NaN-padded
        out.setdefault(int(step), []).append(
            (int(tf["n"][k]), mean[k][live], q[k, i10][live], q[k, i90][live])
        )


def dictionary_fit(run: Run) -> pd.DataFrame:
    """fit_step, adam_step, loss: the residual of every Adam step of every dictionary fit.

    Reads `relax/dictionary_fit.json` (schema 2: a `fits` list; schema 1: one fit's `losses`)."""
    cols = ["fit_step", "adam_step", "loss"]
    rows = []
    for obj in run.json(instrument=INSTRUMENT, name="dictionary_fit"):
        fits = obj.get("fits") if isinstance(obj, dict) else None
        if fits is None and isinstance(obj, dict) and "losses" in obj:
            fits = [{"fit_step": obj.get("fit_step", 0), "losses": obj["losses"]}]
        for f in fits or []:
            rows += [
                {"fit_step": int(f.get("fit_step", 0)), "adam_step": k, "loss": float(v)}
                for k, v in enumerate(f.get("losses", []))
            ]
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)


def dictionary_fit_summary(run: Run) -> pd.DataFrame:
    """One row per dictionary fit: fit_step, n_trajectories, adam_steps, loss_before, loss_after (residual
    on the whole fitting set), weight_change (||W - W_start|| / ||W_start||); schema-2 files only."""
    cols = [
        "fit_step",
        "n_trajectories",
        "world_size",
        "adam_steps",
        "loss_before",
        "loss_after",
        "weight_change",
    ]
    rows = []
    for obj in run.json(instrument=INSTRUMENT, name="dictionary_fit"):
        for f in (obj.get("fits") or []) if isinstance(obj, dict) else []:
            rows.append({c: f.get(c, np.nan) for c in cols})
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)
