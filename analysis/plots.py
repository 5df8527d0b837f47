"""Plots (matplotlib, Agg backend): one function per plot, each takes tidy tables and returns the figure.

Tables may carry a `run` column (several runs concatenated, see `with_run`); each run gets its own
colour. Axes are labelled with units; x is always the optimizer step unless stated.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

STEP = "optimizer step"
UNITS = {
    "reward": "reward (task units, mean per completion)",
    "reward_std": "reward std within group",
    "loss": "loss (nats per token)",
    "grad_norm": "pre-clip gradient L2 norm",
    "entropy": "token entropy (nats)",
    "kl": "KL to reference (nats per token)",
    "rewards/accuracies": "DPO implicit-reward accuracy (fraction)",
    "rewards/margins": "DPO implicit-reward margin (beta x log-ratio)",
    "rewards/chosen": "DPO implicit reward, chosen (beta x log-ratio)",
    "rewards/rejected": "DPO implicit reward, rejected (beta x log-ratio)",
    "completions/mean_length": "completion length (tokens)",
    "learning_rate": "learning rate",
    "entropy_cov/cov": "Cov(log pi, A) per token (nats x advantage)",
    "entropy_cov/cov_top": "Cov(log pi, A), top 0.2% tokens",
    "clip_cov/cov_mean": "Cov(log pi, A) per token",
    "kl_cov/cov_mean": "Cov(log pi, A) per token",
}
_LS = {
    "total": "-",
    "pos": "--",
    "neg": ":",
    "kl": "-.",
    "update": (0, (5, 1, 1, 1)),
    "top": "-",
    "mid": "--",
    "bot": ":",
}


def _fig(w: float = 6.4, h: float = 3.6, **kw) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(w, h), **kw)
    return fig, ax


def _finish(fig: Figure, ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Figure:
    if legend:  # line plots: steps and layers are integers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _runs(df: pd.DataFrame):
    if "run" in df.columns:
        yield from df.groupby("run", sort=False)
    else:
        yield "", df


def with_run(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-run tables, adding a `run` column."""
    frames = [t.assign(run=label) for label, t in tables.items() if t is not None and len(t)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def metric_curves(long: pd.DataFrame, metric: str) -> Figure:
    """One metric over steps, a line per run (`long`: run, step, metric, value)."""
    fig, ax = _fig()
    sub = long[long["metric"] == metric]
    for run, g in sub.groupby("run", sort=False):
        ax.plot(g["step"], g["value"], marker="o", ms=2.5, label=run)
    return _finish(fig, ax, metric, STEP, UNITS.get(metric, metric))


def grad_components(
    df: pd.DataFrame, what: str = "G", title: str = "Gradient alignment by component"
) -> Figure:
    """G (or cos) of total / positive / negative / KL learning over steps; line style = component."""
    fig, ax = _fig()
    for run, g in _runs(df):
        for (comp, target), h in g.groupby(["component", "target"], sort=False):
            h = h.sort_values("step")
            lbl = " ".join(x for x in (run, comp, "" if target == "default" else f"[{target}]") if x)
            ax.plot(h["step"], h[what], ls=_LS.get(comp, "-"), marker="o", ms=2.5, label=lbl)
    ax.axhline(0, color="k", lw=0.7)
    ylabel = "G = <grad NLL(D'), grad L_c> (raw)" if what == "G" else "cos(grad NLL(D'), grad L_c)"
    return _finish(fig, ax, title, STEP, ylabel)


def layer_group_heatmap(df: pd.DataFrame, title: str = "Gradient alignment per layer group") -> Figure:
    """Heatmap of G: rows = layer group, columns = logged step (one run)."""
    mat = df.pivot_table(index="group", columns="step", values="G", aggfunc="mean")
    fig, ax = _fig(6.4, 0.5 + 0.45 * max(2, len(mat)))
    lim = float(np.nanmax(np.abs(mat.to_numpy()))) if mat.size else 1.0
    im = ax.imshow(mat.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(mat.index)), [str(i) for i in mat.index])
    _step_ticks(ax, list(mat.columns))
    fig.colorbar(im, ax=ax, label="G (raw inner product)")
    return _finish(fig, ax, title, STEP, "layer group", legend=False)


def _step_ticks(ax, steps: list, axis: str = "x") -> None:
    idx = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int) if steps else []
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    setter(idx, [str(steps[i]) for i in idx])


