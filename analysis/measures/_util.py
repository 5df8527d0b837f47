"""Small shared helpers: metric columns, AUROC, empty tables (columns are named in `rlx.dumps`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


def metric_columns(df: pd.DataFrame, prefixes: Iterable[str]) -> list[str]:
    return [c for c in df.columns if any(c.startswith(p) for p in prefixes)]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P[s(pos) > s(neg)] + P[tie]/2 (Mann-Whitney U / (n_pos n_neg)).

    NaN when one class is empty.
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=float) for c in columns})
