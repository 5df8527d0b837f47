"""End to end: tiny real runs (grpo_tiny, grpo_relax_tiny, dpo_tiny) trained once per session, then the
report (every embedded PNG decodes; sections present/omitted per run), the CLI, the notebooks (nbclient,
headless) and the `diagnostics.activations` instrument's values."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SMALL = ["eval.num_prompts=16", f"trainer.max_steps={STEPS}"]
RUNS = {
    "grpo": (
        "grpo_tiny",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=1",
        "diagnostics.grad_alignment.target_size=32",
        "diagnostics.activations.enabled=true",
        "diagnostics.activations.every=2",
        "diagnostics.activations.num_prompts=12",
    ),
    "relax": ("grpo_relax_tiny",),
    "dpo": (
        "dpo_tiny",
        "preference.num_pairs=96",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=1",
        "diagnostics.grad_alignment.target_size=32",
    ),
}


@pytest.fixture(scope="session")
def real_runs(run_recipe) -> dict[str, Path]:
    """One small run per recipe, shared by every test here (run_recipe: tests/conftest.py)."""
    out = {}
    for key, (recipe, *overrides) in RUNS.items():
        if (REPO / "recipes" / f"{recipe}.yaml").exists():
            out[key] = run_recipe(recipe, *SMALL, *overrides)
    if "grpo" not in out:
        pytest.skip("grpo_tiny recipe missing")
    # the Activation Replay finding for the GRPO run (base = its warm start, RL = its final policy)
    from rlx.replay.analysis import main as replay_analysis

    replay_analysis([f"run_dir={out['grpo']}", "num_prompts=8"])
    return out


def _pngs(html: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    ]


@pytest.fixture(scope="session")
def report(real_runs, tmp_path_factory) -> Path:
    from analysis.report import write_report

    return write_report(
        list(real_runs.values()), tmp_path_factory.mktemp("report") / "report.html", strict=True
    )


def test_report_images_decode_and_sections_follow_recorded_data(report, real_runs):
    from PIL import Image

    html = report.read_text()
    n_img = len(re.findall(r"<img\b", html))
    pngs = _pngs(html)
    assert n_img == len(pngs) >= 8  # every <img> carries an embedded PNG
    for data in pngs:
        im = Image.open(io.BytesIO(data))
        im.verify()  # checks the PNG structure and CRCs
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.size[0] > 200 and im.size[1] > 150
        assert np.asarray(im.convert("L")).std() > 1  # not a blank canvas
    sections = re.findall(r"<h2>([^<]+)</h2>", html)
    assert sections[:2] == ["Runs", "Training curves"]
    expected = [
        "Rollouts",  # on by default for GRPO (and the DPO pairs)
        "Gradient alignment",
        "ReLaX: latent dynamics",
        "Entropy dynamics",
        "Activation shift by base entropy",
        "Correctness direction",
    ]
    assert sections[2:] == [x for x in expected if x != "ReLaX: latent dynamics" or "relax" in real_runs]
    assert "Analysis notes" not in html and "Skipped files" not in html  # nothing failed or was skipped
    # per-run omission inside a section: only the GRPO run recorded activations
    corr = html[html.index("<h2>Correctness direction</h2>") :]
    assert "grpo_tiny:" in corr and "dpo_tiny:" not in corr and "grpo_relax_tiny:" not in corr
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script" not in html  # self-contained


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get(
            "RLX_REQUIRE_BROWSER"
        ):  # .ci/run installed it: a missing browser is a failure there
            pytest.fail("RLX_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (.ci/run installs it from the Debian packages)")
    from PIL import Image

    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    # 1) every <img> decoded by the browser (complete && naturalWidth > 0), every table and image laid out with
    # a non-zero size, and no script or resource error reported to the page
    probe = tmp_path / "probe.html"
    js = (
        "<script>const errs=[];window.addEventListener('error',e=>errs.push(String(e.message||e.type)),true);"
        "window.addEventListener('load',()=>{const im=[...document.images],tb=[...document.querySelectorAll('table')];"
        "const shown=x=>x.offsetWidth>0&&x.offsetHeight>0;const b=document.body;"
        "b.setAttribute('data-images',im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length);"
        "b.setAttribute('data-visible',[...im,...tb].filter(shown).length+'/'+(im.length+tb.length));"
        "b.setAttribute('data-errors',errs.length+':'+errs.join('|'))})</script>"
    )
    probe.write_text(js + report.read_text())
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    loaded, total = map(int, re.search(r'data-images="(\d+)/(\d+)"', dom).groups())
    assert loaded == total == len(re.findall(r"<img\b", report.read_text())) > 0
    shown, elements = map(int, re.search(r'data-visible="(\d+)/(\d+)"', dom).groups())
    assert shown == elements > total  # every figure and every table has a size on the page
    assert re.search(r'data-errors="([^"]*)"', dom).group(1) == "0:"
    # 2) a screenshot: plots are drawn in colour, a blank or broken page would be (near) grey-scale
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,3000", f"--screenshot={shot}", report.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    px = np.asarray(Image.open(shot).convert("RGB"))
    assert px.shape == (3000, 1200, 3)
    assert (px.max(-1).astype(int) - px.min(-1)).max() > 100


def test_summary_cli_and_user_error_exit_code(real_runs, capsys, tmp_path):
    from analysis.__main__ import main

    assert main(["summary", str(real_runs["grpo"])]) == 0
    out = capsys.readouterr().out
    assert "algo: grpo" in out and "gradient alignment regime" in out and "correctness direction" in out
    broken = shutil.copytree(
        real_runs["grpo"], tmp_path / "broken", ignore=shutil.ignore_patterns("final", "tensorboard")
    )
    bad = broken / "diagnostics" / "grad_alignment" / "step_000001.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        main(["report", str(broken), "--out", str(tmp_path / "r.html")])
    assert e.value.code == 2
    assert "grad_alignment/step_000001.parquet" in capsys.readouterr().err
    assert main(["report", str(broken), "--out", str(tmp_path / "r.html"), "--lenient"]) == 0
    assert "Skipped files" in (tmp_path / "r.html").read_text()


def test_grad_alignment_table_agrees_with_instrument_summary(real_runs):
    from analysis.loader import Run
    from analysis.measures import grad_alignment

    for key in ("grpo", "dpo"):
        if key not in real_runs:
            continue
        r = Run(real_runs[key])
        cls = grad_alignment.classify(r).iloc[0]
        summ = json.loads((real_runs[key] / "diagnostics" / "grad_alignment_summary.json").read_text())
        assert cls["n_steps"] == summ["n_logged"] == STEPS
        assert cls["frac_positive"] == pytest.approx(summ["frac_positive"])
        assert cls["cv"] == pytest.approx(summ["cv"]) and cls["regime"] == summ["regime"]
        comp = grad_alignment.components(r).pivot_table(index="step", columns="component", values="G")
        other = r.table(instrument="grad_alignment").query("component == 'other'").set_index("step")["G"]
        parts = comp[[c for c in ("pos", "neg", "kl") if c in comp]].sum(axis=1) + other
        np.testing.assert_allclose(parts, comp["total"], rtol=1e-6, atol=1e-9)


def test_activations_instrument_values(real_runs):
    from analysis.loader import Run
    from analysis.measures.correctness import activation_steps

    r = Run(real_runs["grpo"])
    files = r.find(instrument="activations")
    assert all(f.schema_version == 1 and f.format == "safetensors" for f in files)
    steps = activation_steps(r)
    assert [s for s, _ in steps] == [0, 2, STEPS]  # step 0, every 2, and the last step
    for _, t in steps:
        n = 12 * 4
        assert t["last"].shape == (n, 5, 128) and t["mean"].shape == (
            n,
            5,
            128,
        )  # embedded: 4 layers + embeddings
        assert sorted(set(t["reward"].tolist())) <= [0.0, 1.0]
        assert (np.bincount(t["prompt_id"]) == 4).all() and t["prompt_id"].max() == 11
        assert len(t["token_logp"]) == t["completion_len"].sum() == len(t["token_sample"])
        per_sample = np.bincount(t["token_sample"], weights=t["token_logp"]) / t["completion_len"]
        np.testing.assert_allclose(per_sample, t["mean_logp"], rtol=1e-5)
        assert (t["token_entropy"] >= -1e-5).all() and (t["token_logp"] <= 1e-6).all()
        assert np.isfinite(t["last"].astype(np.float32)).all()
    # the probe set is sampled under a fixed seed: step 0 (before any update) is identical across runs
    assert r.cfg("diagnostics.activations.samples_per_prompt") == 4


def test_relax_run_tables(real_runs):
    if "relax" not in real_runs:
        pytest.skip("grpo_relax_tiny recipe missing")
    from analysis.loader import Run
    from analysis.measures import relax

    r = Run(real_runs["relax"])
    traj = relax.trajectories(r)
    dsd = relax.dsd_over_steps(r)
    last = dsd[dsd["step"] == dsd["step"].max()].set_index("subset")
    sel = traj[traj["step"] == traj["step"].max()]
    assert last.loc["all", "mean"] == pytest.approx(sel["dsd"].mean())
    assert last.loc["all", "n"] == len(sel) and (traj["dsd"] >= 0).all()
    sp = relax.spectra(r)
    assert len(sp) and (sp["mean"] >= 0).all()
    assert sp["index"].max() + 1 <= r.cfg("regularizers.relax.dict_size")


def _kernel(tmp_path: Path) -> str:
    kdir = tmp_path / "kernels" / "rlx-venv"
    kdir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rlx venv",
        "language": "python",
    }
    (kdir / "kernel.json").write_text(json.dumps(spec))
    return "rlx-venv"


@pytest.mark.parametrize(
    "notebook,run_key",
    [("gradient_alignment", "dpo"), ("relax_dynamics", "relax"), ("activation_replay", "grpo")],
)
def test_notebook_executes(notebook, run_key, real_runs, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    if run_key not in real_runs:
        pytest.skip(f"no {run_key} run (recipe missing)")
    run_dir = real_runs[run_key]
    if notebook == "activation_replay":
        run_dir = Path(
            shutil.copytree(run_dir, tmp_path / "run")
        )  # the notebook writes the replay table into it
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("RLX_RUN_DIR", str(run_dir))
    monkeypatch.setenv("RLX_NB_PROMPTS", "8")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "analysis" / "notebooks" / f"{notebook}.ipynb", as_version=4)
    NotebookClient(
        nb, kernel_name=_kernel(tmp_path), timeout=120, resources={"metadata": {"path": str(REPO)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert "did not record" not in text
    assert len(images) >= {"gradient_alignment": 4, "relax_dynamics": 3, "activation_replay": 2}[notebook]
    if notebook == "activation_replay":
        from analysis.loader import Run
        from analysis.measures.activation_shift import activation_shift

        table = activation_shift(Run(run_dir))
        assert len(table) and (table["kl_mean"] >= 0).all() and set(table["layer"]) >= {0, 1, 2, 3}
