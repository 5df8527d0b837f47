"""One self-contained HTML report comparing runs (embedded base64 PNGs and tables).

Sections: overview, training curves, evaluation during training (pass@k), rollouts, gradient alignment, ReLaX, entropy dynamics, activation shift,
correctness direction. A section appears only when at least one run recorded its data; a diagnostic
that fails on unexpected data is reported in "Analysis notes" (and raised with `strict=True`) instead of
breaking the report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis import plots
from analysis.loader import Run, RunSet, load_runs
from analysis.measures import (
    activation_shift,
    correctness,
    correctness_probe,
    entropy,
    grad_alignment,
    h_neurons,
    hidden_rank,
    passk,
    probes,
    relax,
    rollouts,
    training,
)

MAX_TABLE_ROWS = 30


@dataclass
class Section:
    title: str
    intro: str = ""
    parts: list[str] = field(default_factory=list)

    def figure(self, fig, caption: str = "") -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(
            f'<figure><img alt="{html.escape(caption or self.title)}" src="data:image/png;base64,{data}"/>{cap}</figure>'
        )

    def table(self, df: pd.DataFrame, caption: str = "", max_rows: int = MAX_TABLE_ROWS) -> None:
        note = ""
        if len(df) > max_rows:
            note = f"<p class='note'>first {max_rows} of {len(df)} rows</p>"
            df = df.head(max_rows)
        cap = f"<h4>{html.escape(caption)}</h4>" if caption else ""
        body = df.to_html(index=False, border=0, classes="tbl", float_format=lambda x: f"{x:.4g}", na_rep="")
        self.parts.append(f"{cap}<div class='scroll'>{body}</div>{note}")

    def text(self, s: str) -> None:
        self.parts.append(f"<p>{html.escape(s)}</p>")

    def __bool__(self) -> bool:
        return bool(self.parts)


# ---- section builders: each returns a Section or None (omitted) ------------------------------------------


def _per_run(runs: RunSet, fn: Callable[[Run], pd.DataFrame]) -> dict[str, pd.DataFrame]:
    out = {}
    for r in runs:
        df = fn(r)
        if df is not None and len(df):
            out[r.label] = df
    return out


def overview(runs: RunSet) -> Section:
    s = Section("Runs", "One row per run: config, logged steps, last logged values and held-out evaluation.")
    s.table(training.eval_summary(runs), max_rows=100)
    rows = []
    for r in runs:
        for f in r.files:
            rows.append(
                {
                    "run": r.label,
                    "instrument": f.instrument,
                    "file": f.entry["path"],
                    "format": f.format,
                    "schema": f.schema_version,
                    "rank": f.rank,
                }
            )
    if rows:
        s.table(
            pd.DataFrame(rows)
            .groupby(["run", "instrument", "format"], as_index=False)
            .agg(files=("file", "count"), schema=("schema", "max")),
            "Recorded diagnostics",
        )
    return s


def training_section(runs: RunSet) -> Section | None:
    long = training.training_curves(runs)
    if not len(long):
        return None
    s = Section("Training curves", "TRL metrics from metrics.jsonl, aligned on the optimizer step.")
    for metric in training.STANDARD:
        if (long["metric"] == metric).any():
            s.figure(plots.metric_curves(long, metric), metric)
    return s


def _metric_figures(s: Section, long: pd.DataFrame) -> None:
    """One curve figure per metric of a long (run, step, metric, value) table, in name order."""
    for metric in sorted(long["metric"].unique()):
        s.figure(plots.metric_curves(long, metric), metric)


def eval_section(runs: RunSet) -> Section | None:
    curves = _per_run(runs, passk.passk_curves)
    over = _per_run(runs, passk.eval_over_steps)
    if not (curves or over):
        return None
    s = Section(
        "Evaluation during training",
        "Held-out greedy accuracy and unbiased pass@k at step 0 (the base policy), every eval.every steps and at "
        "the end. The pass@k curve compares the base with the trained policy for every k up to the number of "
        "samples per prompt; 'crossing k' is where the base catches up.",
    )
    replayed = _per_run(runs, passk.replay_curves)
    if over:
        _metric_figures(s, plots.with_run(over))
    if curves:
        figure = plots.passk_curves(
            plots.with_run(curves), replay=plots.with_run(replayed) if replayed else None
        )
        caption = "pass@k, base vs trained policy" + (", dotted: with Activation Replay" if replayed else "")
        s.figure(figure, caption)
        table = pd.DataFrame([{"run": label, **passk.crossing(df)} for label, df in curves.items()])
        s.table(table, "Base vs trained policy")
    if replayed:
        gains = [passk.replay_gain(curves.get(label), df) for label, df in replayed.items()]
        table = pd.concat([g.assign(run=label) for label, g in zip(replayed, gains)], ignore_index=True)
        s.table(
            table[["run", *[c for c in table.columns if c != "run"]]],
            "Activation Replay (eval.replay): pass@k with and without replay at each evaluated step",
            max_rows=200,
        )
    return s


def rollouts_section(runs: RunSet, max_rounds: int = 4) -> Section | None:
    samples = {r.label: df for r in runs for df in [rollouts.rollout_samples(r)] if df is not None}
    pairs = {r.label: df for r in runs for df in [rollouts.preference_pairs(r)] if df is not None}
    if not (samples or pairs):
        return None
    s = Section(
        "Rollouts",
        "What the policy generated (diagnostics.rollouts keeps a fraction of every round): for the first and last "
        "dumped rounds, the prompt group with the highest and the lowest mean reward, with rewards and advantages.",
    )
    for label, df in samples.items():
        rounds = sorted(df["round"].unique())
        picked = sorted(set(rounds[: max_rounds // 2] + rounds[-(max_rounds - max_rounds // 2) :]))
        s.table(rollouts.best_worst_groups(df, picked), f"{label}: best and worst groups", max_rows=120)
    for label, df in pairs.items():
        counts = df.groupby(["split", "chosen_source", "rejected_source"]).size().reset_index(name="pairs")
        s.table(counts, f"{label}: preference pairs by source (verification)")
        s.table(df.head(10), f"{label}: first preference pairs")
    return s


def grad_alignment_section(runs: RunSet) -> Section | None:
    comps = _per_run(runs, grad_alignment.components)
    if not comps:
        return None
    s = Section(
        "Gradient alignment",
        "G = <grad NLL(D'), grad L>: a descent step of size eta on L lowers the target responses' NLL by about "
        "eta*G (arXiv 2512.00778). Positive learning = tokens whose log-prob the loss raises, negative = lowers; "
        "update = the optimizer's realised step.",
    )
    s.figure(plots.grad_components(plots.with_run(comps)), "G by component")
    if all("cos" in c.columns for c in comps.values()):
        s.figure(
            plots.grad_components(plots.with_run(comps), what="cos", title="Cosine alignment by component"),
            "cos by component",
        )
    terts = _per_run(runs, grad_alignment.tertiles)
    if terts:
        s.figure(
            plots.grad_components(plots.with_run(terts), title="Loss-reweighting tertiles of |w_t|"),
            "tertiles",
        )
    rz = _per_run(runs, grad_alignment.realised)
    if rz:
        s.figure(plots.realised_vs_measured(plots.with_run(rz)), "realised vs measured")
    pn = _per_run(runs, grad_alignment.pos_neg_cosine)
    if pn:
        s.figure(plots.pos_neg_cosine(plots.with_run(pn)), "cos(pos, neg)")
    for label, lg in _per_run(runs, grad_alignment.layer_groups).items():
        s.figure(plots.layer_group_heatmap(lg, f"G per layer group: {label}"), f"layer groups {label}")
    dr = _per_run(runs, grad_alignment.drift)
    if dr:
        s.figure(plots.drift(plots.with_run(dr)), "drift")
    for label, sim in _per_run(runs, grad_alignment.sketch_similarity).items():
        s.figure(
            plots.similarity_matrix(sim, f"Sketch cosine matrix ({sim['kind'].iloc[0]}): {label}"),
            f"similarity {label}",
        )
    cls = _per_run(runs, grad_alignment.classify)
    if cls:
        s.table(pd.concat(cls.values(), ignore_index=True).drop(columns=["rule"]), "Regime classification")
        s.text("Rule: " + grad_alignment.RULE + " (docs/gradient_alignment.md, Definitions).")
    return s


def relax_section(runs: RunSet) -> Section | None:
    dsd = _per_run(runs, relax.dsd_over_steps)
    mf = _per_run(runs, relax.masked_fraction)
    sp = _per_run(runs, relax.spectra)
    fit = _per_run(runs, relax.dictionary_fit)
    if not (dsd or mf or sp or fit):
        return None
    s = Section(
        "ReLaX: latent dynamics",
        "DSD = variance of the singular values of each trajectory's Koopman matrix on last-layer states "
        "(arXiv 2512.07558). Trajectories above xi are KL-masked and get no further DSD push.",
    )
    if dsd:
        s.figure(plots.dsd_over_steps(plots.with_run(dsd)), "DSD over steps")
    if mf:
        s.figure(plots.masked_fraction(plots.with_run(mf)), "masked fraction")
    for label, df in sp.items():
        s.figure(plots.spectra(df), f"spectra {label}")
    if fit:
        s.figure(plots.dictionary_fit(plots.with_run(fit)), "dictionary fit")
        summ = _per_run(runs, relax.dictionary_fit_summary)
        if summ:
            s.table(
                plots.with_run(summ),
                "Dictionary fits: residual on the whole fitting set before and after, relative change of W",
            )
    if dsd:
        last = plots.with_run(dsd)
        last = last[last["step"] == last.groupby("run")["step"].transform("max")]
        s.table(last, "DSD at the last recorded step")
    return s


def entropy_section(runs: RunSet) -> Section | None:
    dyn = _per_run(runs, entropy.entropy_dynamics)
    logged = _per_run(runs, entropy.entropy_metrics)
    if not (dyn or logged):
        return None
    s = Section(
        "Entropy dynamics",
        "Training batches: the entropy and Cov(log pi, A) statistics the trainer and instruments logged. "
        "Probe set (diagnostics.activations): per-token policy entropy and log-prob of the probe completions; "
        "Cov(log pi, A) is the token-level covariance of Cui et al. (arXiv 2505.22617) with group advantages.",
    )
    if logged:
        _metric_figures(s, plots.with_run(logged))
    if dyn:
        df = plots.with_run(dyn)
        s.figure(plots.entropy_quantiles(df), "entropy quantiles")
        s.figure(plots.high_entropy_fraction(df), "high-entropy token fraction")
        s.figure(plots.logp_advantage_covariance(df), "Cov(log pi, A), probe set")
        cols = [
            "run",
            "step",
            "entropy_mean",
            "entropy_q50",
            "high_entropy_frac",
            "cov_logp_adv",
            "mean_reward",
        ]
        s.table(df[cols], "Probe set, per saved step")
    return s


def activation_shift_section(runs: RunSet) -> Section | None:
    tabs = _per_run(runs, activation_shift.activation_shift)
    if not tabs:
        return None
    s = Section(
        "Activation shift by base entropy",
        "KL(p_base || p_RL) of logit-lens distributions at input positions, by layer and base-model "
        "entropy bucket (Activation Replay, arXiv 2511.19972): low-entropy positions are expected to move most.",
    )
    for label, t in tabs.items():
        s.figure(plots.activation_shift(t, f"Logit-lens shift: {label}"), f"shift {label}")
        s.table(
            activation_shift.shift_matrix(t).reset_index(),
            f"Mean KL (nats), layer x base-entropy bucket: {label}",
        )
    return s


def correctness_section(runs: RunSet) -> Section | None:
    tabs = _per_run(runs, correctness.correctness_direction)
    acc = _per_run(runs, correctness.probe_accuracy)
    if not (tabs or acc):
        return None
    s = Section(
        "Correctness direction",
        "Direction separating correct from wrong completions of the same probe prompt (RepE on GRPO-style "
        "groups; docs/analysis.md). Fitted on half of the probe prompts, AUROC on the other half, "
        "next to the AUROC of the policy's own mean log-prob.",
    )
    if tabs:
        df = plots.with_run(tabs)
        s.figure(plots.correctness_auroc(df, "diff_means"), "AUROC per layer (difference of means)")
        s.figure(plots.correctness_auroc(df, "pc1"), "AUROC per layer (first PC)")
        for label, t in tabs.items():
            if t["step"].nunique() > 1:
                s.figure(plots.correctness_heatmap(t), f"AUROC heatmap {label}")
        last = df[df["step"] == df.groupby("run")["step"].transform("max")]
        s.table(last.sort_values(["run", "direction", "layer"]), "Last saved step")
    if acc:
        s.table(plots.with_run(acc), "Probe set: accuracy and groups with both outcomes")
    if not tabs:
        s.text("No probe prompt had both correct and wrong completions, so no direction could be fitted.")
    return s


def _finish_axes(ax, title: str, ylabel: str | None = None, xlabel: str = plots.STEP, size: int = 10) -> None:
    """Title, axis labels, grid and, when a line is labelled, a small legend (the monitor sections' panels)."""
    ax.set_title(title, fontsize=size)
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=8 if size < 10 else None)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")


