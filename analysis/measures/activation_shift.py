"""Activation shift by base-model entropy (Activation Replay finding; docs/activation_replay.md).

Logit lens at input positions: p_l(t) = softmax(W_U RMSNorm_final(h_l(t))). Positions are bucketed by the
entropy H_l(t) of the *base* model's distribution; the shift is KL(p_l^base(t) || p_l^rl(t)). The claim is
that RL moves low-entropy positions most. Input: the Activation Replay analysis table (layer x entropy
bucket, mean KL), written by rlx's replay analysis into the diagnostics manifest.
"""

from __future__ import annotations

import pandas as pd

from analysis.loader import Run
from analysis.measures._util import empty
from rlx import dumps

COLUMNS = ["layer", "bucket", "bucket_label", "entropy_lo", "entropy_hi", "kl_mean", "n_positions"]


def activation_shift(run: Run) -> pd.DataFrame:
    """Tidy layer x bucket table: layer (-1 = all layers pooled), bucket (ordinal, 0 = lowest base
    entropy), bucket_label (the bucket's range: `H/max a-b` for relative bucketing, `quantile i/n` for quantile
    bucketing, nats otherwise), entropy_lo/hi (nats observed in the bucket), kl_mean (nats), n_positions. Empty
    when the run has no Activation Replay analysis (`python -m rlx.replay.analysis run_dir=RUN` writes it;
    `rlx.dumps.REPLAY_KL_BUCKETS`)."""
    df = run.read(dumps.REPLAY_KL_BUCKETS)
    if df is None or not len(df):
        return empty(COLUMNS)
    out = df[["layer", "bucket", "entropy_lo", "entropy_hi", "kl_mean", "n_positions"]].astype(
        {"layer": int, "bucket": int, "n_positions": float}
    )
    bucketing = str(df["bucketing"].iloc[0])
    if bucketing == "quantile":  # edges differ per layer: name buckets by rank
        n_b = int(out["bucket"].max()) + 1
        out["bucket_label"] = [f"quantile {b + 1}/{n_b}" for b in out["bucket"]]
    elif bucketing == "relative":
        out["bucket_label"] = [f"H/max {a:.2g}-{b:.2g}" for a, b in zip(df["bucket_lo"], df["bucket_hi"])]
    else:
        out["bucket_label"] = [f"{a:.2g}-{b:.2g} nats" for a, b in zip(df["bucket_lo"], df["bucket_hi"])]
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
