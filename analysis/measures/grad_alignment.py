"""Gradient alignment tables (arXiv 2512.00778; docs/gradient_alignment.md).

Input: the `grad_alignment` instrument's table (rows per logged step and component; columns declared in
`rlx.dumps.GRAD_ALIGNMENT`, the same for the offline `alignment-exact` tables) and its gradient sketches
(`rlx.dumps.GRAD_ALIGNMENT_SKETCHES`). G is the raw inner product <grad NLL(D'), grad L_component>: G > 0 means
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

import numpy as np
import pandas as pd

from analysis.loader import Run
from analysis.measures._util import empty
from rlx import dumps

INSTRUMENT = dumps.GRAD_ALIGNMENT.instrument
MAIN = ("total", "pos", "neg", "kl", "update")
TERTILES = ("top", "mid", "bot")
SL_FRAC_POSITIVE = 0.9
SL_MAX_CV = 1.0
RULE = f"supervised-like iff G_total > 0 on >= {SL_FRAC_POSITIVE:.0%} of logged steps and CV = std/|mean| < {SL_MAX_CV:g}"


def table(run: Run) -> pd.DataFrame | None:
    """The instrument's rows (the training shards and any alignment-exact table, one `target` each); None if
    absent."""
    df = run.table(instrument=INSTRUMENT)
    if df is None or not len(df):
        return None
    if df["rank"].nunique() > 1:
        df = df[df["rank"] == df["rank"].min()]  # globally reduced values are identical on every rank
    return df.sort_values("step").reset_index(drop=True)


def _subset(run: Run, comps: tuple[str, ...]) -> pd.DataFrame:
    df = table(run)
    cols = ["step", "target", "variant", "component", "G", "cos", "norm", "n_tokens"]
    if df is None:
        return empty(cols)
    return df.loc[df["component"].isin(comps), cols].reset_index(drop=True)


def components(run: Run) -> pd.DataFrame:
    """step, target, variant, component in (total, pos, neg, kl, update), G, cos, norm, n_tokens.

    `update` is the realised alignment of the optimizer's actual step (AdamW, clipping) when logged."""
    return _subset(run, MAIN)


def tertiles(run: Run) -> pd.DataFrame:
    """step, target, variant, component in (top, mid, bot), G, cos, norm, n_tokens."""
    return _subset(run, TERTILES)


def layer_groups(run: Run) -> pd.DataFrame:
    """step, target, group, G, cos: G per layer group (embeddings, decoder blocks i-j, head), from the
    components `layer:<group>`."""
    df = table(run)
    cols = ["step", "target", "group", "G", "cos"]
    if df is None:
        return empty(cols)
    group = df["component"].str.extract(r"^layer:(.+)$")[0]
    sub = df[group.notna()].assign(group=group[group.notna()])
    return sub[cols].reset_index(drop=True) if len(sub) else empty(cols)


def pos_neg_cosine(run: Run) -> pd.DataFrame:
    """step, target, cos_pos_neg = cos(grad L_pos, grad L_neg)."""
    cols = ["step", "target", "cos_pos_neg"]
    df = table(run)
    if df is not None:
        return (
            df.dropna(subset=["cos_pos_neg"])
            .groupby(["step", "target"], as_index=False)["cos_pos_neg"]
            .first()[cols]
        )
    s = run.metric("grad_align/cos_pos_neg")  # the instrument's logged metric, when its files are absent
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
    if df is None:
        return empty(cols)
    sub = df[(df["component"] == "update") & df["delta_R"].notna()]
    return sub.rename(columns={"G": "G_update"})[cols].reset_index(drop=True)


# ---- sketches ----------------------------------------------------------------------------------------------


def sketches(run: Run, kind: str | None = None) -> pd.DataFrame:
    """Long list of saved sketch vectors: columns step, kind, vector (np.ndarray).

    Reads the sketch files (`rlx.dumps.GRAD_ALIGNMENT_SKETCHES`): tensors `<kind>/<step>` (kind `loss`,
    `target` or a component)."""
    rows = []
    for tf in run.read_tensors(dumps.GRAD_ALIGNMENT_SKETCHES):
        for key, arr in tf.tensors.items():
            kind_, step = key.rsplit("/", 1)
            rows.append({"step": int(step), "kind": kind_, "vector": arr.astype(np.float64)})
    df = pd.DataFrame(rows, columns=["step", "kind", "vector"])
    if kind is not None:
        df = df[df["kind"] == kind]
    return df.sort_values(["kind", "step"]).reset_index(drop=True)


def _default_kind(sk: pd.DataFrame) -> str | None:
    kinds = list(sk["kind"].unique())
    return "loss" if "loss" in kinds else (kinds[0] if kinds else None)


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
    if df is not None and df["drift"].notna().any():  # the param variant logs it on the total row
        sub = df.dropna(subset=["drift"]).groupby("step", as_index=False)["drift"].first()
        return pd.DataFrame({"step": sub["step"], "drift_cos": sub["drift"], "source": "logged"})[cols]
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
