"""The analysis notebooks, run as a user runs them: `jupyter execute` from the notebook folder, on a fresh run.

They read the run named by RLX_RUN_DIR (or the newest one under runs/, see `analysis.loader.find_run`) and write
only to their own output directory (RLX_NB_OUT here), never into the training run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

NOTEBOOKS = REPO / "analysis" / "notebooks"


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def analysed_run(run_recipe):
    return run_recipe(
        "grpo_relax_tiny",
        "trainer.max_steps=4",
        "trainer.per_device_train_batch_size=16",
        "diagnostics.grad_alignment.enabled=true",
        "diagnostics.grad_alignment.every=2",
        "diagnostics.grad_alignment.target_size=16",
        "diagnostics.activations.enabled=true",
        "diagnostics.activations.every=2",
        "diagnostics.activations.num_prompts=16",
        "diagnostics.correctness_probe.enabled=true",
        "diagnostics.correctness_probe.every=2",
        "diagnostics.correctness_probe.min_mixed_groups=1",
        "diagnostics.h_neurons.enabled=true",
        "diagnostics.h_neurons.every=2",
        "diagnostics.h_neurons.consistent_only=false",
        "diagnostics.h_neurons.min_per_class=2",
        "diagnostics.hidden_rank.enabled=true",
        "diagnostics.hidden_rank.every=2",
        "diagnostics.hidden_rank.stride=1",
        "eval.num_prompts=16",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["gradient_alignment", "relax_dynamics", "activation_replay", "probe_monitors"]
)
def test_notebook_executes_from_its_folder_and_leaves_the_run_alone(analysed_run, tmp_path, name):
    jupyter = shutil.which("jupyter-execute", path=str(Path(sys.executable).parent)) or shutil.which(
        "jupyter-execute"
    )
    if jupyter is None:
        pytest.skip("jupyter-execute is not installed (pip install 'rlx[dev]')")
    before = _tree(analysed_run)
    out = tmp_path / "nb_out"
    env = {**os.environ, "RLX_RUN_DIR": str(analysed_run), "RLX_NB_OUT": str(out), "RLX_NB_PROMPTS": "8"}
    env["MPLBACKEND"] = "Agg"
    nb = tmp_path / f"{name}.ipynb"
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", nb)  # executed copy: the repository's notebook stays output-free
    p = subprocess.run(
        [jupyter, "--inplace", str(nb)], cwd=NOTEBOOKS, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert '"output_type": "error"' not in nb.read_text()
    assert _tree(analysed_run) == before  # nothing written into the training run
    if name == "activation_replay":
        assert list(out.rglob("*.parquet")), "the logit-lens table goes to the notebook's own directory"


def test_find_run_from_the_repo_root_or_any_folder(tmp_path, monkeypatch):
    from analysis.loader import RunLoadError, find_run

    monkeypatch.delenv("RLX_RUN_DIR", raising=False)
    old, new = tmp_path / "runs" / "grpo_tiny" / "a", tmp_path / "runs" / "grpo_tiny" / "b"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("algo: grpo\n")
    os.utime(old / "config.yaml", (1, 1))
    os.utime(old, (1, 1))
    monkeypatch.chdir(tmp_path)
    assert (
        find_run(["grpo_tiny"]) == new.resolve()
        or find_run(["grpo_tiny"]) == Path("runs/grpo_tiny/b").absolute()
    )
    monkeypatch.setenv("RLX_RUN_DIR", str(old))
    assert find_run(["grpo_tiny"]) == old
    monkeypatch.delenv("RLX_RUN_DIR")
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(RunLoadError, match="no run of nope_tiny"):
        find_run(["nope_tiny"])
