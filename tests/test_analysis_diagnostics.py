"""Diagnostics tables: hand-computed references and planted structure in synthetic runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.loader import Run
from analysis.measures import activation_shift, correctness, entropy, grad_alignment, relax
from analysis.measures._util import auroc
from analysis.synthetic import make_run
from rlx.storage import DiagnosticsWriter


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    return {
        "grpo": Run(make_run(root / "grpo", "grpo", steps=10, grad_alignment=True, activations=True)),
        "dpo": Run(make_run(root / "dpo", "dpo", steps=10, grad_alignment=True)),
        "relax": Run(
            make_run(root / "relax", "grpo", steps=6, relax=True, activation_shift=True, world_size=2)
        ),
    }


def test_auroc_matches_pairwise_definition():
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    y = np.array([0, 0, 1, 1, 1], bool)
    # pairs (pos, neg): (.35,.1)>, (.35,.4)<, (.8,.1)>, (.8,.4)>, (.4,.1)>, (.4,.4)= -> (4 + 0.5) / 6
    assert auroc(s, y) == pytest.approx(4.5 / 6)
    assert np.isnan(auroc(s, np.zeros(5, bool)))


def test_grad_alignment_components_identities_and_regimes(synth):
    comp = grad_alignment.components(synth["grpo"])
    assert set(comp["component"]) == {"total", "pos", "neg", "kl", "update"}
    wide = comp.pivot_table(index="step", columns="component", values="G")
    pn = grad_alignment.pos_neg_cosine(synth["grpo"])
    assert len(pn) == 10 and pn["cos_pos_neg"].between(-1, 1).all()
    dr = grad_alignment.drift(synth["grpo"])  # logged drift column wins over sketches; step 1 has none
    assert list(dr["step"]) == list(range(2, 11)) and (dr["source"] == "logged").all()
    np.testing.assert_allclose(wide["pos"] + wide["neg"] + wide["kl"], wide["total"], rtol=1e-12)
    ter = grad_alignment.tertiles(synth["grpo"]).pivot_table(index="step", columns="component", values="G")
    np.testing.assert_allclose(ter.sum(axis=1), wide["total"], rtol=1e-9)
    cls_dpo = grad_alignment.classify(synth["dpo"]).iloc[0]
    assert cls_dpo["regime"] == "supervised-like" and cls_dpo["frac_positive"] == 1.0 and cls_dpo["cv"] < 1
    cls_grpo = grad_alignment.classify(synth["grpo"]).iloc[0]
    G = wide["total"].to_numpy()
    assert cls_grpo["frac_positive"] == pytest.approx((G > 0).mean())
    assert cls_grpo["cv"] == pytest.approx(G.std(ddof=0) / abs(G.mean()))  # population std, as the instrument
    signs = G > 0
    assert cls_grpo["sign_flip_rate"] == pytest.approx((signs[1:] != signs[:-1]).mean())
    assert cls_grpo["regime"] == (
        "supervised-like" if (G > 0).mean() >= 0.9 and cls_grpo["cv"] < 1 else "RL-like"
    )


def test_grad_alignment_realised(synth):
    rz = grad_alignment.realised(synth["grpo"]).set_index("step")
    tot = grad_alignment.components(synth["grpo"]).query("component == 'total'").set_index("step")["G"]
    np.testing.assert_allclose(rz["G_update"], 0.8 * tot)  # planted
    np.testing.assert_allclose(rz["delta_R"], -0.01 * tot)


def test_grad_alignment_layer_groups_and_sketches(synth):
    lg = grad_alignment.layer_groups(synth["dpo"])
    assert set(lg["group"]) == {"embed", "blocks0-1", "blocks2-3", "head"} and len(lg) == 40
    tot = grad_alignment.components(synth["dpo"]).query("component == 'total'").set_index("step")["G"]
    np.testing.assert_allclose(lg.groupby("step")["G"].sum(), tot, rtol=1e-9)
    sim = grad_alignment.sketch_similarity(synth["dpo"])
    assert len(sim) == 100 and sim["kind"].iloc[0] == "loss"
    assert np.allclose(sim.query("step_i == step_j")["cos"], 1.0, atol=1e-3)
    sk = grad_alignment.sketches(synth["dpo"], "loss").set_index("step")["vector"]
    a, b = sk.loc[3], sk.loc[4]
    ref = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    sim = sim.set_index(["step_i", "step_j"])["cos"]
    assert sim.loc[(3, 4)] == pytest.approx(ref, abs=1e-9) and sim.loc[(4, 3)] == pytest.approx(ref, abs=1e-9)
    # planted: DPO sketches share a mean offset (a stable update direction), GRPO's are independent noise
    off_diag = lambda r: grad_alignment.sketch_similarity(r).query("step_i != step_j")["cos"].mean()  # noqa: E731
    assert off_diag(synth["dpo"]) > off_diag(synth["grpo"]) + 0.3
    assert set(grad_alignment.sketches(synth["dpo"])["kind"]) == {"loss", "target"}


def test_relax_tables_merge_ranks_and_split_positive(synth):
    r = synth["relax"]
    traj = relax.trajectories(r)
    assert set(traj["rank"]) == {0, 1} and len(traj) == 6 * 16 * 2
    dsd = relax.dsd_over_steps(r)
    s3 = traj[traj["step"] == 3]
    row_all = dsd.query("step == 3 and subset == 'all'").iloc[0]
    row_pos = dsd.query("step == 3 and subset == 'positive'").iloc[0]
    assert row_all["mean"] == pytest.approx(s3["dsd"].mean())
    assert row_pos["mean"] == pytest.approx(s3[s3["advantage"] > 0]["dsd"].mean())
    assert row_pos["n"] == (s3["advantage"] > 0).sum()
    mf = relax.masked_fraction(r).set_index("step")
    assert mf.loc[3, "masked_fraction"] == pytest.approx(s3["masked"].mean())
    sp = relax.spectra(r)
    assert (
        sp["index"].max() == 9
        and (sp.groupby("step")["mean"].apply(lambda x: x.is_monotonic_decreasing)).all()
    )
    assert sp.query("step == 1")["n"].iloc[0] == 32  # both ranks' 16 trajectories


def test_relax_format_written_by_the_relax_instrument(tmp_path):
    """The layout rlx/instruments/relax.py writes: per-step parquet + spectra with a per-row step tensor."""
    make_run(tmp_path, "grpo", steps=2)
    w = DiagnosticsWriter(tmp_path)
    for step in (1, 2):
        rows = [
            {
                "step": step,
                "index": i,
                "group_id": i // 2,
                "advantage": (-1.0) ** i,
                "dsd": float(step + i),
                "masked": i == 0,
                "xi": 2.5,
            }
            for i in range(4)
        ]
        w.write_parquet(
            f"relax/trajectories_step{step:06d}.parquet",
            rows,
            schema_version=1,
            instrument="relax",
            description="",
            per_rank=True,
        )
        sv = torch.arange(12, dtype=torch.float32).reshape(4, 3)
        w.write_tensors(
            f"relax/spectra_step{step:06d}.safetensors",
            {"singular_values": sv, "step": torch.full((4,), step), "dsd": torch.zeros(4)},
            schema_version=1,
            instrument="relax",
            description="",
            metadata={"step": str(step)},
            per_rank=True,
        )
    w.write_tensors(
        "relax/dictionary.safetensors",
        {"W": torch.zeros(5, 8)},
        schema_version=1,
        instrument="relax",
        description="",
    )
    r = Run(tmp_path)
    dsd = relax.dsd_over_steps(r).query("step == 2").set_index("subset")
    assert dsd.loc["all", "mean"] == pytest.approx(3.5) and dsd.loc["positive", "mean"] == pytest.approx(3.0)
    assert relax.masked_fraction(r).set_index("step").loc[2, "xi"] == 2.5
    sp = relax.spectra(r).query("step == 1").set_index("index")
    assert sp.loc[0, "mean"] == pytest.approx(
        np.mean([2, 5, 8, 11])
    )  # largest of each row, sorted descending


def test_correctness_direction_recovers_planted_axis(synth):
    df = correctness.correctness_direction(synth["grpo"])
    last = df[df["step"] == df["step"].max()].set_index(["direction", "layer"])
    # planted: layer l shifts correct/wrong by +-l along axis 0; layer 0 carries no signal
    assert last.loc[("diff_means", 0), "auroc"] < 0.8
    assert last.loc[("diff_means", 3), "pairwise_acc"] > 0.95
    for direction in ("diff_means", "pc1"):
        assert last.loc[(direction, 3), "auroc"] > 0.95
        assert last.loc[(direction, 3), "gap"] == pytest.approx(
            last.loc[(direction, 3), "auroc"] - last.loc[(direction, 3), "auroc_logp"]
        )
    first = df[df["step"] == 0].set_index(["direction", "layer"])
    assert first["cos_to_first"].to_numpy() == pytest.approx(1.0)
    assert last.loc[("diff_means", 3), "cos_to_first"] > 0.9  # same planted axis at every step
    t = dict(correctness.activation_steps(synth["grpo"]))[10]
    ev = np.array([p % 2 == 1 for p in t["prompt_id"]])  # held-out half: odd-ranked prompt ids
    assert last.loc[("diff_means", 3), "n_eval"] == ev.sum()
    assert last.loc[("diff_means", 3), "auroc_logp"] == pytest.approx(
        auroc(t["mean_logp"][ev], t["reward"][ev] >= 1)
    )


def test_pairwise_accuracy_by_hand():
    s = np.array([3.0, 1.0, 2.0, 5.0, 0.0, 5.0])
    correct = np.array([True, False, False, True, False, False])
    groups = np.array([0, 0, 0, 1, 1, 1])
    # group 0: 3>1, 3>2 -> 2 wins; group 1: 5>0 win, 5=5 tie -> 1.5; total 3.5 / 4 pairs
    assert correctness.pairwise_accuracy(s, correct, groups) == pytest.approx(3.5 / 4)
    assert np.isnan(correctness.pairwise_accuracy(s, np.zeros(6, bool), groups))


def test_fit_directions_difference_of_means_by_hand():
    h = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    correct = np.array([True, False, True, False])
    groups = np.array([0, 0, 1, 1])
    d = correctness.fit_directions(h, correct, groups)
    np.testing.assert_allclose(d["diff_means"], np.array([1.0, 2.0]) / np.sqrt(5))
    assert (h[correct] @ d["pc1"]).mean() > (h[~correct] @ d["pc1"]).mean()


def test_entropy_dynamics_by_hand(synth):
    ent = entropy.entropy_dynamics(synth["grpo"]).set_index("step")
    t = dict(correctness.activation_steps(synth["grpo"]))
    e0, e10 = t[0]["token_entropy"].astype(float), t[10]["token_entropy"].astype(float)
    thr = np.quantile(e0, 0.8)
    assert ent.loc[0, "high_entropy_threshold"] == pytest.approx(thr)
    assert ent.loc[10, "high_entropy_frac"] == pytest.approx((e10 > thr).mean())
    assert ent.loc[10, "entropy_q50"] == pytest.approx(np.median(e10))
    adv = entropy.group_advantages(t[10]["reward"], t[10]["prompt_id"])[t[10]["token_sample"]]
    lp = t[10]["token_logp"].astype(float)
    assert ent.loc[10, "cov_logp_adv"] == pytest.approx(np.cov(lp, adv, ddof=0)[0, 1])
    # advantages: a group with rewards (1, 0, 0, 0) -> (0.75, -0.25, -0.25, -0.25) / (0.5 + 1e-4)
    a = entropy.group_advantages(np.array([1.0, 0, 0, 0]), np.zeros(4, int))
    np.testing.assert_allclose(a, np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    logged = entropy.entropy_metrics(synth["grpo"])
    assert set(logged["metric"]) == {"entropy"}


def test_activation_shift_table(synth):
    t = activation_shift.activation_shift(synth["relax"])
    assert len(t) == 16 and list(t.columns) == activation_shift.COLUMNS
    m = activation_shift.shift_matrix(t)
    assert m.shape == (4, 4) and m.columns[0] == "0-1 nats"
    assert (m.iloc[:, 0] > m.iloc[:, 3]).all()  # planted: lowest-entropy bucket shifts most at every layer


def test_missing_diagnostics_give_empty_tables(tmp_path):
    r = Run(make_run(tmp_path, "dpo", steps=3))
    for fn in (
        grad_alignment.components,
        grad_alignment.classify,
        grad_alignment.sketch_similarity,
        relax.dsd_over_steps,
        relax.spectra,
        entropy.entropy_dynamics,
        correctness.correctness_direction,
        activation_shift.activation_shift,
    ):
        out = fn(r)
        assert isinstance(out, pd.DataFrame) and len(out) == 0 and len(out.columns) > 0, fn.__name__