def realised_vs_measured(df: pd.DataFrame) -> Figure:
    """Scatter of the realised alignment G_update against the measured change of the target NLL, per run
    (first-order validity: points should fall in the G > 0, delta R < 0 quadrant)."""
    fig, ax = _fig(5.6, 4.0)
    for run, g in _runs(df):
        r = np.corrcoef(g["G_update"], g["delta_R"])[0, 1] if len(g) > 2 else np.nan
        ax.scatter(g["G_update"], g["delta_R"], s=14, label=" ".join(x for x in (run, f"corr {r:+.2f}") if x))
    ax.axhline(0, color="k", lw=0.7)
    ax.axvline(0, color="k", lw=0.7)
    fig = _finish(
        fig,
        ax,
        "Realised update alignment vs measured target change",
        "G_update = <grad NLL(D'), -Delta theta>",
        "Delta R_T = NLL(D') change (nats)",
    )
    return fig


def pos_neg_cosine(df: pd.DataFrame) -> Figure:
    """cos(grad L_pos, grad L_neg) over steps: > 0 means positive and negative learning are entangled."""
    fig, ax = _fig()
    for run, g in _runs(df):
        ax.plot(g["step"], g["cos_pos_neg"], marker="o", ms=2.5, label=run or None)
    ax.axhline(0, color="k", lw=0.7)
    return _finish(
        fig, ax, "Entanglement of positive and negative learning", STEP, "cos(grad L_pos, grad L_neg)"
    )


def similarity_matrix(df: pd.DataFrame, title: str = "Update similarity across steps (sketches)") -> Figure:
    """Cosine matrix between the gradient sketches of two logged steps (one run)."""
    mat = df.pivot_table(index="step_i", columns="step_j", values="cos")
    fig, ax = _fig(5.0, 4.2)
    im = ax.imshow(mat.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    _step_ticks(ax, list(mat.columns), "x")
    _step_ticks(ax, list(mat.index), "y")
    fig.colorbar(im, ax=ax, label="cosine")
    return _finish(fig, ax, title, f"{STEP} j", f"{STEP} i", legend=False)


def drift(df: pd.DataFrame) -> Figure:
    fig, ax = _fig()
    for run, g in _runs(df):
        ax.plot(g["step"], g["drift_cos"], marker="o", ms=2.5, label=run or None)
    ax.axhline(0, color="k", lw=0.7)
    return _finish(fig, ax, "Target drift", STEP, "cos(grad L(t), grad L(t-K))")


def dsd_over_steps(df: pd.DataFrame) -> Figure:
    """Mean DSD per step with the 10-90% band, all vs positive-advantage trajectories."""
    fig, ax = _fig()
    ax.set_yscale("symlog", linthresh=1e-2)
    for run, g in _runs(df):
        for subset, h in g.groupby("subset", sort=False):
            h = h.sort_values("step")
            lbl = " ".join(x for x in (run, subset) if x)
            (line,) = ax.plot(
                h["step"], h["mean"], "-" if subset == "all" else "--", marker="o", ms=2.5, label=lbl
            )
            if "q10" in h and h["q10"].notna().any():
                ax.fill_between(h["step"], h["q10"], h["q90"], color=line.get_color(), alpha=0.15)
    return _finish(fig, ax, "Dynamic spectral dispersion (DSD)", STEP, "DSD = Var(singular values of K)")


def masked_fraction(df: pd.DataFrame) -> Figure:
    fig, ax = _fig()
    for run, g in _runs(df):
        ax.plot(
            g["step"], g["masked_fraction"], marker="o", ms=2.5, label=" ".join(x for x in (run, "all") if x)
        )
        if g["masked_fraction_positive"].notna().any():
            ax.plot(
                g["step"],
                g["masked_fraction_positive"],
                "--",
                marker="o",
                ms=2.5,
                label=" ".join(x for x in (run, "A>0") if x),
            )
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, "Trajectories with DSD > xi (KL-masked)", STEP, "fraction of trajectories")


def dictionary_fit(df: pd.DataFrame) -> Figure:
    """Residual per Adam step of each Koopman dictionary fit (one curve per run and fit step)."""
    fig, ax = _fig()
    for run, g in _runs(df):
        for fit_step, h in g.groupby("fit_step", sort=True):
            lbl = " ".join(x for x in (run, f"fit at step {fit_step}") if x)
            ax.plot(h["adam_step"], h["loss"], lw=1, label=lbl)
    return _finish(fig, ax, "Koopman dictionary fit", "Adam step", "residual (minibatch)")


