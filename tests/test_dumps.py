"""Declared dump schemas (rlx/dumps.py): every declared file is written through `DiagnosticsWriter.write` and read
back through `analysis` (the loader and the diagnostic that consumes it); declarations reject what they do not
declare; a folder of standalone dumps opens without config.yaml and metrics.jsonl."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from analysis.loader import SUPPORTED_SCHEMA, Run, RunLoadError
from analysis.measures import activation_shift, entropy, grad_alignment, h_neurons, passk, relax, rollouts
from analysis.synthetic import make_run
from rlx import dumps
from rlx.storage import DiagnosticsWriter, read_manifest


def _alignment_rows(step: int, target: str = "heldout_chosen") -> list[dict]:
    base = {"step": step, "target": target, "variant": "param", "norm_target": 2.0, "R_T": 1.0}
    return [
        {**base, "component": "total", "G": 0.5, "cos": 0.1, "norm": 1.0, "n_tokens": 10.0, "drift": 0.3},
        {**base, "component": "pos", "G": 0.7, "cos": 0.2, "norm": 1.0, "n_tokens": 6.0, "cos_pos_neg": -0.4},
        {
            **base,
            "component": "neg",
            "G": -0.2,
            "cos": -0.1,
            "norm": 1.0,
            "n_tokens": 4.0,
            "cos_pos_neg": -0.4,
        },
        {**base, "component": "layer:head", "G": 0.5, "cos": 0.1, "norm": 1.0, "n_tokens": 10.0},
        {
            **base,
            "component": "update",
            "G": 0.4,
            "cos": 0.1,
            "norm": 0.01,
            "n_tokens": 10.0,
            "delta_R": -0.01,
        },
    ]


_SUMMARY = {
    "n_logged": 2,
    "n_nonfinite": 0,
    "frac_positive": 1.0,
    "sign_flip_rate": 0.0,
    "cv": 0.1,
    "mean": 0.5,
    "std": 0.05,
    "regime": "supervised-like",
    "target": "heldout_chosen",
    "target_option": "auto",
    "variant": "param",
    "algo": "grpo",
}


def _activation_tensors(n: int = 8, layers: int = 2, d: int = 4) -> dict[str, torch.Tensor]:
    lens = torch.full((n,), 3)
    return {
        "last": torch.randn(n, layers + 1, d).half(),
        "mean": torch.randn(n, layers + 1, d).half(),
        "reward": (torch.arange(n) % 2).float(),
        "prompt_id": torch.arange(n) // 4,
        "mean_logp": -torch.rand(n),
        "completion_len": lens,
        "token_logp": -torch.rand(3 * n),
        "token_entropy": torch.rand(3 * n),
        "token_sample": torch.arange(n).repeat_interleave(3),
        "token_id": torch.randint(0, 30, (3 * n,)),
    }


def _rollout_row(i: int) -> dict:
    return {
        "sample_id": i,
        "round": 0,
        "step": 1,
        "rank": 0,
        "group_id": i // 2,
        "prompt": "1+2=",
        "completion": str(i),
        "completion_length": 2,
        "advantage": float(i % 2) - 0.5,
        "old_logp_mean": None,
        "ref_logp_mean": -1.0,
        "reward": float(i >= 2),
        "reward/correct": float(i >= 2),
    }


def _eval_rows(step: int) -> list[dict]:
    return [
        {
            "step": step,
            "prompt_index": p,
            "kind": "sample",
            "sample": j,
            "completion": "3",
            "reward": float(j < p + 1),
            "correct": j < p + 1,
            "replay": "off",
        }
        for p in range(2)
        for j in range(3)
    ]


def _bucket_rows() -> list[dict]:
    return [
        {
            "schema_version": 1,
            "layer": layer,
            "bucket": b,
            "bucketing": "relative",
            "bucket_lo": 0.5 * b,
            "bucket_hi": 0.5 * (b + 1),
            "entropy_lo": float(b),
            "entropy_hi": b + 0.9,
            "n_positions": 4,
            "kl_mean": 0.1 / (b + 1),
            "kl_sem": 0.01,
            "base_entropy_mean": b + 0.5,
            "top1_agree": 0.8,
            "base_model": "base",
            "rl_model": "rl",
        }
        for layer in (-1, 0)
        for b in range(2)
    ]


def _position_rows() -> list[dict]:
    return [
        {
            "schema_version": 1,
            "prompt_index": 0,
            "position": t,
            "token_id": 5 + t,
            "layer": 0,
            "base_entropy": 0.1 * t,
            "rl_entropy": 0.2 * t,
            "relative_entropy": t / 3,
            "kl": 0.01 * t,
            "top1_agree": t % 2 == 0,
            "selected": t < 2,
            "bucket": t // 2,
            "bucket_lo": 0.0,
            "bucket_hi": 1.0,
        }
        for t in range(4)
    ]


_SPECTRA = {
    "singular_values": torch.tensor([[3.0, 2.0, 1.0], [6.0, 4.0, 2.0]]),
    "step": torch.tensor([2, 2]),
    "micro_step": torch.tensor([0, 0]),
    "index": torch.tensor([0, 1]),
    "dsd": torch.tensor([0.5, 1.5]),
}
_SPECTRA_SUMMARY = {
    "step": torch.tensor([1]),
    "micro_step": torch.tensor([0]),
    "n": torch.tensor([2]),
    "levels": torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]),
    "quantiles": torch.tensor([[[3.0, 2.0], [3.0, 2.0], [4.0, 3.0], [5.0, 4.0], [6.0, 4.0]]]).half(),
    "mean": torch.tensor([[4.5, 3.0]]).half(),
}
_TRAJECTORY_ROWS = [
    {
        "step": 2,
        "micro_step": 0,
        "index": i,
        "sample_id": i,
        "group_id": 0,
        "advantage": 1.0 - 2 * i,
        "a": 1.0,
        "length": 5,
        "dsd": 0.5 + i,
        "masked": bool(i),
        "xi": 1.0,
    }
    for i in range(2)
]
_FIT = {"xi": 1.0, "xi_median": 0.5, "fits": [{"fit_step": 0, "losses": [2.0, 1.0]}]}


def _correctness_probe_check(kind):
    """The correctness_probe reader of `kind`'s sample (analysis/measures/correctness_probe.py)."""
    from analysis.measures import correctness_probe as cp

    if kind == "rows":
        return lambda run: cp.correctness_probe(run)["auroc"].tolist() == [0.9, 0.7]
    if kind == "scores":
        # prompt 1: the probe picks the correct rollout, the log-prob the wrong one; prompt 2: both correct
        return lambda run: cp.best_of_n(run)[["probe", "logp", "oracle"]].values.tolist() == [[1.0, 0.5, 1.0]]
    return lambda run: cp.direction_drift(run)["cos_to_first"].tolist() == pytest.approx([1.0, 1.0])


