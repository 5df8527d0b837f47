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
    entropy,
    grad_alignment,
    passk,
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