def spectra(df: pd.DataFrame, max_curves: int = 6) -> Figure:
    """Sorted singular-value spectrum of K at a few steps (mean over trajectories, 10-90% band)."""
    fig, ax = _fig()
    live = df.groupby("index")["q90"].max()
    df = df[df["index"].isin(live[live > 1e-12].index)]  # low-rank spectra: drop all-zero tail
    steps = sorted(df["step"].unique())
    pick = [
        steps[i] for i in np.unique(np.linspace(0, len(steps) - 1, min(len(steps), max_curves)).astype(int))
    ]
    cmap = plt.get_cmap("viridis")
    for k, step in enumerate(pick):
        h = df[df["step"] == step]
        c = cmap(k / max(1, len(pick) - 1))
        ax.plot(h["index"], h["mean"], color=c, label=f"step {step}")
        ax.fill_between(h["index"], h["q10"].clip(lower=1e-12), h["q90"], color=c, alpha=0.12)
    ax.set_yscale("log")
    positive = df["mean"][df["mean"] > 0]
    if len(positive):
        ax.set_ylim(bottom=float(positive.min()) / 3)
    return _finish(
        fig, ax, "Koopman singular-value spectra", "singular value index j (sorted)", "singular value s_j"
    )


def entropy_quantiles(df: pd.DataFrame) -> Figure:
    """Token-entropy quantiles of probe completions over steps (median line, 10-90% and 25-75% bands)."""
    fig, ax = _fig()
    for run, g in _runs(df):
        g = g.sort_values("step")
        (line,) = ax.plot(
            g["step"], g["entropy_q50"], marker="o", ms=2.5, label=" ".join(x for x in (run, "median") if x)
        )
        ax.fill_between(g["step"], g["entropy_q10"], g["entropy_q90"], color=line.get_color(), alpha=0.12)
        ax.fill_between(g["step"], g["entropy_q25"], g["entropy_q75"], color=line.get_color(), alpha=0.2)
    return _finish(
        fig, ax, "Token entropy of probe completions (q10/q25/q50/q75/q90)", STEP, "token entropy (nats)"
    )


def high_entropy_fraction(df: pd.DataFrame) -> Figure:
    """Share of probe-completion tokens above the first saved step's 80th entropy percentile, over steps."""
    fig, ax = _fig()
    for run, g in _runs(df):
        g = g.sort_values("step")
        ax.plot(g["step"], g["high_entropy_frac"], marker="o", ms=2.5, label=run or None)
    return _finish(
        fig, ax, "High-entropy token fraction (probe set)", STEP, "fraction of tokens above step-0 q80"
    )


def logp_advantage_covariance(df: pd.DataFrame) -> Figure:
    """Cov(log pi, A) over the probe-completion tokens, over steps."""
    fig, ax = _fig()
    for run, g in _runs(df):
        g = g.sort_values("step")
        ax.plot(g["step"], g["cov_logp_adv"], marker="o", ms=2.5, label=run or None)
    ax.axhline(0, color="k", lw=0.7)
    return _finish(fig, ax, "Cov(log pi, A) over probe tokens", STEP, "covariance (nats x advantage)")


def activation_shift(df: pd.DataFrame, title: str = "Base -> RL logit-lens shift by base entropy") -> Figure:
    """Heatmap of mean KL(p_base || p_rl): rows = layer ("all" = pooled), columns = base-entropy bucket
    (low -> high)."""
    from analysis.measures.activation_shift import shift_matrix

    mat = shift_matrix(df)
    fig, ax = _fig(6.4, 1.2 + 0.35 * max(3, len(mat)))
    im = ax.imshow(mat.to_numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(mat.columns)), list(mat.columns), rotation=25, fontsize=7, ha="right")
    ax.set_yticks(range(len(mat.index)), list(mat.index))
    for (i, j), v in np.ndenumerate(mat.to_numpy()):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                f"{v:.2g}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if v < np.nanmax(mat.to_numpy()) / 2 else "k",
            )
    fig.colorbar(im, ax=ax, label="mean KL (nats)")
    return _finish(fig, ax, title, "base-model logit-lens entropy bucket", "layer", legend=False)


