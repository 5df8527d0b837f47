"""Run loader: manifest files, schema versions, truncation, per-rank merge, step alignment."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from analysis.loader import Run, RunLoadError, RunLoadWarning, load_runs
from analysis.synthetic import make_run
from rlx.errors import UserError
from rlx.storage import DiagnosticsWriter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return {
        "grpo": make_run(root / "grpo", "grpo", steps=6, grad_alignment=True, activations=True, world_size=2),
        "dpo": make_run(root / "dpo", "dpo", steps=4, grad_alignment=True),
    }


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_loads_config_metrics_eval_and_manifest(runs):
    r = Run(runs["grpo"])
    assert r.algo == "grpo" and r.recipe == "synthetic_grpo"
    assert list(r.metrics["step"]) == [1, 2, 3, 4, 5, 6]
    assert r.metric("reward").loc[6] == pytest.approx(0.6)
    assert r.eval_before_after["after"]["greedy_accuracy"] == 0.55
    assert r.eval is None and r.evals == {}
    assert {f.instrument for f in r.files} == {"grad_alignment", "activations"}
    assert r.table(instrument="grad_alignment")["step"].max() == 6


def test_eval_files_and_overview_columns(runs, tmp_path):
    from analysis.measures.training import eval_summary

    run = _copy(runs["dpo"], tmp_path / "run")
    (run / "eval.json").write_text(json.dumps({"greedy_accuracy": 0.5, "pass@4": 0.7, "num_samples": 16}))
    (run / "eval.replay-learnable.json").write_text(json.dumps({"greedy_accuracy": 0.6, "ks": [1, 4]}))
    r = Run(run)
    assert r.eval["pass@4"] == 0.7 and set(r.evals) == {"eval", "eval.replay-learnable"}
    row = eval_summary(load_runs([run])).iloc[0]
    assert row["eval/pass@4"] == 0.7 and row["eval.replay-learnable/greedy_accuracy"] == 0.6
    assert (
        row["after/greedy_accuracy"] == 0.55
        and "eval/num_samples" not in row
        and "after/num_prompts" not in row
    )
    (run / "eval.json").write_text('{"greedy_accuracy": 0.')
    with pytest.raises(RunLoadError, match=r"eval\.json: not valid JSON"):
        Run(run)


def test_per_rank_files_are_merged(runs):
    r = Run(runs["grpo"])
    files = r.find(instrument="activations")
    assert {f.rank for f in files} == {0, 1}
    assert all(".rank" in f.entry["path"] for f in files) and len({f.key for f in files}) == 3
    from analysis.measures.correctness import activation_steps

    steps = activation_steps(r)
    assert [s for s, _ in steps] == [0, 3, 6]
    t = steps[0][1]
    # ranks 0 and 1 hold the even and odd probe prompts, 4 samples each: all 16 prompts after the merge
    assert sorted(np.unique(t["prompt_id"])) == list(range(16)) and len(t["reward"]) == 64
    assert t["token_sample"].max() == 63  # token indices shifted per rank


def test_truncated_parquet_is_rejected_naming_the_file(runs, tmp_path):
    run = _copy(runs["dpo"], tmp_path / "run")
    bad = run / "diagnostics" / "grad_alignment" / "step_000002.parquet"
    _truncate(bad)
    with pytest.raises(RunLoadError, match=r"grad_alignment/step_000002\.parquet") as e:
        Run(run)
    assert "truncated or corrupt" in str(e.value) and isinstance(e.value, UserError)
    with pytest.warns(RunLoadWarning, match=r"grad_alignment/step_000002\.parquet"):
        r = Run(run, strict=False)
    assert (
        len(r.find(fmt="parquet")) == 3 and len(r.find(instrument="grad_alignment", fmt="safetensors")) == 4
    )
    assert sorted(r.table("grad_alignment")["step"].unique()) == [1, 3, 4]  # the other shards still load
    assert len(r.skipped) == 1


def test_truncated_safetensors_is_rejected_naming_the_file(runs, tmp_path):
    run = _copy(runs["grpo"], tmp_path / "run")
    bad = run / "diagnostics" / "activations" / "step_000003.rank1.safetensors"
    _truncate(bad, 0.7)
    with pytest.raises(RunLoadError, match=r"step_000003\.rank1\.safetensors"):
        Run(run)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = Run(run, strict=False)
    assert any("step_000003.rank1.safetensors" in str(w.message) for w in rec)
    assert len(r.find(instrument="activations")) == 5


def test_newer_schema_and_missing_files_are_rejected(runs, tmp_path):
    run = _copy(runs["dpo"], tmp_path / "run")
    w = DiagnosticsWriter(run)
    w.write_tensors(
        "future.safetensors",
        {"x": torch.zeros(2)},
        schema_version=99,
        instrument="grad_alignment",
        description="",
    )
    with pytest.raises(RunLoadError, match=r"future\.safetensors: schema_version 99 .* newer"):
        Run(run)
    (run / "diagnostics" / "future.safetensors").unlink()
    with pytest.raises(RunLoadError, match=r"future\.safetensors: listed in .*manifest.jsonl but missing"):
        Run(run)
    log = run / "diagnostics" / "manifest.jsonl"
    lines = [ln for ln in log.read_text().splitlines() if '"future.safetensors"' not in ln]
    log.write_text("\n".join(lines) + "\n")
    (run / "config.yaml").unlink()
    with pytest.raises(RunLoadError, match=r"config\.yaml: missing"):
        Run(run)


def test_generic_instrument_files_and_bfloat16(runs, tmp_path):
    """Files of an instrument the package has no analysis for are still listed and readable."""
    run = _copy(runs["dpo"], tmp_path / "run")
    w = DiagnosticsWriter(run)
    w.write_tensors(
        "mine/x.safetensors",
        {"a": torch.full((3,), 1.5, dtype=torch.bfloat16), "i": torch.arange(3)},
        schema_version=1,
        instrument="mine",
        description="",
    )
    w.write_json("mine/meta.json", {"k": 1}, schema_version=1, instrument="mine", description="")
    r = Run(run)
    (t,) = r.tensors(instrument="mine")
    assert t["a"].dtype == np.float32 and t["a"].tolist() == [1.5] * 3 and t["i"].tolist() == [0, 1, 2]
    assert r.json(instrument="mine") == [{"k": 1}]


def test_truncated_metrics_line_is_rejected(runs, tmp_path):
    run = _copy(runs["dpo"], tmp_path / "run")
    p = run / "metrics.jsonl"
    p.write_text(p.read_text()[:-15])
    with pytest.raises(RunLoadError, match=r"metrics\.jsonl: line 4 is not valid JSON"):
        Run(run)


def test_lenient_keeps_the_good_rows_of_a_torn_metrics_file(runs, tmp_path):
    run = _copy(runs["dpo"], tmp_path / "run")
    p = run / "metrics.jsonl"
    n = len(p.read_text().splitlines())
    p.write_text(p.read_text() + '{"step": 99, "loss": 0.')  # torn by a kill
    with pytest.warns(RunLoadWarning, match=rf"dropped 1 line\(s\) .*line {n + 1}\); kept {n} rows"):
        r = Run(run, strict=False)
    assert len(r.metrics) == n and 99 not in set(r.metrics["step"])


def test_a_step_logged_twice_is_rejected(runs, tmp_path):
    """Rows of one step under different keys (train + summary) merge; the same key twice is a replayed step."""
    run = _copy(runs["dpo"], tmp_path / "run")
    p = run / "metrics.jsonl"
    lines = p.read_text().splitlines()
    first = json.loads(lines[0])
    p.write_text("\n".join([*lines, json.dumps({"step": first["step"], "train_runtime": 1.0})]) + "\n")
    assert len(Run(run).metrics) == len({json.loads(line)["step"] for line in lines})
    p.write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(RunLoadError, match=f"step {first['step']} is logged more than once"):
        Run(run)


def test_replay_only_directory_opens(tmp_path):
    """`python -m rlx.replay.analysis ... out=DIR` writes config.yaml, an empty metrics.jsonl and the table."""
    from analysis.measures.activation_shift import activation_shift
    from analysis.report import write_report

    (tmp_path / "config.yaml").write_text("recipe: ''\n")
    (tmp_path / "metrics.jsonl").write_text("")
    rows = [
        {
            "layer": layer,
            "bucket": b,
            "bucketing": "absolute",
            "bucket_lo": float(b),
            "bucket_hi": b + 1.0,
            "entropy_lo": b + 0.1,
            "entropy_hi": b + 0.9,
            "n_positions": 3,
            "kl_mean": 0.5 / (b + 1),
        }
        for layer in (-1, 0, 1)
        for b in range(3)
    ]
    DiagnosticsWriter(tmp_path).write_parquet(
        "replay_kl_buckets.parquet", rows, schema_version=1, instrument="activation_replay", description=""
    )
    r = Run(tmp_path)
    assert list(r.metrics.columns) == ["step"] and len(r.metrics) == 0
    assert activation_shift(r)["bucket_label"].iloc[0] == "0-1 nats"
    html = write_report([tmp_path], tmp_path / "r.html", strict=True).read_text()
    assert re.findall(r"<h2>([^<]+)</h2>", html) == ["Runs", "Activation shift by base entropy"]


def test_load_runs_aligns_steps(runs):
    rs = load_runs([runs["grpo"], runs["dpo"]])
    assert len(rs) == 2
    long = rs.metrics(["loss"], how="inner")
    assert sorted(long["step"].unique()) == [1, 2, 3, 4]  # only steps both runs logged
    wide = rs.wide("loss")
    assert wide.shape == (6, 2) and wide[rs[1].label].isna().sum() == 2
    assert wide.loc[2].tolist() == [0.5, 0.5]
    # same recipe twice gets unique labels
    rs2 = load_runs([runs["dpo"], runs["dpo"]])
    assert rs2[0].label != rs2[1].label
