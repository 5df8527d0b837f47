"""Storage: diagnostics writes cost O(1) per step, the manifest is append-only, old layouts still load, ReLaX
spectra are stored compactly, and an instrument with nothing to log on a step leaves the model's hooks alone."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from analysis.loader import Run, RunLoadError, RunLoadWarning
from analysis.measures import grad_alignment as ga_tables
from analysis.measures import relax as relax_tables
from analysis.synthetic import make_run
from rlx.config.schema import GradAlignmentConfig, RunConfig
from rlx.instruments.catalog import registered_instruments
from rlx.run import RunContext
from rlx.storage import DiagnosticsWriter, read_manifest, read_table
from tests.test_relax_instrument import B, fake_trainer, make, make_ctx

COMPONENTS = ["total", "pos", "neg", "kl", "top", "mid", "bot", "other", "layer:embed", "layer:0-1"]
COMPONENTS += ["layer:2-3", "layer:head", "update"]


def alignment_rows(step: int, rng: np.random.Generator) -> list[dict]:
    """One logged step's rows with the columns the instrument writes (param variant, GRPO)."""
    base = {"step": step, "target": "heldout_chosen", "variant": "param", "norm_target": 2.0, "R_T": 1.3}
    rows = []
    for c in COMPONENTS:
        row = {**base, "component": c, "G": float(rng.standard_normal()), "cos": float(rng.uniform(-1, 1))}
        row.update(norm=float(rng.uniform(0, 2)), n_tokens=float(rng.integers(100, 900)))
        if c == "total":
            row["drift"] = float(rng.uniform(-1, 1))
        if c in ("pos", "neg", "kl"):
            row["cos_pos_neg"] = float(rng.uniform(-1, 1))
        if c == "update":
            row["delta_R"] = float(rng.standard_normal())
        row.update(norm_source="exact", kl_split="none", kl_split_reason="", kl_fit_residual=math.nan)
        rows.append(row)
    return rows


