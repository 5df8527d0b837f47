"""HTML report on synthetic runs (no training): every section, PNGs decode, omission and failure handling."""

from __future__ import annotations

import base64
import io
import re

import pytest

from analysis import report as report_mod
from analysis.loader import Run
from analysis.report import summary_text, write_report
from analysis.synthetic import make_run

ALL_SECTIONS = [
    "Runs",
    "Training curves",
    "Gradient alignment",
    "ReLaX: latent dynamics",
    "Entropy dynamics",
    "Activation shift by base entropy",
    "Correctness direction",
    "H-Neurons",
    "Hidden-state effective rank",
    "Linear probes",
]


@pytest.fixture(scope="module")
def synth_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return [
        make_run(
            root / "grpo",
            "grpo",
            steps=6,
            grad_alignment=True,
            activations=True,
            activation_shift=True,
            h_neurons=True,
        ),
        make_run(
            root / "relax", "grpo", steps=6, relax=True, world_size=2, seed=1, hidden_rank=True, probes=True
        ),
        make_run(root / "dpo", "dpo", steps=6, grad_alignment=True, seed=2),
    ]


def _decode_all(html: str) -> int:
    from PIL import Image

    srcs = re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(srcs) == len(re.findall(r"<img\b", html))
    for src in srcs:
        Image.open(io.BytesIO(base64.b64decode(src))).verify()
    return len(srcs)


@pytest.mark.slow
def test_every_section_and_every_image(synth_runs, tmp_path):
    out = write_report(synth_runs, tmp_path / "r.html", strict=True)
    html = out.read_text()
    assert re.findall(r"<h2>([^<]+)</h2>", html) == ALL_SECTIONS
    n = _decode_all(html)
    assert n >= 20
    # regime table: DPO planted supervised-like, the relax run has no gradient alignment (no row)
    assert "supervised-like" in html and "synthetic_dpo" in html


def test_sections_omitted_for_a_bare_run(tmp_path):
    bare = make_run(tmp_path / "bare", "dpo", steps=3)
    html = write_report([bare], tmp_path / "r.html", strict=True).read_text()
    assert re.findall(r"<h2>([^<]+)</h2>", html) == ["Runs", "Training curves"]
    _decode_all(html)


def test_failing_section_is_noted_not_fatal(synth_runs, tmp_path, monkeypatch):
    def boom(run):
        raise ValueError("unexpected column layout")

    monkeypatch.setattr(report_mod.relax, "dsd_over_steps", boom)
    with pytest.warns(UserWarning, match="relax_section"):
        html = write_report(synth_runs[1:2], tmp_path / "r.html").read_text()
    sections = re.findall(r"<h2>([^<]+)</h2>", html)
    assert "ReLaX: latent dynamics" not in sections and sections[-1] == "Analysis notes"
    assert "unexpected column layout" in html
    _decode_all(html)
    with pytest.raises(ValueError):
        write_report(synth_runs[1:2], tmp_path / "r2.html", strict=True)


def test_hidden_rank_and_probe_sections(synth_runs, tmp_path):
    """Rank with DSD alongside for a run that has ReLaX, rank alone without it; one figure per probe."""
    html = write_report(synth_runs[1:2], tmp_path / "r.html", strict=True).read_text()
    assert "Hidden-state effective rank" in html and "and DSD over steps" in html
    assert "Effective rank (all rollouts) and DSD per step" in html
    assert "probe planted" in html and "probe noise" in html and "AUROC at the last scored step" in html
    alone = make_run(tmp_path / "rank_only", "grpo", steps=4, hidden_rank=True)
    html = write_report([alone], tmp_path / "r2.html", strict=True).read_text()
    assert "Hidden-state effective rank" in html and "DSD" not in html.split("Hidden-state effective rank")[1]
    assert "Linear probes" not in re.findall(r"<h2>([^<]+)</h2>", html)
    _decode_all(html)


def test_summary_text(synth_runs):
    text = summary_text(Run(synth_runs[0]))
    assert "algo: grpo" in text and "gradient alignment regime" in text
    assert "correctness direction" in text and "activation shift" in text


def test_every_plot_returns_a_labelled_figure(synth_runs):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from analysis import plots
    from analysis.loader import load_runs
    from analysis.measures import activation_shift, correctness, entropy, grad_alignment, relax

    g, rx, d = (Run(p) for p in synth_runs)
    long = load_runs(synth_runs).metrics(["reward", "loss"])
    ent = entropy.entropy_dynamics(g)
    cd = correctness.correctness_direction(g)
    figs = {
        "metric_curves": plots.metric_curves(long, "loss"),
        "grad_components": plots.grad_components(grad_alignment.components(d)),
        "layer_group_heatmap": plots.layer_group_heatmap(grad_alignment.layer_groups(d)),
        "pos_neg_cosine": plots.pos_neg_cosine(grad_alignment.pos_neg_cosine(d)),
        "similarity_matrix": plots.similarity_matrix(grad_alignment.sketch_similarity(d)),
        "drift": plots.drift(grad_alignment.drift(d)),
        "realised_vs_measured": plots.realised_vs_measured(grad_alignment.realised(d)),
        "dsd_over_steps": plots.dsd_over_steps(relax.dsd_over_steps(rx)),
        "masked_fraction": plots.masked_fraction(relax.masked_fraction(rx)),
        "spectra": plots.spectra(relax.spectra(rx)),
        "dictionary_fit": plots.dictionary_fit(relax.dictionary_fit(rx)),
        "entropy_quantiles": plots.entropy_quantiles(ent),
        "high_entropy_fraction": plots.high_entropy_fraction(ent),
        "logp_advantage_covariance": plots.logp_advantage_covariance(ent),
        "activation_shift": plots.activation_shift(activation_shift.activation_shift(g)),
        "correctness_auroc": plots.correctness_auroc(cd),
        "correctness_heatmap": plots.correctness_heatmap(cd),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), name
        assert ax.has_data() or ax.images, name
        plt.close(fig)


def test_dictionary_fit_curve_and_table_in_report(synth_runs, tmp_path):
    from analysis.measures import relax

    rx = Run(synth_runs[1])
    curve = relax.dictionary_fit(rx)
    assert sorted(curve.fit_step.unique()) == [0, 50] and len(curve) == 64
    summ = relax.dictionary_fit_summary(rx)
    assert list(summ.fit_step) == [0, 50] and (summ.loss_after < summ.loss_before).all()
    html = write_report(synth_runs[1:2], tmp_path / "r.html", strict=True).read_text()
    assert 'alt="dictionary fit"' in html and "Dictionary fits: residual" in html
