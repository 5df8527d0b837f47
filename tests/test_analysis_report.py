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
]


@pytest.fixture(scope="module")
def synth_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return [
        make_run(
            root / "grpo", "grpo", steps=6, grad_alignment=True, activations=True, activation_shift=True
        ),
        make_run(root / "relax", "grpo", steps=6, relax=True, world_size=2, seed=1),
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


def test_summary_text(synth_runs):
    text = summary_text(Run(synth_runs[0]))
    assert "algo: grpo" in text and "gradient alignment regime" in text
    assert "correctness direction" in text and "activation shift" in text