def _correctness_probe_figure(df: pd.DataFrame, title: str):
    """Left: AUROC of the probe per layer (solid), of the mean log-prob (dashed) and their gap (dotted) over steps.
    Right: drift cos(v_t, v_first) per layer (solid) and update alignment cos(v, -dL/dh) (dashed)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    logp = df.groupby("step", as_index=False)["auroc_logp"].first()
    ax.plot(logp["step"], logp["auroc_logp"], "k--", marker="o", ms=2.5, label="AUROC mean log-prob")
    for layer, g in df.groupby("layer"):
        g = g.sort_values("step")
        (line,) = ax.plot(g["step"], g["auroc"], "-", marker="o", ms=2.5, label=f"L{layer} AUROC <h, v>")
        c = line.get_color()
        ax.plot(g["step"], g["gap"], ":", color=c, marker="s", ms=2, label=f"L{layer} gap")
        ax2.plot(
            g["step"], g["cos_to_first"], "-", color=c, marker="o", ms=2.5, label=f"L{layer} cos to first"
        )
        ax2.plot(
            g["step"], g["update_cos"], "--", color=c, marker="s", ms=2, label=f"L{layer} cos(v, -dL/dh)"
        )
    ax.axhline(0.5, color="grey", lw=0.6)
    ax.axhline(0.0, color="grey", lw=0.4)
    ax2.axhline(0.0, color="grey", lw=0.6)
    _finish_axes(ax, f"{title}: held-out AUROC and gap", "AUROC (gap = probe - log-prob)")
    _finish_axes(ax2, f"{title}: drift and update alignment", "cosine")
    fig.tight_layout()
    return fig


def correctness_probe_section(runs: RunSet) -> Section | None:
    tabs = _per_run(runs, correctness_probe.correctness_probe)
    if not tabs:
        return None
    s = Section(
        "Correctness probe (training rollouts)",
        "A direction separating correct from wrong rollouts of the same prompt at the answer-final token, fitted "
        "at each measured step on half of the step's prompt groups and scored on the other half (diagnostics."
        "correctness_probe; RepE reading, arXiv 2512.07404). AUROC of <h, v> next to the AUROC of the policy's own "
        "mean log-prob ('knows vs says' gap), drift of the direction from the first one, and cos(v, -dL/dh): whether "
        "the loss pushes the response's residual states along it.",
    )
    for label, t in tabs.items():
        s.figure(_correctness_probe_figure(t, label or "run"), f"correctness probe {label}")
    df = plots.with_run(tabs)
    last = df[df["step"] == df.groupby("run")["step"].transform("max")]
    cols = ["run", "step", "layer", "direction", "frozen", "auroc", "auroc_logp", "gap", "pairwise_acc"]
    cols += ["pairwise_acc_logp", "cos_to_first", "update_cos", "n_fit_groups", "n_eval", "accuracy"]
    s.table(last[cols], "Last measured step")
    bon = _per_run(runs, correctness_probe.best_of_n)
    if bon:
        b = plots.with_run(bon)
        b = b[b["step"] == b.groupby("run")["step"].transform("max")]
        s.table(
            b,
            "Best of N on held-out prompts (last step): share correct when picking by the probe, by log-prob",
        )
    return s


def _h_neurons_figure(
    mass: pd.DataFrame,
    share: pd.DataFrame,
    stab: pd.DataFrame,
    hist: pd.DataFrame,
    auc: pd.DataFrame,
    title: str,
):
    """2 x 2: CETT mass of H0 by reward bucket vs the random sets; gradient share / chance; Jaccard with H0 vs chance
    over refits (and the split-half yardstick) with the frozen probe's AUROC; H0 per decoder block."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.4))
    (a1, a2), (a3, a4) = axes
    colors = {"wrong": "tab:red", "correct": "tab:green"}
    for (bucket, name), g in mass.groupby(["bucket", "set"], sort=False):
        g = g.sort_values("step")
        ls = {"H0": "-", "random": ":", "matched": "--"}.get(name, "-.")
        a1.plot(
            g["step"], g["mass"], ls, color=colors.get(bucket), marker="o", ms=2.5, label=f"{name} {bucket}"
        )
    if len(share):
        a2.plot(share["step"], share["ratio_down"], "-o", ms=2.5, label="H0, W_down columns")
        a2.plot(share["step"], share["ratio_mlp"], "-s", ms=2.5, label="H0, W_down + W_up + W_gate")
        a2.plot(share["step"], share["ratio_down_random"], ":", color="grey", label="random sets, W_down")
        a2.plot(share["step"], share["ratio_down_matched"], "--", color="k", label="matched sets, W_down")
        a2.axhline(1.0, color="k", lw=0.7)
    refits = stab[stab["step"] > stab["step"].min()] if len(stab) else stab
    if len(stab):
        a3.plot(refits["step"], refits["jaccard"], "-o", ms=3, label="J(H0, H_t)")
        a3.plot(refits["step"], refits["cross_jaccard"], "-s", ms=3, label="J half vs half, across time")
        a3.plot(stab["step"], stab["split_jaccard"], ":^", ms=3, label="J half vs half, same step")
        a3.plot(refits["step"], refits["jaccard_chance"], "--", color="grey", label="chance")
    if len(auc):
        a3b = a3.twinx()
        a3b.plot(auc["step"], auc["auroc"], color="tab:purple", lw=1, alpha=0.7, label="frozen probe AUROC")
        a3b.set_ylim(0, 1)
        a3b.set_ylabel("AUROC (wrong vs correct)", fontsize=8)
        a3b.legend(fontsize=6, loc="lower right")
    h0 = hist[(hist["fit"] == "full") & (hist["step"] == hist["step"].min())] if len(hist) else hist
    if len(h0):
        a4.bar(h0["layer"], h0["n_neurons"], color="tab:blue")
    for a, t, xl, yl in (
        (a1, "CETT mass on answer tokens", plots.STEP, "sum of CETT over the set (mean per rollout)"),
        (a2, "gradient share on the set / chance", plots.STEP, "share of ||grad||^2 / (|H0| / L m)"),
        (a3, "set stability over refits", plots.STEP, "Jaccard"),
        (a4, "H0 per decoder block", "decoder block", "neurons in H0"),
    ):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish_axes(a, f"{title}: {t}", yl, xlabel=xl, size=9)
    fig.tight_layout()
    return fig