_CP_ROWS = [(True, 2.0, -2.0), (False, 1.0, -1.0), (True, 0.0, -1.0), (True, 1.0, -2.0)]
_CP_SCORES = [
    {"step": 1, "layer": 2, "sample_id": i, "group_id": i // 2, "heldout": True, "reward": float(c)}
    | {"correct": c, "score": s, "mean_logp": lp}
    for i, (c, s, lp) in enumerate(_CP_ROWS)
]


_HIDDEN_RANK_ROWS = [
    {"sample_id": i, "step": 2, "reward": r, "length": n, "erank": e, "d1": d1, "d2": d2, "n_prefixes": k}
    for i, (r, n, e, d1, d2, k) in enumerate(
        [(1.0, 5, 2.0, 0.5, float("nan"), 2), (0.0, 4, 3.0, 1.5, 0.1, 3)]
    )
]
_PROBE_ROWS = [  # correct rollouts score 2 and 1, the wrong one 0: AUROC 1
    {"sample_id": i, "step": 1, "probe": "p", "score": s, "reward": r}
    for i, (s, r) in enumerate([(2.0, 1.0), (0.0, 0.0), (1.0, 1.0)])
]


def _hidden_rank_check(run) -> bool:
    from analysis.measures import hidden_rank

    t = hidden_rank.rank_over_steps(run).set_index("bucket")
    return (
        t.loc[["all", "correct", "wrong"], "erank"].tolist() == [2.5, 2.0, 3.0]
        and t.loc["all", "d1"] == 1.0
        and t.loc["all", "d2"] == pytest.approx(0.1)
        and t.loc["all", "n"] == 2
    )


def _probes_check(run) -> bool:
    from analysis.measures import probes

    t = probes.score_over_steps(run).set_index("bucket")
    return t.loc[["all", "correct", "wrong"], "mean"].tolist() == [1.0, 1.5, 0.0] and probes.probe_auroc(run)[
        "auroc"
    ].tolist() == [1.0]


# kind -> (path fields, data, metadata, check(run) reading it through the analysis that consumes it)
SAMPLES = {
    "h_neurons_steps": (
        {"step": 2},
        [
            {"step": 2, "bucket": "all", "n_rollouts": 3, "set_size": 4.0, "mass": 0.3, "mass_random": 0.1}
            | {"auroc": 0.75, "grad_share_down": 0.02, "grad_share_mlp": 0.03, "grad_share_chance": 0.004}
            | {"grad_share_down_random": 0.004},
            {
                "step": 2,
                "bucket": "correct",
                "n_rollouts": 1,
                "mass": 0.2,
                "mass_sem": 0.0,
                "mass_random": 0.1,
            },
            {
                "step": 2,
                "bucket": "wrong",
                "n_rollouts": 2,
                "mass": 0.35,
                "mass_sem": 0.01,
                "mass_random": 0.1,
            },
        ],
        None,
        lambda run: (
            h_neurons.mass_by_bucket(run).query("set == 'H0'")["mass"].tolist() == [0.2, 0.35]
            and h_neurons.gradient_share(run)["ratio_down"].tolist() == pytest.approx([5.0])
            and h_neurons.transfer(run)["auroc"].tolist() == [0.75]
        ),
    ),
    "h_neurons_rollouts": (
        {"step": 1},
        [
            {"step": 1, "sample_id": i, "group_id": 0, "reward": float(i % 2), "wrong": i % 2 == 0}
            | {
                "n_answer_tokens": 2,
                "n_other_tokens": 5,
                "mass": 0.1 * i,
                "score": float(i),
                "used_in_fit": True,
            }
            for i in range(3)
        ],
        None,
        lambda run: run.read(dumps.H_NEURONS_ROLLOUTS)["wrong"].tolist() == [True, False, True],
    ),
    "h_neurons_fits": (
        {"step": 4},
        [
            {"step": 4, "fit": "full", "C": 10.0, "data": "all", "note": "", "set_size": 3, "converged": True}
            | {"jaccard": 0.5, "jaccard_chance": 0.001, "split_jaccard": 0.4, "cross_jaccard": 0.3},
            {"step": 4, "fit": "half_a", "C": 10.0, "data": "all", "set_size": 2},
        ],
        None,
        lambda run: (
            h_neurons.stability(run)[["jaccard", "split_jaccard", "cross_jaccard"]].values.tolist()
            == [[0.5, 0.4, 0.3]]
            and h_neurons.fits(run)["fit"].tolist() == ["full", "half_a"]
        ),
    ),
    "h_neurons_set": (
        {"step": 1},
        [
            {"step": 1, "fit": "full", "layer": layer, "neuron": j, "weight": w, "in_set": w > 0}
            for layer, j, w in [(0, 3, 1.5), (0, 7, -0.5), (2, 1, 2.0), (2, 9, 0.1)]
        ],
        None,
        lambda run: (
            h_neurons.layer_histogram(run)[["layer", "n_neurons"]].values.tolist() == [[0, 1], [2, 2]]
        ),
    ),
    "grad_alignment": (
        {"step": 1},
        _alignment_rows(1),
        None,
        lambda run: (
            set(grad_alignment.components(run)["component"]) == {"total", "pos", "neg", "update"}
            and list(grad_alignment.layer_groups(run)["group"]) == ["head"]
            and grad_alignment.drift(run)["drift_cos"].tolist() == [0.3]
            and grad_alignment.pos_neg_cosine(run)["cos_pos_neg"].tolist() == [-0.4]
            and grad_alignment.realised(run)["delta_R"].tolist() == [-0.01]
        ),
    ),
    "grad_alignment_sketches": (
        {"step": 3},
        {"loss/000003": torch.ones(8).half(), "target/000003": torch.ones(8).half()},
        {"step": "3", "sketch_dim": "8", "seed": "0"},
        lambda run: (
            sorted(grad_alignment.sketches(run)["kind"]) == ["loss", "target"]
            and grad_alignment.sketch_similarity(run)["cos"].tolist() == pytest.approx([1.0])
        ),
    ),
    "grad_alignment_tokens": (
        {"step": 1},
        {
            "w": torch.ones(2, 3),
            "w_kl": torch.zeros(2, 3),
            "mask": torch.ones(2, 3),
            "sample_id": torch.tensor([4, 5]),
        },
        {"step": "1"},
        lambda run: run.read_tensors(dumps.GRAD_ALIGNMENT_TOKENS)[0]["sample_id"].tolist() == [4, 5],
    ),
    "grad_alignment_summary": (
        {},
        _SUMMARY,
        None,
        lambda run: run.json(name="grad_alignment_summary")[0]["regime"] == "supervised-like",
    ),
    "alignment_exact": (
        {"table": "final_exact"},
        _alignment_rows(1, "final_exact") + _alignment_rows(2, "final_exact"),
        None,
        lambda run: set(grad_alignment.classify(run)["target"]) == {"final_exact"},
    ),
    "alignment_exact_summary": (
        {"table": "final_exact"},
        {**_SUMMARY, "target": "final_exact", "steps": [1, 2], "save_every": 1, "n_target": 4},
        None,
        lambda run: run.json(name="grad_alignment_final_exact_summary")[0]["steps"] == [1, 2],
    ),
    "relax_trajectories": (
        {"step": 2},
        _TRAJECTORY_ROWS,
        None,
        lambda run: (
            relax.dsd_over_steps(run).set_index("subset").loc["positive", "mean"] == 0.5
            and relax.masked_fraction(run)["masked_fraction"].tolist() == [0.5]
        ),
    ),
    "relax_spectra_summary": (
        {"step": 1},
        _SPECTRA_SUMMARY,
        {"step": "1", "spectrum": "svd", "levels": "0,0.1,0.5,0.9,1"},
        lambda run: relax.spectra(run).query("source == 'summary'")["mean"].tolist() == [4.5, 3.0],
    ),
    "relax_spectra": (
        {"step": 2},
        _SPECTRA,
        {"step": "2", "spectrum": "svd"},
        lambda run: relax.spectra(run).query("source == 'full'")["mean"].tolist() == [4.5, 3.0, 1.5],
    ),
    "relax_dictionary": (
        {},
        {"W": torch.zeros(3, 4)},
        {"fit_step": "0", "xi": "1.0"},
        lambda run: run.read_tensors(dumps.RELAX_DICTIONARY)[0]["W"].shape == (3, 4),
    ),
    "relax_dictionary_fit": (
        {},
        _FIT,
        None,
        lambda run: relax.dictionary_fit(run)["loss"].tolist() == [2.0, 1.0],
    ),
    "correctness_probe": (
        {"step": 1},
        [
            {"step": 1, "layer": 4, "direction": "diff_means", "frozen": False, "auroc": 0.7},
            {"step": 1, "layer": 2, "direction": "diff_means", "frozen": False, "auroc": 0.9},
        ],
        None,
        _correctness_probe_check("rows"),
    ),
    "correctness_probe_scores": ({"step": 1}, _CP_SCORES, None, _correctness_probe_check("scores")),
    "correctness_probe_directions": (
        {"step": 1},
        {
            "layers": torch.tensor([2, 4]),
            "fitted": torch.tensor([[0.0, 2.0], [3.0, 0.0]]),
            "used": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
            "grad": torch.full((2, 2), float("nan")),
        },
        {"step": "1", "direction": "diff_means"},
        _correctness_probe_check("directions"),
    ),
    "activations": (
        {"step": 0},
        _activation_tensors(),
        {"step": "0", "pooling": "last,mean", "num_layers": "2"},
        lambda run: entropy.entropy_dynamics(run)["n_tokens"].tolist() == [24],
    ),
    "rollouts": (
        {"round": 0},
        [_rollout_row(i) for i in range(4)],
        None,
        lambda run: (
            len(rollouts.rollout_samples(run)) == 4
            and len(rollouts.best_worst_groups(rollouts.rollout_samples(run))) == 4
        ),
    ),
    "preference_pairs": (
        {},
        [
            {
                "split": "train",
                "pair_index": 0,
                "prompt": "1+2=",
                "chosen": "3",
                "rejected": "4",
                "chosen_source": "policy",
                "rejected_source": "corruption",
            }
        ],
        None,
        lambda run: rollouts.preference_pairs(run)["chosen"].tolist() == ["3"],
    ),
    "eval": (
        {"step": 0},
        _eval_rows(0),
        None,
        # prompt 0: 1 of 3 correct, prompt 1: 2 of 3 -> pass@1 = (1/3 + 2/3) / 2
        lambda run: passk.passk_curves(run).query("k == 1")["pass_at_k"].tolist() == pytest.approx([0.5]),
    ),
    "replay_kl_buckets": (
        {},
        _bucket_rows(),
        None,
        lambda run: (
            activation_shift.activation_shift(run)["bucket_label"].tolist()[:2]
            == ["H/max 0-0.5", "H/max 0.5-1"]
        ),
    ),
    "replay_kl_positions": (
        {},
        _position_rows(),
        None,
        lambda run: run.read(dumps.REPLAY_KL_POSITIONS)["selected"].tolist() == [True, True, False, False],
    ),
    "hidden_rank": ({"step": 2}, _HIDDEN_RANK_ROWS, None, lambda run: _hidden_rank_check(run)),
    "probes": ({"step": 1}, _PROBE_ROWS, None, lambda run: _probes_check(run)),
}


def test_every_declared_dump_has_a_round_trip_sample():
    assert set(SAMPLES) == set(dumps.DUMPS)


@pytest.mark.parametrize("kind", sorted(dumps.DUMPS))
def test_write_and_read_back_through_analysis(kind, tmp_path):
    dump = dumps.DUMPS[kind]
    fields, data, metadata, check = SAMPLES[kind]
    run_dir = make_run(tmp_path / "run", "grpo", steps=2)
    path = DiagnosticsWriter(run_dir).write(dump, data, metadata=metadata, **fields)
    assert path.relative_to(run_dir / "diagnostics").as_posix().replace(".rank0", "") == dump.relpath(
        **fields
    )
    run = Run(run_dir)
    (f,) = run.find_dump(dump)
    assert dumps.dump_of(f.entry) is dump and f.schema_version == dump.version
    assert f.instrument == dump.instrument and (dump.name is None or f.name == dump.name)
    if dump.format == "parquet":  # every declared column, with its declared type, whatever the rows held
        names = [c for r in (data if isinstance(data, list) else []) for c in r]
        assert pq.read_schema(path).remove_metadata().equals(dump.schema(names))
        assert list(run.read(dump).columns)[: len(dump.columns)] == dump.columns
    elif dump.format == "safetensors":
        (tf,) = run.read_tensors(dump)
        assert set(tf.tensors) == set(data) and tf.metadata["schema_version"] == str(dump.version)
    else:
        assert run.json(name=f.name) == [data]
    assert check(run), kind


def test_missing_columns_are_null_and_undeclared_ones_rejected(tmp_path):
    w = DiagnosticsWriter(tmp_path)
    path = w.write(dumps.GRAD_ALIGNMENT, [{"step": 1, "component": "total", "G": 1.0}], step=1)
    df = pq.read_table(path).to_pandas()
    assert list(df.columns) == dumps.GRAD_ALIGNMENT.columns and np.isnan(df["drift"].iloc[0])
    assert df["target"].isna().all()
    with pytest.raises(ValueError, match=r"declares no field 'G_total'"):
        w.write(dumps.GRAD_ALIGNMENT, [{"step": 1, "G_total": 1.0}], step=2)
    with pytest.raises(ValueError, match=r"column 'step' does not convert to int64"):
        w.write(dumps.GRAD_ALIGNMENT, [{"step": "one"}], step=3)
    with pytest.raises(ValueError, match=r"tensor 'W' is float64, declared float32"):
        w.write(dumps.RELAX_DICTIONARY, {"W": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"tensor 'token_id' is missing"):
        w.write(
            dumps.ACTIVATIONS, {k: v for k, v in _activation_tensors().items() if k != "token_id"}, step=0
        )
    with pytest.raises(ValueError, match=r"undeclared metadata \['levels'\]"):
        w.write(dumps.RELAX_SPECTRA, _SPECTRA, step=1, metadata={"levels": "0"})
    with pytest.raises(ValueError, match=r"declares no field 'xi_scale'"):
        w.write(dumps.RELAX_DICTIONARY_FIT, {**_FIT, "xi_scale": 2.0})
    with pytest.raises(TypeError, match=r"needs the field step"):
        w.write(dumps.EVAL, _eval_rows(0))
    # nothing half-written: only the first file is listed
    assert [f["path"] for f in read_manifest(tmp_path)["files"]] == ["grad_alignment/step_000001.parquet"]


def test_paths_are_unambiguous_and_versions_are_what_the_loader_checks():
    for kind, (fields, *_rest) in SAMPLES.items():
        d = dumps.DUMPS[kind]
        entry = {"instrument": d.instrument, "path": d.relpath(**fields)}
        assert dumps.dump_of(entry) is d, kind
        assert dumps.newest_version(entry) == d.version <= SUPPORTED_SCHEMA[d.instrument]
    legacy = {"instrument": "grad_alignment", "path": "grad_alignment.parquet"}  # before the shards
    assert dumps.dump_of(legacy) is None and dumps.newest_version(legacy) == 1
    assert dumps.newest_version({"instrument": "mine", "path": "mine/x.parquet"}) == 1


def test_eval_schema_1_files_stay_readable(tmp_path):
    """eval files before the `replay` column (schema 1) read as the plain evaluation."""
    run_dir = make_run(tmp_path / "run", "grpo", steps=2)
    rows = [{k: v for k, v in r.items() if k != "replay"} for r in _eval_rows(2)]
    DiagnosticsWriter(run_dir).write_parquet(
        "eval/step_000002.parquet", rows, schema_version=1, instrument="eval", description=""
    )
    run = Run(run_dir)
    assert passk.passk_curves(run).query("k == 1")["pass_at_k"].tolist() == pytest.approx([0.5])
    assert passk.replay_modes(run) == []


def test_a_folder_of_standalone_dumps_opens_without_config_and_metrics(tmp_path):
    """What `python -m rlx.replay.analysis out=DIR` leaves: the manifest says what the folder is."""
    w = DiagnosticsWriter(tmp_path / "out")
    w.write(dumps.REPLAY_KL_BUCKETS, _bucket_rows())
    w.write(dumps.REPLAY_KL_POSITIONS, _position_rows())
    run = Run(tmp_path / "out")
    assert run.standalone and run.config is None and len(run.metrics) == 0 and run.algo == "?"
    assert len(activation_shift.activation_shift(run)) == 4
    from analysis.report import write_report

    html = write_report([tmp_path / "out"], tmp_path / "r.html", strict=True).read_text()
    assert "Activation shift by base entropy" in html
    # a training dump without config.yaml is still an incomplete run directory
    w.write(dumps.EVAL, _eval_rows(0), step=0)
    with pytest.raises(RunLoadError, match=r"config\.yaml: missing"):
        Run(tmp_path / "out")
