"""A non-editable install (a wheel built from this tree) lists every recipe and trains grpo_tiny from another directory.

The wheel goes into a fresh venv that sees the project venv's dependencies through a path entry in a `.pth`
file. A path entry adds the directory to sys.path but runs none of the `.pth` files in it, so the project's
editable-install finder for rlx is not installed there; the test asserts `rlx` is imported from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from rlx.config.loader import available_recipes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests", "docs"
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(venv, wheel): rlx installed from a wheel of this tree, in a venv of its own."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)  # building writes build/ and *.egg-info into the tree
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
            "-w",
            str(tmp),
        ]
    )
    (wheel,) = tmp.glob("rlx-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    )
    (site / "project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: pip sees the project's (editable) rlx on the path; install beside it, touch nothing there.
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)])
    return venv, wheel


def test_wheel_ships_recipes_and_configs_not_benchmarks(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    sources = {p.relative_to(REPO).as_posix() for d in ("rlx", "analysis") for p in (REPO / d).rglob("*.py")}
    assert not sources - set(names)  # every module, also in folders without __init__.py
    assert {f"rlx/recipes/{r}.yaml" for r in available_recipes()} <= set(names)
    assert "rlx/accelerate_configs/zero3.yaml" in names and "rlx/accelerate_configs/cpu_ddp.yaml" in names
    assert "analysis/__main__.py" in names  # `python -m analysis` / `rlx report`
    assert not [n for n in names if n.startswith("benchmarks/")]
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_rlx_lists_recipes_and_trains_elsewhere(installed, tmp_path, tiny_model_dir):
    venv, _ = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import rlx.config.loader as l; print(l.__file__); print(l.RECIPES_DIR)",
        ],
        cwd=work,
        env=env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel, not the checkout

    listing = _run([str(venv / "bin" / "rlx"), "recipes"], cwd=work, env=env).stdout
    for name in available_recipes():
        assert f"  {name} " in listing
    assert str(venv) in listing.splitlines()[0]

    run_dir = work / "run"
    _run(
        [
            str(venv / "bin" / "rlx"),
            "train",
            "recipe=grpo_tiny",
            "trainer.max_steps=2",
            "eval.before_after=false",
            f"output_dir={run_dir}",
        ],
        cwd=work,
        env=env,
        timeout=900,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (run_dir / "final" / "config.json").exists()
    assert list((run_dir / "final").glob("*.safetensors"))