def h_neurons_section(runs: RunSet) -> Section | None:
    mass = _per_run(runs, h_neurons.mass_by_bucket)
    share = _per_run(runs, h_neurons.gradient_share)
    stab = _per_run(runs, h_neurons.stability)
    if not (mass or share or stab):
        return None
    hist = _per_run(runs, h_neurons.layer_histogram)
    auc = _per_run(runs, h_neurons.transfer)
    s = Section(
        "H-Neurons",
        "A sparse set H0 of MLP neurons whose CETT (share of the MLP output norm) on answer tokens predicts a wrong "
        "answer, fitted by L1 logistic regression on the base model's step-1 rollouts and then frozen "
        "(diagnostics.h_neurons; arXiv 2512.01797). Its CETT mass by reward bucket next to layer-matched random "
        "sets and activation-matched ones (same layer, close mean CETT), the share of each update's squared "
        "gradient norm on its MLP weights against chance |H0| / (L m) and the same control sets, "
        "and refits every refit_every steps: Jaccard with H0 against chance, next to the Jaccard of two half-data "
        "fits of one step (what resampling alone leaves).",
    )
    labels = list(dict.fromkeys([*mass, *share, *stab]))
    for label in labels:
        e = lambda d, cols, label=label: d.get(label, pd.DataFrame(columns=cols))  # noqa: E731
        s.figure(
            _h_neurons_figure(
                e(mass, h_neurons.MASS_COLUMNS),
                e(share, h_neurons.SHARE_COLUMNS),
                e(stab, h_neurons.STABILITY_COLUMNS),
                e(hist, h_neurons.LAYER_COLUMNS),
                e(auc, h_neurons.TRANSFER_COLUMNS),
                label or "run",
            ),
            f"H-Neurons {label}",
        )
    if stab:
        s.table(
            plots.with_run(stab), "Fits: |H|, Jaccard / overlap with H0 against chance, split-half Jaccard"
        )
    if share:
        t = plots.with_run(share)
        cols = ["ratio_down", "ratio_mlp", "ratio_down_random", "ratio_down_matched"]
        t = t.groupby("run", as_index=False)[cols].mean()
        s.table(t, "Gradient share / chance, mean over measured steps")
    return s


