"""Gradient alignment tables (arXiv 2512.00778; docs/gradient_alignment.md).

Input: the `grad_alignment` instrument's table (rows per logged step and component: `step`,
`component`, `G`, `cos`, `norm`, `n_tokens`, `target`, `variant`; rlx/alignment/instrument.py) and its
gradient sketches (safetensors). G is the raw inner product <grad NLL(D'), grad L_component>: G > 0 means
a descent step on L lowers the NLL of the target responses D' (moves the model toward them).

- `components`: G, cos and norm of total / positive / negative / KL learning over steps;
- `tertiles`: the |w| reweighting tertiles top / mid / bot over steps (G_top + G_mid + G_bot = G_total);
- `layer_groups`: G per layer group over steps (heatmap);
- `pos_neg_cosine`: cos(grad L_pos, grad L_neg), the entanglement of positive and negative learning;
- `classify`: supervised-like vs RL-like per run and target, by the rule of docs/gradient_alignment.md: SL-like iff G_total > 0
  on >= 90% of logged steps and CV = std/|mean| < 1, else RL-like;
- `sketch_similarity` / `drift`: cosines between the saved sketches of grad L at pairs of steps.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis.diagnostics._util import empty, pick
from analysis.loader import Run

INSTRUMENT = "grad_alignment"
MAIN = ("total", "pos", "neg", "kl", "update")
TERTILES = ("top", "mid", "bot")
_SYNONYMS = {
    "all": "total",
    "loss": "total",
    "positive": "pos",
    "negative": "neg",
    "regularization": "kl",
    "reg": "kl",
    "tertile_top": "top",
    "tertile_mid": "mid",
    "tertile_bot": "bot",
    "bottom": "bot",
    "middle": "mid",
}
SL_FRAC_POSITIVE = 0.9
SL_MAX_CV = 1.0
RULE = f"supervised-like iff G_total > 0 on >= {SL_FRAC_POSITIVE:.0%} of logged steps and CV = std/|mean| < {SL_MAX_CV:g}"


def _canon(c: str) -> str:
    c = str(c)
    return _SYNONYMS.get(c.lower(), c.lower() if c.lower() in MAIN + TERTILES else c)


def table(run: Run) -> pd.DataFrame | None:
    """The instrument's rows with canonical component names and `target`/`variant` filled; None if absent."""
    df = run.table(instrument=INSTRUMENT)
    if df is None or not len(df):
        return None
    df = df.copy()
    if "component" not in df.columns:
        return None
    df["component"] = df["component"].map(_canon)
    for col, default in (("target", "default"), ("variant", "param")):
        if col not in df.columns:
            df[col] = default
        df[col] = df[col].fillna(default).astype(str)
    if "rank" in df.columns and df["rank"].nunique() > 1:
        df = df[df["rank"] == df["rank"].min()]  # globally reduced values are identical on every rank
    return df.sort_values("step").reset_index(drop=True)


def _subset(run: Run, comps: tuple[str, ...]) -> pd.DataFrame:
    df = table(run)
    cols = ["step", "target", "variant", "component", "G", "cos", "norm", "n_tokens"]
    if df is None:
        return empty(cols)
    df = df[df["component"].isin(comps)]
    keep = [c for c in cols if c in df.columns]
    return df[keep].reset_index(drop=True)


def components(run: Run) -> pd.DataFrame:
    """step, target, variant, component in (total, pos, neg, kl, update), G, cos, norm, n_tokens.

    `update` is the realised alignment of the optimizer's actual step (AdamW, clipping) when logged."""
    return _subset(run, MAIN)


def tertiles(run: Run) -> pd.DataFrame:
    """step, target, variant, component in (top, mid, bot), G, cos, norm, n_tokens."""
    return _subset(run, TERTILES)


_GROUP_RE = re.compile(r"^(?:layer|layers|group|lg)[:/_=]?(.+)$")