def correctness_auroc(df: pd.DataFrame, direction: str = "diff_means") -> Figure:
    """Read-out quality of the correctness direction per layer at the last saved step: AUROC against
    reward over held-out prompts (solid) and within-group pairwise accuracy (dotted), each with the mean
    log-prob baseline (dashed); one colour per run."""
    fig, ax = _fig()
    d = df[df["direction"] == direction]
    for run, g in _runs(d):
        last = g[g["step"] == g["step"].max()].sort_values("layer")
        step = int(last["step"].iloc[0])
        (line,) = ax.plot(
            last["layer"],
            last["auroc"],
            marker="o",
            ms=3,
            label=" ".join(x for x in (run, f"AUROC <h, v> (step {step})") if x),
        )
        c = line.get_color()
        ax.axhline(
            float(last["auroc_logp"].iloc[0]),
            color=c,
            ls="--",
            lw=1,
            label=" ".join(x for x in (run, "AUROC mean log-prob") if x),
        )
        if "pairwise_acc" in last and last["pairwise_acc"].notna().any():
            ax.plot(
                last["layer"],
                last["pairwise_acc"],
                ls=":",
                marker="s",
                ms=3,
                color=c,
                label=" ".join(x for x in (run, "pairwise acc. <h, v>") if x),
            )
    ax.axhline(0.5, color="k", lw=0.7)
    ax.set_ylim(0, 1)
    return _finish(
        fig,
        ax,
        f"Correctness read-out on held-out prompts ({direction})",
        "layer (0 = embeddings)",
        "AUROC / pairwise accuracy (0.5 = chance)",
    )


def correctness_heatmap(df: pd.DataFrame, direction: str = "diff_means", value: str = "auroc") -> Figure:
    """Layer x step heatmap of AUROC (or cos_to_first) of the correctness direction (one run)."""
    d = df[df["direction"] == direction]
    mat = d.pivot_table(index="layer", columns="step", values=value, aggfunc="mean")
    fig, ax = _fig(6.4, 0.8 + 0.35 * max(3, len(mat)))
    vmin, vmax = (0.0, 1.0) if value == "auroc" else (-1.0, 1.0)
    im = ax.imshow(
        mat.to_numpy(),
        aspect="auto",
        cmap="RdBu_r",
        vmin=vmin,
        vmax=vmax,
        origin="lower",
        interpolation="nearest",
    )
    _step_ticks(ax, list(mat.columns))
    ax.set_yticks(range(len(mat.index)), [str(i) for i in mat.index])
    fig.colorbar(im, ax=ax, label="AUROC" if value == "auroc" else "cos to first step")
    return _finish(fig, ax, f"Correctness direction {value} ({direction})", STEP, "layer", legend=False)


def passk_curves(
    curves: pd.DataFrame,
    title: str = "pass@k: base (step 0) vs trained policy",
    replay: pd.DataFrame | None = None,
) -> Figure:
    """pass@k against k (log scale) for the first and last evaluated step of each run, crossing marked.

    `replay` (`analysis.measures.passk.replay_curves`, with a `run` column for several runs): the same
    steps evaluated with Activation Replay (eval.replay), dotted, in the colour of the plain curve.
    """
    from analysis.measures.passk import crossing

    fig, ax = _fig()
    for run, g in _runs(curves):
        steps = sorted(g["step"].unique())
        prefix = f"{run}: " if run else ""
        rp = None
        if replay is not None and len(replay):
            rp = replay[replay["run"] == run] if "run" in replay.columns and run else replay
        for step, style in ((steps[0], "--"), (steps[-1], "-")) if len(steps) > 1 else ((steps[0], "-"),):
            c = g[g["step"] == step]
            (line,) = ax.plot(c["k"], c["pass_at_k"], style, marker="o", ms=2.5, label=f"{prefix}step {step}")
            for mode, r in rp.groupby("replay", sort=True) if rp is not None else ():
                r = r[r["step"] == step]
                if len(r):
                    ax.plot(
                        r["k"],
                        r["pass_at_k"],
                        ":",
                        marker="x",
                        ms=3,
                        color=line.get_color(),
                        label=f"{prefix}step {step} + replay ({mode})",
                    )
        k = crossing(g.drop(columns=["run"], errors="ignore")).get("crossing_k")
        if k is not None:
            ax.axvline(k, color="grey", lw=0.8, ls=":")
            ax.annotate(f"cross k={k}", (k, 0.02), fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4 ... not 1.0, 2.0
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("k (samples, log scale)")
    ax.set_ylabel("unbiased pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