def _hidden_rank_figure(rank: pd.DataFrame, dsd: pd.DataFrame | None):
    """erank by bucket, d1/d2 by bucket and (when a run has ReLaX data) DSD over steps, side by side."""
    panels = 3 if dsd is not None and len(dsd) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    styles = {"all": "-", "correct": "--", "wrong": ":"}
    for run, g in plots._runs(rank):
        colour = None
        for bucket, h in g.groupby("bucket", sort=False):
            h = h.sort_values("step")
            lbl = " ".join(x for x in (run, bucket) if x)
            (line,) = axes[0].plot(
                h["step"], h["erank"], styles.get(bucket, "-"), marker="o", ms=2.5, label=lbl, color=colour
            )
            colour = line.get_color()
            if bucket == "all" and h["erank_q10"].notna().any():
                axes[0].fill_between(h["step"], h["erank_q10"], h["erank_q90"], color=colour, alpha=0.12)
            for value, marker in (("d1", "o"), ("d2", "s")):
                if h[value].notna().any():
                    axes[1].plot(
                        h["step"],
                        h[value],
                        styles.get(bucket, "-"),
                        marker=marker,
                        ms=2.5,
                        color=colour,
                        label=f"{lbl} {value}",
                    )
    axes[0].set_ylabel("effective rank of last hidden states")
    axes[1].set_ylabel("mean prefix difference of the effective rank")
    axes[1].axhline(0.0, color="grey", lw=0.6)
    if panels == 3:
        for run, g in plots._runs(dsd):
            g = g.sort_values("step")
            axes[2].plot(g["step"], g["mean"], "-", marker="o", ms=2.5, label=run or "all")
        axes[2].set_ylabel("ReLaX DSD, mean over trajectories")
        axes[2].set_yscale("symlog", linthresh=1e-2)
    for ax, title in zip(
        axes, ("Effective rank by reward bucket", "d1 (o), d2 (s) by bucket", "DSD (ReLaX)")
    ):
        _finish_axes(ax, title)
    fig.tight_layout()
    return fig