def layer_groups(run: Run) -> pd.DataFrame:
    """step, target, group, G, cos: G per layer group (embeddings, decoder blocks i-j, head)."""
    df = table(run)
    cols = ["step", "target", "group", "G", "cos"]
    if df is None:
        return empty(cols)
    gcol = pick(df, "layer_group", "group")
    if gcol is not None:  # a group column next to the component
        sub = df[df[gcol].notna() & ~df[gcol].astype(str).isin(["", "all", "None", "nan"])].copy()
        sub["group"] = sub[gcol].astype(str)
        if (sub["component"] == "total").any():
            sub = sub[sub["component"] == "total"]
    else:  # rlx/alignment/instrument.py: component "layer:<group>"
        m = df["component"].astype(str).str.extract(_GROUP_RE)[0]
        sub = df[m.notna()].copy()
        sub["group"] = m[m.notna()]
    if not len(sub):
        return empty(cols)
    if "cos" not in sub.columns:
        sub["cos"] = np.nan
    return sub[cols].reset_index(drop=True)


def pos_neg_cosine(run: Run) -> pd.DataFrame:
    """step, target, cos_pos_neg = cos(grad L_pos, grad L_neg)."""
    cols = ["step", "target", "cos_pos_neg"]
    df = table(run)
    if df is not None:
        col = pick(df, "cos_pos_neg")
        if col is not None:
            out = df.dropna(subset=[col]).groupby(["step", "target"], as_index=False)[col].first()
            return out.rename(columns={col: "cos_pos_neg"})[cols]
        sub = df[df["component"].isin(("pos_neg", "pos_vs_neg", "cos_pos_neg", "entanglement"))]
        if len(sub):
            val = pick(sub, "cos", "value", "G")
            return sub.rename(columns={val: "cos_pos_neg"})[cols].reset_index(drop=True)
    s = None
    for name in ("grad_align/cos_pos_neg", "grad_alignment/cos_pos_neg"):
        s = run.metric(name)
        if s is not None:
            break
    if s is None:
        return empty(cols)
    return pd.DataFrame({"step": s.index, "target": "default", "cos_pos_neg": s.to_numpy()})


def classify(run: Run) -> pd.DataFrame:
    """One row per target: n_steps, frac_positive, sign_flip_rate, mean_G, std_G (population), cv, regime,
    rule; computed by `rlx.alignment.functional.run_summary`, the function the instrument's own summary uses."""
    from rlx.alignment.functional import run_summary

    comp = components(run)
    cols = [
        "run",
        "target",
        "n_steps",
        "frac_positive",
        "sign_flip_rate",
        "mean_G",
        "std_G",
        "cv",
        "regime",
        "rule",
    ]
    rows = []
    for target, g in comp[comp["component"] == "total"].groupby("target"):
        G = g.sort_values("step")["G"].to_numpy(float)
        summ = run_summary(G, SL_FRAC_POSITIVE, SL_MAX_CV)
        if summ["n_logged"] == summ["n_nonfinite"]:
            continue
        rows.append(
            {
                "run": run.label,
                "target": target,
                "n_steps": summ["n_logged"] - summ["n_nonfinite"],
                "frac_positive": summ["frac_positive"],
                "sign_flip_rate": summ["sign_flip_rate"],
                "mean_G": summ["mean"],
                "std_G": summ["std"],
                "cv": summ["cv"],
                "regime": summ["regime"],
                "rule": RULE,
            }
        )
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)


def realised(run: Run) -> pd.DataFrame:
    """step, target, G_update, delta_R: alignment of the optimizer's actual step Delta theta with g_T next to the
    measured change of the target NLL R_T(theta_{t+1}) - R_T(theta_t) (first-order validity:
    G_update > 0 should go with delta_R < 0)."""
    cols = ["step", "target", "G_update", "delta_R"]
    df = table(run)
    if df is None or "delta_R" not in df.columns:
        return empty(cols)
    sub = df[(df["component"] == "update") & df["delta_R"].notna()]
    return sub.rename(columns={"G": "G_update"})[cols].reset_index(drop=True)


# ---- sketches ----------------------------------------------------------------------------------------------

