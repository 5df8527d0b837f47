"""GRPO + ReLaX + gradient alignment + two probe monitors on 1 process, 2-process DDP, ZeRO-2 and ZeRO-3 (CPU, gloo).

Four launches in all (one per backend, cached for the module); each test checks several things:
- DDP vs one process on the same global batch (16 rollouts = 1 x 16 or 2 x 8): every logged metric equal,
  grad_align/* and relax/* included, except the few that are per-rank statistics by definition (RANK_LOCAL);
- DDP vs ZeRO-2 vs ZeRO-3: loss, reward, grad_norm, kl, entropy and relax/* equal;
- two ranks really ran (run_info world_size, per-rank diagnostics in the manifest, merged by the loader);
- the run dir decided once, the ReLaX dictionary written once (rank 0), the reference model under ZeRO-3.
Rollouts come from tests/distributed/_train_fixed_sampling.py (sampling that does not depend on the split of
the batch over ranks). Keep the number of launches small: each costs 10-30 s, DeepSpeed's first +30 s.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "tests" / "distributed" / "_train_fixed_sampling.py"
CONFIGS = {"ddp": "cpu_ddp.yaml", "zero2": "cpu_zero2.yaml", "zero3": "cpu_zero3.yaml"}
GLOBAL_ROLLOUTS = 16
OVERRIDES = [
    "recipe=grpo_relax_tiny",
    "trainer.max_steps=3",
    "trainer.num_generations=4",
    "trainer.beta=0.04",  # a reference model in every backend (explicitly preloaded under ZeRO-3)
    # SGD: Adam turns float32 reduction-order noise (1e-7) in near-zero gradients into +-lr updates, after
    # which 1 and 2 processes drift apart by ~1e-3; with SGD they stay equal to ~1e-6.
    "trainer.optim=sgd",
    "trainer.learning_rate=0.05",
    "diagnostics.grad_alignment.enabled=true",
    "diagnostics.grad_alignment.every=1",
    "diagnostics.grad_alignment.target=heldout_chosen",  # the same D' whatever the split over ranks
    "diagnostics.grad_alignment.target_size=8",
    # The dictionary is fitted on the rollouts gathered from every rank (docs/relax.md), in an order that
    # differs between 1 x 16 and 2 x 8 after TRL's shuffle, so its Adam minibatches differ; with no fit
    # steps W is its seeded init on every layout, so relax/* must agree exactly.
    "regularizers.relax.dict_steps=0",
    "regularizers.relax.dict_epochs=0",
    "regularizers.relax.xi=1.0",
    # Probe monitors: their per-rollout values are gathered over ranks (StepRows), so the step metrics are global
    # and must equal the one-process ones.
    "diagnostics.hidden_rank.enabled=true",
    "diagnostics.hidden_rank.every=1",
    "diagnostics.hidden_rank.stride=1",
    "diagnostics.correctness_probe.enabled=true",
    "diagnostics.correctness_probe.every=1",
    "diagnostics.correctness_probe.min_mixed_groups=1",
    "eval.before_after=false",
]
RANK_LOCAL = {
    # Per-rank statistics averaged over ranks by the instrument seam, not the global statistic:
    "entropy_cov/cov",  # a covariance over this rank's tokens
    "entropy_cov/cov_top",  # a top-quantile over this rank's tokens
    "relax/dsd_pos_mean",  # a mean over this rank's A>0 rows (NaN when a rank has none)
    # Under DDP the component norms are CountSketch estimates (norm_source=sketch,
    # docs/gradient_alignment.md), and so are the cosines divided by them:
    "grad_align/norm_pos",
    "grad_align/norm_neg",
    "grad_align/norm_kl",
    "grad_align/cos_pos",
    "grad_align/cos_neg",
    "grad_align/cos_kl",
    "grad_align/cos_pos_neg",
    # Tertile membership at tied |w| (equal advantages and lengths) follows row order, which differs
    # between 1 x 16 and 2 x 8 after TRL's shuffle; their sum is checked instead (TERTILES).
    "grad_align/G_top",
    "grad_align/G_mid",
    "grad_align/G_bot",
}
TERTILES = ["grad_align/G_top", "grad_align/G_mid", "grad_align/G_bot"]
TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
BACKEND_KEYS = ["loss", "reward", "reward_std", "grad_norm", "kl", "entropy", "num_tokens"]

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend: str, workdir: Path, model_dir: Path) -> Path:
    """Train in `workdir` and return the run dir. DDP gets no output_dir: rank 0 picks runs/<recipe>/<time>."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    per_device = GLOBAL_ROLLOUTS if backend == "single" else GLOBAL_ROLLOUTS // 2
    args = [
        *OVERRIDES,
        f"model.name_or_path={model_dir}",
        f"trainer.per_device_train_batch_size={per_device}",
    ]
    if backend != "ddp":
        args.append(f"output_dir={workdir / 'run'}")
    if backend == "single":
        cmd = [sys.executable, str(ENTRY), *args]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [accelerate, "launch", "--config_file", str(REPO / "accelerate_configs" / CONFIGS[backend])]
        cmd += ["--main_process_port", str(_free_port()), str(ENTRY), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=420)
    print(f"[{backend}] {time.perf_counter() - t0:.1f}s: {' '.join(cmd[:6])} ...")
    if proc.returncode != 0:
        pytest.fail(
            f"{backend} run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    if backend != "ddp":
        return workdir / "run"
    made = list((workdir / "runs" / "grpo_relax_tiny").iterdir())
    assert len(made) == 1, f"the run dir must be decided once (rank 0) and shared, got {made}"
    return made[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """runs(backend) -> run dir, launched once per backend per module."""
    cache: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in cache:
            cache[backend] = _launch(backend, tmp_path_factory.mktemp(f"dist_{backend}"), tiny_model_dir)
        return cache[backend]

    return get


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]  # drop the end-of-training summary row


def _close(a, b, rtol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def _diffs(a: list[dict], b: list[dict], keys=None, rtol: float = 1e-4) -> list[str]:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    out = []
    for ra, rb in zip(a, b):
        names = keys or sorted((set(ra) | set(rb)) - RANK_LOCAL - TIMING)
        out += [
            f"step {ra['step']} {k}: {ra.get(k)} vs {rb.get(k)}"
            for k in names
            if not _close(ra.get(k), rb.get(k), rtol)
        ]
    return out


def _check_two_ranks(run_dir: Path) -> None:
    from analysis.loader import Run

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 3
    from rlx.storage import read_manifest

    entries = read_manifest(run_dir)["files"]
    assert {e["rank"] for e in entries} == {0, 1}, "both ranks must have registered their files"
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths)), "no file registered twice"
    for e in entries:  # every registered file exists, per-rank files carry their rank in the name
        assert (run_dir / "diagnostics" / e["path"]).exists(), e["path"]
        if ".rank" in e["path"]:
            assert f".rank{e['rank']}." in e["path"]
    dictionaries = [e for e in entries if e["instrument"] == "relax" and e["name"] == "dictionary"]
    assert len(dictionaries) == 1 and dictionaries[0]["rank"] == 0
    traj = Run(run_dir).table("relax", "trajectories_step000003")
    assert sorted(traj["rank"].unique()) == [0, 1]
    # one row per rollout per step, 8 per rank, both ranks' shards merged by the analysis loader
    assert traj.groupby(["step", "rank"]).size().tolist() == [GLOBAL_ROLLOUTS // 2] * 6


def test_ddp_equals_one_process(runs):
    single, ddp = runs("single"), runs("ddp")
    _check_two_ranks(ddp)
    a, b = _metrics(single), _metrics(ddp)
    assert {k for k in a[0] if k.startswith("grad_align/")} and {k for k in a[0] if k.startswith("relax/")}
    assert {k for k in a[0] if k.startswith("hidden_rank/")}
    assert {"correctness_probe/auroc", "correctness_probe/auroc_logp", "correctness_probe/update_cos"} <= set(
        a[0]
    )
    assert set(a[0]) == set(b[0])
    assert _diffs(a, b) == []
    for ra, rb in zip(a, b):  # the tertiles partition the same update: their sum is layout-independent
        assert _close(sum(ra[k] for k in TERTILES), sum(rb[k] for k in TERTILES), 1e-4)
    assert any(r["reward_std"] > 0 for r in a), "the test batch must carry a learning signal"

    from analysis.loader import Run

    # Same rollouts: the per-trajectory ReLaX rows of the two ranks are the 1-process rows.
    t1 = Run(single).table("relax", "trajectories_step000003")
    t2 = Run(ddp).table("relax", "trajectories_step000003")
    for step in (1, 2, 3):
        d1, d2 = (t.loc[t["step"] == step, "dsd"].round(5).sort_values().tolist() for t in (t1, t2))
        assert len(d1) == GLOBAL_ROLLOUTS and d1 == d2


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_deepspeed_equals_ddp(runs, backend):
    ddp, ds = runs("ddp"), runs(backend)
    _check_two_ranks(ds)
    a, b = _metrics(ddp), _metrics(ds)
    relax = sorted(k for k in a[0] if k.startswith("relax/") and k not in RANK_LOCAL)
    assert _diffs(a, b, keys=BACKEND_KEYS + relax) == []
    # grad_alignment runs its activation variant under ZeRO (no autograd w.r.t. sharded params)
    assert any(k.startswith("grad_align/") for k in b[0])
    cfg = (ds / "config.yaml").read_text()
    assert "beta: 0.04" in cfg