def hidden_rank_section(runs: RunSet) -> Section | None:
    rank = _per_run(runs, hidden_rank.rank_over_steps)
    if not rank:
        return None
    dsd = _per_run(runs, relax.dsd_over_steps)
    dsd = {k: v[v["subset"] == "all"] for k, v in dsd.items() if k in rank}
    s = Section(
        "Hidden-state effective rank",
        "Effective rank exp(H) of each rollout's last hidden states over its response (H = entropy of the normalised "
        "singular values), and its mean first / second differences over response prefixes (hf618/VERL's "
        "definitions; docs/probes.md), by reward bucket. ReLaX's DSD over steps alongside when the run has it.",
    )
    s.figure(
        _hidden_rank_figure(plots.with_run(rank), plots.with_run(dsd) if dsd else None),
        "effective rank, prefix differences" + (" and DSD" if dsd else "") + " over steps",
    )
    both = _per_run(runs, hidden_rank.rank_and_dsd)
    if both:
        s.table(plots.with_run(both), "Effective rank (all rollouts) and DSD per step")
    last = plots.with_run(rank)
    last = last[last["step"] == last.groupby("run")["step"].transform("max")]
    s.table(last, "Last measured step")
    return s


def _probe_figure(sc: pd.DataFrame, au: pd.DataFrame, probe: str):
    """Mean score by reward bucket (10-90% band) and AUROC of one probe over steps."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    styles = {"all": "-", "correct": "--", "wrong": ":"}
    for run, g in plots._runs(sc[sc["probe"] == probe]):
        colour = None
        for bucket, h in g.groupby("bucket", sort=False):
            h = h.sort_values("step")
            lbl = " ".join(x for x in (run, bucket) if x)
            (line,) = ax.plot(
                h["step"], h["mean"], styles.get(bucket, "-"), marker="o", ms=2.5, label=lbl, color=colour
            )
            colour = line.get_color()
            if bucket != "all" and h["q10"].notna().any():
                ax.fill_between(h["step"], h["q10"], h["q90"], color=colour, alpha=0.1)
    for run, g in plots._runs(au[au["probe"] == probe]):
        g = g.sort_values("step")
        ax2.plot(g["step"], g["auroc"], "-", marker="o", ms=2.5, label=run or probe)
    ax2.axhline(0.5, color="grey", lw=0.6)
    ax2.set_ylim(0, 1)
    _finish_axes(ax, f"Probe {probe}: score by reward bucket", "score <h, v> + b")
    _finish_axes(ax2, f"Probe {probe}: AUROC vs correct", "AUROC")
    fig.tight_layout()
    return fig


def probes_section(runs: RunSet) -> Section | None:
    sc = _per_run(runs, probes.score_over_steps)
    au = _per_run(runs, probes.probe_auroc)
    if not (sc or au):
        return None
    s = Section(
        "Linear probes",
        "Your frozen linear probes (diagnostics.probes) scored on every rollout of the scored steps: "
        "s = <h_layer(position), direction> + bias; mean score per reward bucket and AUROC against correct.",
    )
    sc_all = plots.with_run(sc) if sc else pd.DataFrame(columns=probes.SCORE_COLUMNS)
    au_all = plots.with_run(au) if au else pd.DataFrame(columns=probes.AUROC_COLUMNS)
    names = sorted(set(sc_all["probe"]) | set(au_all["probe"]))
    for name in names:
        s.figure(_probe_figure(sc_all, au_all, name), f"probe {name}")
    if au:
        last = au_all[au_all["step"] == au_all.groupby("run")["step"].transform("max")]
        s.table(last, "AUROC at the last scored step")
    return s


SECTIONS: list[Callable[[RunSet], Section | None]] = [
    overview,
    training_section,
    eval_section,
    rollouts_section,
    grad_alignment_section,
    relax_section,
    entropy_section,
    activation_shift_section,
    correctness_section,
    correctness_probe_section,
    h_neurons_section,
    hidden_rank_section,
    probes_section,
]


def build_sections(runs: RunSet, strict: bool = False) -> tuple[list[Section], list[str]]:
    """All non-empty sections and the notes of builders that failed (raised when `strict`)."""
    out, notes = [], []
    for builder in SECTIONS:
        try:
            sec = builder(runs)
        except Exception as e:
            if strict:
                raise
            msg = f"{builder.__name__}: {type(e).__name__}: {e}"
            warnings.warn(f"analysis report: section skipped ({msg})", stacklevel=2)
            notes.append(msg)
            plt.close("all")
            continue
        if sec:
            out.append(sec)
    return out, notes


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h4{margin:.8em 0 .3em}
figure{display:inline-block;width:48%;margin:.5%;vertical-align:top}figure img{width:100%}figcaption{font-size:.8em;color:#666}
.tbl{border-collapse:collapse;font-size:.8em}.tbl td,.tbl th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
.scroll{overflow-x:auto}.note{color:#888;font-size:.8em}.warn{color:#a40}nav a{margin-right:1em}
"""