_STEP_RE = re.compile(r"(\d+)")


def sketches(run: Run, kind: str | None = None) -> pd.DataFrame:
    """Long list of saved sketch vectors: columns step, kind, vector (np.ndarray).

    Reads every grad_alignment safetensors file: 2-D tensors (n_steps, k) paired with a `steps` tensor,
    or 1-D tensors whose step is in the file metadata (`step`) or in the tensor name (`total/000010`).
    `kind` is the tensor name with digits and separators stripped (e.g. `loss`, `target`, `pos`)."""
    rows = []
    for tf in run.tensors(instrument=INSTRUMENT):
        steps = tf.tensors.get("steps", tf.tensors.get("step"))
        for key, arr in tf.tensors.items():
            if key in ("steps", "step") or arr.dtype.kind not in "fc":
                continue
            base = _STEP_RE.sub("", key).strip("/_.:") or "sketch"
            if arr.ndim == 2 and steps is not None and len(steps) == arr.shape[0]:
                rows += [
                    {"step": int(s), "kind": base, "vector": arr[i].astype(np.float64)}
                    for i, s in enumerate(steps)
                ]
            elif arr.ndim == 1:
                m = _STEP_RE.search(key)
                step = int(m.group(1)) if m else int(tf.metadata.get("step", -1))
                rows.append({"step": step, "kind": base, "vector": arr.astype(np.float64)})
    df = pd.DataFrame(rows, columns=["step", "kind", "vector"])
    if kind is not None:
        df = df[df["kind"] == kind]
    return df.sort_values(["kind", "step"]).reset_index(drop=True)


def _default_kind(sk: pd.DataFrame) -> str | None:
    kinds = list(sk["kind"].unique())
    for k in ("loss", "total", "grad", "update", "sketch"):
        if k in kinds:
            return k
    return kinds[0] if kinds else None


def sketch_similarity(run: Run, kind: str | None = None) -> pd.DataFrame:
    """Tidy cosine matrix between the sketches of one kind: step_i, step_j, cos (all pairs, incl. i == j)."""
    sk = sketches(run)
    kind = kind or _default_kind(sk)
    sk = sk[sk["kind"] == kind].drop_duplicates("step", keep="last")
    cols = ["kind", "step_i", "step_j", "cos"]
    if len(sk) < 1:
        return empty(cols)
    v = np.stack(sk["vector"].to_numpy())
    v = v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-30)
    c = v @ v.T
    steps = sk["step"].to_numpy()
    return pd.DataFrame(
        [
            {"kind": kind, "step_i": int(a), "step_j": int(b), "cos": float(c[i, j])}
            for i, a in enumerate(steps)
            for j, b in enumerate(steps)
        ],
        columns=cols,
    )


def drift(run: Run, lag: int = 1, kind: str | None = None) -> pd.DataFrame:
    """step, drift_cos = cos(grad L(t), grad L(t - lag logged steps)): from the table when logged, else sketches."""
    cols = ["step", "drift_cos", "source"]
    df = table(run)
    if df is not None:
        col = pick(df, "drift", "drift_cos")
        if col is not None:
            sub = df.dropna(subset=[col]).groupby("step", as_index=False)[col].first()
            return pd.DataFrame({"step": sub["step"], "drift_cos": sub[col], "source": "logged"})[cols]
        sub = df[df["component"] == "drift"]
        if len(sub):
            val = pick(sub, "cos", "value")
            out = sub.groupby("step", as_index=False)[val].first()
            return pd.DataFrame({"step": out["step"], "drift_cos": out[val], "source": "logged"})[cols]
    sim = sketch_similarity(run, kind)
    if not len(sim):
        return empty(cols)
    steps = sorted(sim["step_i"].unique())
    m = sim.set_index(["step_i", "step_j"])["cos"]
    rows = [
        {"step": s, "drift_cos": float(m[(s, steps[i - lag])]), "source": "sketch"}
        for i, s in enumerate(steps)
        if i >= lag
    ]
    return pd.DataFrame(rows, columns=cols) if rows else empty(cols)