def snapshot(diag: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file under diag, the manifest excepted."""
    out = {}
    for p in diag.rglob("*"):
        if p.is_file() and p.name != "manifest.jsonl" and not p.name.startswith("."):
            st = p.stat()
            out[str(p.relative_to(diag))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_alignment_writes_touch_o1_bytes_per_step(tmp_path):
    """N logged steps through the instrument's write path: each step writes its own shard and sketch file and
    appends two manifest lines; earlier files are never touched, and the bytes a step writes do not grow with N."""
    from rlx.instruments.grad_alignment import TABLE, GradAlignment
    from rlx.instruments.grad_alignment.records import StepRecord

    writer = DiagnosticsWriter(tmp_path)
    cfg = OmegaConf.structured(GradAlignmentConfig(enabled=True, sketch_dim=4096))
    run = RunContext(cfg=OmegaConf.structured(RunConfig), run_dir=tmp_path, writer=writer)
    inst = registered_instruments()["grad_alignment"](cfg, run)
    assert isinstance(inst, GradAlignment)
    trainer = type("T", (), {"_metrics": None})()
    rng = np.random.default_rng(0)
    diag, log = tmp_path / "diagnostics", tmp_path / "diagnostics" / "manifest.jsonl"
    per_step, before = [], {}
    for step in range(1, 41):
        stats, size, text = dict(writer.stats), log.stat().st_size if log.exists() else 0, ""
        if log.exists():
            text = log.read_text()
        sk = {k: torch.randn(4096) for k in ("loss", "target", "pos", "neg")}
        inst._emit(trainer, StepRecord(step), alignment_rows(step, rng), sk)
        delta = {k: writer.stats[k] - stats[k] for k in stats}
        assert delta["files"] == 2 and delta["manifest_lines"] == 2, delta  # the shard and the sketch file
        assert log.stat().st_size - size == delta["manifest_bytes"]  # the manifest only grew
        assert log.read_text().startswith(text)  # ... by appending: earlier lines are untouched
        now = snapshot(diag)
        assert {k: now[k] for k in before} == before, "a file of an earlier step was rewritten"
        assert len(now) == len(before) + 2
        before = now
        per_step.append(delta["bytes"] + delta["manifest_bytes"])
    # bytes per step are flat: the 40th step writes what the 2nd did (give or take compression noise)
    assert max(per_step[1:]) <= 1.1 * min(per_step[1:]), per_step
    assert per_step[-1] < 1.1 * per_step[1] and per_step[-1] < 200_000
    table = read_table(tmp_path, TABLE)
    assert sorted(table["step"].unique()) == list(range(1, 41)) and len(table) == 40 * len(COMPONENTS)
    # the analysis loader reads the shards as one table
    make_run(tmp_path, "grpo", steps=1)  # config.yaml and metrics.jsonl for Run
    df = ga_tables.table(Run(tmp_path))
    assert len(df) == 40 * len(COMPONENTS) and df["step"].is_monotonic_increasing


def test_manifest_is_append_only_and_a_torn_line_is_dropped(tmp_path):
    w = DiagnosticsWriter(tmp_path)
    make_run(tmp_path, "grpo", steps=2)
    w.write_json("a.json", {"x": 1}, schema_version=1, instrument="t", description="")
    log = tmp_path / "diagnostics" / "manifest.jsonl"
    header = json.loads(log.read_text().splitlines()[0])
    assert header == {"format": "rlx-diagnostics", "manifest_version": 2}
    with open(log, "a") as fh:  # a kill in the middle of an append
        fh.write('{"name": "b", "path": "b.js')
    w.write_json("c.json", {"x": 2}, schema_version=1, instrument="t", description="")
    w.write_json("a.json", {"x": 3}, schema_version=1, instrument="t", description="v2")  # same path again
    man = read_manifest(tmp_path)
    assert [f["path"] for f in man["files"]] == ["a.json", "c.json"] and man["torn"] == 1
    assert man["files"][0]["description"] == "v2" and man["manifest_version"] == 2
    with pytest.raises(RunLoadError, match="not valid JSON"):
        Run(tmp_path)
    with pytest.warns(RunLoadWarning, match="not valid JSON"):
        r = Run(tmp_path, strict=False)
    assert [f.entry["path"] for f in r.files] == ["a.json", "c.json"]


def test_runs_in_the_single_file_layout_still_load(tmp_path):
    """A run written before the shards (manifest.json, grad_alignment.parquet rewritten whole), then resumed by
    this rlx (manifest.jsonl, shards): both are read, as one table."""
    make_run(tmp_path, "grpo", steps=4)
    diag = tmp_path / "diagnostics"
    diag.mkdir()
    rng = np.random.default_rng(1)
    old = [r for s in (1, 2) for r in alignment_rows(s, rng)]
    pd.DataFrame(old).to_parquet(diag / "grad_alignment.parquet", index=False)
    entry = {
        "name": "grad_alignment",
        "path": "grad_alignment.parquet",
        "format": "parquet",
        "schema_version": 1,
        "rank": 0,
        "instrument": "grad_alignment",
        "description": "",
        "updated": "2026-11-21T14:00:00",
    }
    (diag / "manifest.json").write_text(
        json.dumps({"format": "rlx-diagnostics", "manifest_version": 1, "files": [entry]})
    )
    assert read_manifest(tmp_path)["manifest_version"] == 1
    df = ga_tables.table(Run(tmp_path))
    assert sorted(df["step"].unique()) == [1, 2] and len(df) == 2 * len(COMPONENTS)
    w = DiagnosticsWriter(tmp_path)
    for s in (3, 4):
        w.write_parquet(
            f"grad_alignment/step_{s:06d}.parquet",
            alignment_rows(s, rng),
            name="grad_alignment",
            schema_version=1,
            instrument="grad_alignment",
            description="",
        )
    man = read_manifest(tmp_path)
    assert man["manifest_version"] == 2 and len(man["files"]) == 3
    df = ga_tables.table(Run(tmp_path))
    assert sorted(df["step"].unique()) == [1, 2, 3, 4] and len(df) == 4 * len(COMPONENTS)
    assert sorted(read_table(tmp_path, "grad_alignment")["step"].unique()) == [1, 2, 3, 4]


def test_relax_summaries_every_step_and_full_spectra_every_n(tmp_path):
    """full_spectra_every=3: full spectra at steps 1, 3, 6; a compact fp16 summary for every recorded step; the
    analysis reads both (exact where full) and a resumed instrument continues from either state format."""
    from safetensors.torch import load_file

    trainer = fake_trainer()
    inst = make(tmp_path, full_spectra_every=3, xi=1e9)
    inst.on_train_begin(trainer)
    for step in range(7):
        trainer.state.global_step = step
        inst.on_loss(make_ctx(trainer, seed=step))
    assert [r["step"] for r in inst.spectra] == [1, 3, 6] and len(inst.summaries) == 7
    state = inst.state_dict()
    inst.flush()
    diag = tmp_path / "diagnostics" / "relax"
    full = load_file(diag / "spectra_step000007.rank0.safetensors")
    summ = load_file(diag / "spectra_summary_step000007.rank0.safetensors")
    assert full["singular_values"].shape == (3 * B, 50) and full["step"].unique().tolist() == [1, 3, 6]
    assert full["index"].tolist() == list(range(B)) * 3
    assert summ["quantiles"].shape == (7, 7, 50) and summ["quantiles"].dtype == torch.float16
    assert summ["step"].tolist() == list(range(1, 8)) and summ["n"].tolist() == [B] * 7
    man = {f["path"]: f for f in read_manifest(tmp_path)["files"]}
    assert man["relax/spectra_summary_step000007.rank0.safetensors"]["schema_version"] == 2
    assert man["relax/spectra_step000007.rank0.safetensors"]["schema_version"] == 2
    traj = pd.read_parquet(diag / "trajectories_step000007.rank0.parquet")  # rows join the full spectra
    joined = traj.merge(
        pd.DataFrame({k: full[k].numpy() for k in ("step", "micro_step", "index", "dsd")}),
        on=["step", "micro_step", "index"],
        suffixes=("", "_full"),
    )
    assert len(joined) == 3 * B and np.allclose(joined["dsd"], joined["dsd_full"], rtol=1e-6)
    # a summary costs (levels + 1) x m fp16 values per micro-batch whatever its size (800 bytes at m = 50);
    # full spectra cost 4 m bytes per trajectory (102 KB for the 512 trajectories of a tiny-recipe step)
    assert (summ["quantiles"].nbytes + summ["mean"].nbytes) / 7 == (len(summ["levels"]) + 1) * 50 * 2

    make_run(tmp_path / "run", "grpo", steps=7)
    os.replace(tmp_path / "diagnostics", tmp_path / "run" / "diagnostics")
    sp = relax_tables.spectra(Run(tmp_path / "run"))
    src = sp.groupby("step")["source"].first()
    assert src.to_dict() == {
        1: "full",
        2: "summary",
        3: "full",
        4: "summary",
        5: "summary",
        6: "full",
        7: "summary",
    }
    # at a full step the summary says the same to fp16 precision
    sv = np.sort(np.abs(full["singular_values"].numpy().astype(np.float64)), axis=1)[:, ::-1]
    for k, step in enumerate(summ["step"].tolist()):
        if step in (1, 3, 6):
            block = sv[full["step"].numpy() == step]
            np.testing.assert_allclose(summ["mean"][k].double().numpy(), block.mean(0), rtol=2e-3, atol=1e-6)
            np.testing.assert_allclose(
                summ["quantiles"][k, 1].double().numpy(),
                np.quantile(block, 0.1, axis=0),
                rtol=2e-3,
                atol=1e-6,
            )
    row = sp[(sp["step"] == 3) & (sp["index"] == 0)].iloc[0]
    assert row["n"] == B and row["mean"] == pytest.approx(sv[full["step"].numpy() == 3][:, 0].mean())

    # exact resume: the v2 state round-trips; a v1 state (one full tensor per record) is converted
    again = make(tmp_path / "b", full_spectra_every=3, xi=1e9)
    again.load_state_dict(state)
    assert [r["step"] for r in again.spectra] == [1, 3, 6] and len(again.summaries) == 7
    v1 = {**state, "spectra": [s.clone() for s in _v1_spectra(inst, tmp_path)]}
    del v1["summaries"]
    old = make(tmp_path / "c", full_spectra_every=3, xi=1e9)
    old.load_state_dict(v1)
    assert [r["step"] for r in old.spectra] == [1, 3, 6] and [r["step"] for r in old.summaries] == list(
        range(1, 8)
    )
    torch.testing.assert_close(old.summaries[2]["quantiles"], again.summaries[2]["quantiles"])


def _v1_spectra(inst, tmp_path) -> list[torch.Tensor]:
    """Re-run the seven loss calls to get every record's full spectrum (what a v1 checkpoint held)."""
    trainer = fake_trainer()
    full = make(tmp_path / "v1", full_spectra_every=1, xi=1e9)
    full.on_train_begin(trainer)
    for step in range(7):
        trainer.state.global_step = step
        full.on_loss(make_ctx(trainer, seed=step))
    return [r["values"] for r in full.spectra]


def test_relax_full_spectra_every_is_checked(tmp_path):
    from rlx.errors import UserError

    with pytest.raises(UserError, match="full_spectra_every"):
        make(tmp_path, full_spectra_every=-1)


# ---- an instrument with nothing to log adds no hooks -------------------------------------------------------

HOOK_METHODS = [
    (torch.nn.Module, "register_forward_pre_hook"),
    (torch.nn.Module, "register_forward_hook"),
    (torch.nn.Module, "register_full_backward_hook"),
    (torch.nn.Module, "register_full_backward_pre_hook"),
    (torch.nn.Module, "register_backward_hook"),
    (torch.Tensor, "register_hook"),
    (torch.Tensor, "register_post_accumulate_grad_hook"),
]


def _live_hooks(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_backward_hooks", None) or {})
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def _hook_trace(tmp_path: Path, overrides: list[str], monkeypatch) -> dict[int, dict[str, int]]:
    """Per optimizer step: hooks registered during it (any module or tensor) and live on the model at its events."""
    from accelerate import PartialState
    from transformers import TrainerCallback, set_seed

    from rlx.config.loader import load_config
    from rlx.run import decide_run_dir, make_run_context
    from rlx.trainers.build import build_trainer

    current = {"step": 0}
    trace: dict[int, dict[str, int]] = {}

    def counting(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *a, **kw):
            d = trace.setdefault(current["step"], {})
            d[f"registered:{name}"] = d.get(f"registered:{name}", 0) + 1
            return original(self, *a, **kw)

        return wrapper

    for cls, name in HOOK_METHODS:
        monkeypatch.setattr(cls, name, counting(cls, name))

    PartialState()
    cfg = load_config(
        [
            "recipe=grpo_tiny",
            "trainer.max_steps=3",
            "trainer.per_device_train_batch_size=16",
            "trainer.logging_steps=1",
            "trainer.report_to=[]",
            "eval.before_after=false",
            f"output_dir={tmp_path}",
            *overrides,
        ]
    )
    run = make_run_context(cfg, decide_run_dir(cfg))
    set_seed(cfg.seed)
    trainer = build_trainer(cfg, run).trainer
    model = trainer.model

    class Probe(TrainerCallback):
        def _live(self, event, state):
            trace.setdefault(current["step"], {})[f"live:{event}"] = _live_hooks(model)

        def on_step_begin(self, args, state, control, **kw):
            current["step"] = state.global_step + 1
            self._live("step_begin", state)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self._live("pre_optimizer_step", state)

        def on_step_end(self, args, state, control, **kw):
            self._live("step_end", state)
            current["step"] = -1  # between steps

    trainer.add_callback(Probe())  # after rlx's InstrumentCallback: sees the instruments' step_begin work
    trainer.train()
    return trace


@pytest.mark.slow
def test_alignment_adds_no_hooks_on_steps_it_does_not_log(tmp_path, tiny_model_dir, monkeypatch):
    """GRPO with grad_alignment every=10: step 1 logs (hooks come and go), steps 2 and 3 do not and must see the
    same hooks, registered and live, as a run with alignment off."""
    off = _hook_trace(tmp_path / "off", [], monkeypatch)
    on = _hook_trace(
        tmp_path / "on",
        [
            "diagnostics.grad_alignment.enabled=true",
            "diagnostics.grad_alignment.every=10",
            "diagnostics.grad_alignment.target_size=16",
        ],
        monkeypatch,
    )
    for step in (2, 3):
        assert on[step] == off[step], (step, on[step], off[step])
    assert sum(v for k, v in on[1].items() if k.startswith("registered:")) > sum(
        v for k, v in off[1].items() if k.startswith("registered:")
    ), "the logged step registers its captures: the counter works"
    assert on[1]["live:step_end"] == off[1]["live:step_end"]  # and removes them by the step's end


def test_read_table_and_loader_agree_on_synthetic_shards(tmp_path):
    run = make_run(tmp_path, "dpo", steps=3, grad_alignment=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = Run(run).table("grad_alignment", "grad_alignment").drop(columns="rank")
    b = read_table(run, "grad_alignment")
    pd.testing.assert_frame_equal(a, b)