def render_html(runs: RunSet, sections: list[Section], notes: list[str]) -> str:
    title = "rlx report: " + ", ".join(r.label for r in runs)
    nav = " ".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections))
    body = []
    for i, s in enumerate(sections):
        intro = f"<p>{html.escape(s.intro)}</p>" if s.intro else ""
        body.append(f"<section id='s{i}'><h2>{html.escape(s.title)}</h2>{intro}{''.join(s.parts)}</section>")
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        body.append(f"<section><h2>Analysis notes</h2><ul class='warn'>{items}</ul></section>")
    skipped = [m for r in runs for m in r.skipped]
    if skipped:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in skipped)
        body.append(f"<section><h2>Skipped files</h2><ul class='warn'>{items}</ul></section>")
    dirs = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in runs)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>{dirs}</ul>"
        f"<p class='note'>generated {stamp} by python -m analysis report</p><nav>{nav}</nav>{''.join(body)}</body></html>"
    )


def write_report(run_dirs: Iterable[str | Path] | str | Path, out: str | Path, strict: bool = False) -> Path:
    """Load `run_dirs`, build every section they support and write one self-contained HTML file to `out`.

    `strict=True` makes unreadable files and failing sections raise instead of being noted in the report.
    Returns the path written."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs = load_runs(run_dirs, strict=strict)
    sections, notes = build_sections(runs, strict=strict)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(runs, sections, notes), encoding="utf-8")
    return out


def summary_text(run: Run) -> str:
    """A plain-text summary of one run (the `summary` CLI)."""
    lines = [
        f"run: {run.path}",
        f"algo: {run.algo}  recipe: {run.recipe or '-'}  logged steps: {len(run.metrics)}",
    ]
    ov = training.eval_summary(RunSet([run])).drop(columns=["run"]).T
    lines += ["", ov.to_string(header=False)]
    inst = sorted({f.instrument for f in run.files})
    lines += ["", "diagnostics: " + (", ".join(inst) if inst else "none")]
    blocks = [
        (
            "gradient alignment regime",
            grad_alignment.classify,
            ["target", "n_steps", "frac_positive", "cv", "regime"],
        ),
        ("ReLaX DSD (last step)", lambda r: _last(relax.dsd_over_steps(r)), None),
        (
            "entropy dynamics",
            entropy.entropy_dynamics,
            ["step", "entropy_mean", "high_entropy_frac", "cov_logp_adv"],
        ),
        (
            "correctness direction (last step, diff_means)",
            lambda r: _last(correctness.correctness_direction(r).query("direction == 'diff_means'")),
            ["layer", "auroc", "auroc_logp", "gap"],
        ),
        (
            "activation shift (layer x bucket mean KL, nats)",
            lambda r: activation_shift.shift_matrix(activation_shift.activation_shift(r)),
            None,
        ),
    ]
    for title, fn, cols in blocks:
        df = fn(run)
        if df is None or not len(df):
            continue
        if cols:
            df = df[[c for c in cols if c in df.columns]]
        lines += [
            "",
            f"{title}:",
            df.to_string(index=not isinstance(df.index, pd.RangeIndex), float_format=lambda x: f"{x:.4g}"),
        ]
    if run.skipped:
        lines += ["", "skipped files:", *run.skipped]
    return "\n".join(lines)


def _last(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["step"] == df["step"].max()] if len(df) else df
