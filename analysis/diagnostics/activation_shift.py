"""Activation shift by base-model entropy (Activation Replay finding; docs/activation_replay.md).

Logit lens at input positions: p_l(t) = softmax(W_U RMSNorm_final(h_l(t))). Positions are bucketed by the
entropy H_l(t) of the *base* model's distribution; the shift is KL(p_l^base(t) || p_l^rl(t)). The claim is
that RL moves low-entropy positions most. Input: the Activation Replay analysis table (layer x entropy
bucket, mean KL), written by rlx's replay analysis into the diagnostics manifest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.diagnostics._util import empty, pick
from analysis.loader import Run

INSTRUMENTS = ("activation_replay", "replay", "activation_shift")
COLUMNS = ["layer", "bucket", "bucket_label", "entropy_lo", "entropy_hi", "kl_mean", "n_positions"]


def activation_shift(run: Run) -> pd.DataFrame:
    """Tidy layer x bucket table: layer (-1 = all layers pooled), bucket (ordinal, 0 = lowest base
    entropy), bucket_label (the bucket's range: `H/max a-b` for relative bucketing, nats otherwise),
    entropy_lo/hi (nats observed in the bucket), kl_mean (nats), n_positions. Empty when the run has no
    Activation Replay analysis (`python -m rlx.replay.analysis run_dir=RUN` writes it)."""
    df = None
    for inst in INSTRUMENTS:
        df = run.table(instrument=inst)
        if df is not None and len(df):
            break
    if df is None or not len(df):
        return empty(COLUMNS)
    layer = pick(df, "layer")
    kl = pick(df, "kl_mean", "kl", "mean_kl", "KL")
    if layer is None or kl is None:
        return empty(COLUMNS)
    bucket = pick(df, "bucket", "entropy_bucket", "bucket_id")
    lo = pick(df, "entropy_lo", "bucket_lo", "lo", "h_lo")
    hi = pick(df, "entropy_hi", "bucket_hi", "hi", "h_hi")
    n = pick(df, "n_positions", "n", "count")
    out = pd.DataFrame({"layer": df[layer].astype(int), "kl_mean": df[kl].astype(float)})
    out["entropy_lo"] = df[lo].astype(float) if lo else np.nan
    out["entropy_hi"] = df[hi].astype(float) if hi else np.nan
    if bucket is not None and pd.api.types.is_numeric_dtype(df[bucket]):
        out["bucket"] = df[bucket].astype(int)
    elif lo is not None:
        out["bucket"] = out.groupby("layer")["entropy_lo"].rank(method="dense").astype(int) - 1
    elif bucket is not None:
        out["bucket"] = pd.factorize(df[bucket], sort=True)[0]
    else:
        out["bucket"] = 0
    out["n_positions"] = df[n].astype(float) if n else np.nan
    blo, bhi = pick(df, "bucket_lo"), pick(df, "bucket_hi")
    bucketing = str(df["bucketing"].iloc[0]) if "bucketing" in df.columns else ""
    relative = bucketing == "relative"
    if bucketing == "quantile":  # edges differ per layer: name buckets by rank
        n_b = int(out["bucket"].max()) + 1
        out["bucket_label"] = [f"quantile {b + 1}/{n_b}" for b in out["bucket"]]
    elif blo and bhi and relative:
        out["bucket_label"] = [f"H/max {a:.2g}-{b:.2g}" for a, b in zip(df[blo], df[bhi])]
    elif blo and bhi:
        out["bucket_label"] = [f"{a:.2g}-{b:.2g} nats" for a, b in zip(df[blo], df[bhi])]
    else:
        out["bucket_label"] = [
            f"{a:.2g}-{b:.2g} nats" if pd.notna(a) and pd.notna(b) else str(k)
            for a, b, k in zip(out["entropy_lo"], out["entropy_hi"], out["bucket"])
        ]
    return out[COLUMNS].sort_values(["layer", "bucket"]).reset_index(drop=True)


def shift_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Pivot: rows = layer, columns = bucket, values = mean KL."""
    if not len(table):
        return pd.DataFrame()
    mat = table.pivot_table(index="layer", columns="bucket", values="kl_mean", aggfunc="mean")
    labels = table.drop_duplicates("bucket").set_index("bucket")["bucket_label"]
    mat.columns = [labels.get(b, str(b)) for b in mat.columns]
    mat.index = ["all" if i < 0 else str(i) for i in mat.index]
    mat.index.name = "layer"
    return mat
