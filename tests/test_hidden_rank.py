"""The `hidden_rank` monitor: effective rank math against closed forms and an independent numpy reference, prefix
differences by hand, masking, the instrument on a synthetic seam, and a grpo_tiny run recomputed independently."""

from __future__ import annotations

import glob
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from rlx.algorithms.effective_rank import (
    compact,
    effective_rank,
    prefix_differences,
    prefix_effective_ranks,
    prefix_lengths,
    row_nanmean,
    singular_values,
    trajectory_ranks,
)
from rlx.config.schema import HiddenRankConfig
from rlx.errors import UserError
from rlx.instruments.base import LossContext
from rlx.instruments.catalog import registered_instruments
from rlx.run import RunContext
from rlx.storage import DiagnosticsWriter
from tests.conftest import read_metrics, record_step1_batches

# ---- independent float64 numpy reference -------------------------------------------------------------------


def np_erank(x: np.ndarray, center: bool = True, form: str = "exp") -> float:
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    s = s[s > s.max() * 1e-12] if s.size and s.max() > 0 else s[:0]
    if not s.size:
        return math.nan
    p = s / s.sum()
    h = float(-(p * np.log(p)).sum())
    return math.exp(h) if form == "exp" else h


def np_trajectory(
    x: np.ndarray, stride: int, center: bool = True, form: str = "exp", diff: str = "running_mean"
):
    """erank, mean d1, mean d2 of one (T, d) trajectory, written as the reference code's loop."""
    t = x.shape[0]
    values = [np_erank(x[: k + 1], center, form) for k in range(stride, t, stride)]
    d1, d2, prev = [], [], None
    for j in range(1, len(values)):
        cur = values[j] - (np.mean(values[:j]) if diff == "running_mean" else values[j - 1])
        d1.append(cur)
        if prev is not None:
            d2.append(cur - prev)
        prev = cur
    mean = lambda v: float(np.mean(v)) if v else math.nan  # noqa: E731
    return np_erank(x, center, form), mean(d1), mean(d2), len(values)


def orthonormal(n: int, k: int, seed: int, exclude_ones: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k + int(exclude_ones), generator=g, dtype=torch.float64)
    if exclude_ones:
        a[:, 0] = 1.0
    q, _ = torch.linalg.qr(a)
    return q[:, int(exclude_ones) :]  # columns orthogonal to 1 when exclude_ones: rows already centred


# ---- effective rank of known spectra -------------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_equal_singular_values_give_rank_k(k, center):
    u, v = orthonormal(9, k, 0, exclude_ones=center), orthonormal(7, k, 1)
    x = 2.5 * u @ v.T
    assert float(effective_rank(x, center=center)) == pytest.approx(k, rel=1e-10)
    assert float(effective_rank(x, center=center, form="entropy")) == pytest.approx(math.log(k), abs=1e-10)


def test_singular_values_in_a_known_ratio_give_the_closed_form():
    u, v = orthonormal(6, 3, 2), orthonormal(5, 3, 3)
    x = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    # p = (1/2, 1/3, 1/6): H = 1/2 log 2 + 1/3 log 3 + 1/6 log 6
    h = 0.5 * math.log(2) + math.log(3) / 3 + math.log(6) / 6
    assert float(effective_rank(x, center=False, form="entropy")) == pytest.approx(h, rel=1e-12)
    assert float(effective_rank(x, center=False)) == pytest.approx(math.exp(h), rel=1e-12)
    assert singular_values(x, center=False)[:3].tolist() == pytest.approx([3.0, 2.0, 1.0], rel=1e-10)


def test_scale_rotation_and_shift_invariance_and_the_numpy_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 1, 0.5, 0.2, 0.1])
    q = orthonormal(6, 6, 5)
    for center in (True, False):
        e = float(effective_rank(x, center=center))
        assert e == pytest.approx(np_erank(x.numpy(), center), rel=1e-9)
        assert float(effective_rank(7.3 * x, center=center)) == pytest.approx(e, rel=1e-9)
        assert float(effective_rank(x @ q, center=center)) == pytest.approx(e, rel=1e-9)
    wide = torch.randn(4, 10, generator=g, dtype=torch.float64)  # T < d: the T x T Gram (x above: d x d)
    assert float(effective_rank(wide)) == pytest.approx(np_erank(wide.numpy()), rel=1e-9)
    shift = torch.randn(6, generator=g, dtype=torch.float64) * 10
    assert float(effective_rank(x + shift)) == pytest.approx(float(effective_rank(x)), rel=1e-9)
    assert float(effective_rank(x + shift, center=False)) != pytest.approx(
        float(effective_rank(x, center=False))
    )
    assert math.isnan(float(effective_rank(x[:1])))  # one row, centred: no spectrum
    assert float(effective_rank(x[:1], center=False)) == pytest.approx(1.0)


# ---- prefixes and differences ---------------------------------------------------------------------------------


def test_prefix_lengths_follow_the_reference_loop():
    for length in range(0, 15):
        for stride in (1, 2, 3, 5):
            assert prefix_lengths(length, stride) == [t + 1 for t in range(stride, length, stride)]
    assert prefix_lengths(10, 3) == [4, 7, 10] and prefix_lengths(9, 3) == [4, 7]


def test_differences_by_hand():
    v = torch.tensor([[1.0, 2.0, 4.0, 7.0], [3.0, 5.0, math.nan, math.nan]], dtype=torch.float64)
    d1, d2 = prefix_differences(v, "running_mean")
    nan = math.nan
    # row 0: 2-1, 4-(1+2)/2, 7-(1+2+4)/3; d2: 2.5-1, 14/3-2.5
    torch.testing.assert_close(
        d1, torch.tensor([[nan, 1.0, 2.5, 14 / 3], [nan, 2.0, nan, nan]], dtype=torch.float64), equal_nan=True
    )
    torch.testing.assert_close(
        d2, torch.tensor([[nan, nan, 1.5, 14 / 3 - 2.5], [nan] * 4], dtype=torch.float64), equal_nan=True
    )
    c1, c2 = prefix_differences(v, "consecutive")
    torch.testing.assert_close(
        c1, torch.tensor([[nan, 1.0, 2.0, 3.0], [nan, 2.0, nan, nan]], dtype=torch.float64), equal_nan=True
    )
    torch.testing.assert_close(
        c2, torch.tensor([[nan, nan, 1.0, 1.0], [nan] * 4], dtype=torch.float64), equal_nan=True
    )
    assert row_nanmean(d1).tolist()[0] == pytest.approx((1 + 2.5 + 14 / 3) / 3)
    assert row_nanmean(d2).tolist() == pytest.approx([(1.5 + 14 / 3 - 2.5) / 2, nan], nan_ok=True)


@pytest.mark.parametrize(
    "center, form, diff",
    [(True, "exp", "running_mean"), (False, "entropy", "consecutive"), (True, "entropy", "running_mean")],
)
def test_trajectory_ranks_match_the_reference_loop(center, form, diff):
    g = torch.Generator().manual_seed(6)
    lengths = [11, 7, 3, 1, 0, 9]
    b, t, d = len(lengths), 11, 5
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    for stride in (1, 2, 3):
        r = trajectory_ranks(x, mask, stride, center=center, form=form, diff=diff)
        for i, n in enumerate(lengths):
            if n:
                e, d1, d2, k = np_trajectory(x[i, :n].numpy(), stride, center, form, diff)
            else:
                e, d1, d2, k = math.nan, math.nan, math.nan, 0
            assert float(r["erank"][i]) == pytest.approx(e, rel=1e-8, nan_ok=True), (stride, i)
            assert float(r["d1"][i]) == pytest.approx(d1, rel=1e-8, abs=1e-10, nan_ok=True), (stride, i)
            assert float(r["d2"][i]) == pytest.approx(d2, rel=1e-8, abs=1e-10, nan_ok=True), (stride, i)
            assert int(r["n_prefixes"][i]) == k


def test_padding_and_holes_do_not_change_any_value():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 3:] = False
    ref = trajectory_ranks(x, mask, 1)
    junk = x.clone()
    junk[~mask] = 1e3 * torch.randn(int((~mask).sum()), 4, generator=g, dtype=torch.float64)
    got = trajectory_ranks(junk, mask, 1)
    wider = torch.cat([junk, 50 * torch.randn(3, 4, 4, generator=g, dtype=torch.float64)], 1)
    wider_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    got_wide = trajectory_ranks(wider, wider_mask, 1)
    for k in ("erank", "d1", "d2"):
        torch.testing.assert_close(got[k], ref[k], equal_nan=True, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_wide[k], ref[k], equal_nan=True, rtol=1e-10, atol=1e-12)
    # a mask with holes is the same as the compacted trajectory
    holes = torch.zeros(1, 9, dtype=torch.bool)
    holes[0, [0, 2, 3, 7, 8]] = True
    xc, n = compact(x[:1], holes)
    assert int(n) == 5 and torch.equal(xc[0, :5], x[0, [0, 2, 3, 7, 8]])
    a = trajectory_ranks(x[:1], holes, 1)
    b = trajectory_ranks(x[:1, [0, 2, 3, 7, 8]], torch.ones(1, 5, dtype=torch.bool), 1)
    for k in ("erank", "d1", "d2"):
        torch.testing.assert_close(a[k], b[k], equal_nan=True)
    assert prefix_effective_ranks(x, mask, 4).shape == (3, 2)  # windows 5, 9
    # max_tokens: only the first N valid tokens, everywhere
    capped = trajectory_ranks(x, mask, 1, max_tokens=4)
    first = trajectory_ranks(x[:, :4], mask[:, :4], 1)
    for k in ("erank", "d1", "d2", "n_prefixes"):
        torch.testing.assert_close(capped[k], first[k], equal_nan=True)


# ---- the instrument on a synthetic seam ----------------------------------------------------------------------

B, P, C, D = 6, 3, 8, 5


def fake_trainer(step: int = 0):
    return SimpleNamespace(
        state=SimpleNamespace(global_step=step),
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(num_processes=1),
        args=SimpleNamespace(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def make(tmp_path, algo="grpo", **kw):
    cfg = OmegaConf.structured(HiddenRankConfig(**{"enabled": True, "every": 2, "stride": 1, **kw}))
    run = RunContext(cfg=SimpleNamespace(algo=algo), run_dir=tmp_path, writer=DiagnosticsWriter(tmp_path))
    return registered_instruments()["hidden_rank"](cfg, run)


def make_ctx(trainer, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, P + C, D, generator=g)
    lengths = torch.tensor([8, 6, 3, 1, 5, 7])
    cmask = (torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)).float()
    mask = torch.cat([torch.zeros(B, P - 1), cmask], 1)
    token_logps = torch.zeros(B, P + C - 1)
    extras = {
        "rewards": torch.tensor([1.0, 0.0, 1.0, float("nan"), 0.0, 1.0]),
        "sample_ids": torch.arange(B) + 100 if ids is None else ids,
        "completion_len": C,
        "advantages": torch.zeros(B),
    }
    ctx = LossContext(
        trainer, "grpo", {}, torch.zeros(()), token_logps, mask, hidden, None, 1.0, extras=extras
    )
    return ctx, hidden[:, P - 1 : P + C - 1], cmask


def test_measured_step_metrics_buckets_and_rows(tmp_path):
    inst = make(tmp_path)
    trainer = fake_trainer(0)
    inst.on_train_begin(trainer)
    assert inst.needs_hidden  # step 1 is measured
    ctx, states, cmask = make_ctx(trainer)
    half = B // 2  # two micro-batches of the same step; the second repeats one rollout (ignored)
    for sl in (slice(0, half), slice(half - 1, B)):
        sub = LossContext(
            trainer,
            "grpo",
            {},
            ctx.loss,
            ctx.token_logps[sl],
            ctx.mask[sl],
            ctx.hidden[sl],
            None,
            1.0,
            extras={
                **ctx.extras,
                "rewards": ctx.extras["rewards"][sl],
                "sample_ids": ctx.extras["sample_ids"][sl],
            },
        )
        assert inst.on_loss(sub) is None
    trainer.state.global_step = 1
    inst.on_step_end(trainer)
    ref = [np_trajectory(states[i, : int(cmask[i].sum())].numpy(), 1) for i in range(B)]
    rewards = ctx.extras["rewards"].tolist()
    store = trainer._metrics["train"]
    for j, v in enumerate(("erank", "d1", "d2")):
        vals = np.array([r[j] for r in ref])
        for bucket, sel in (
            ("", np.ones(B, bool)),
            ("_correct", np.array([r >= 1.0 for r in rewards])),
            ("_wrong", np.array([r < 1.0 for r in rewards])),
        ):
            x = vals[sel & np.isfinite(vals)]
            key = f"hidden_rank/{v}{bucket}"
            if len(x):
                assert store[key] == pytest.approx([x.mean()], rel=1e-5), key
            else:
                assert key not in store
    df = pd.concat(pd.read_parquet(f) for f in glob.glob(str(tmp_path / "diagnostics/hidden_rank/*.parquet")))
    assert sorted(df["sample_id"]) == list(range(100, 100 + B)) and set(df["step"]) == {1}
    df = df.set_index("sample_id").loc[list(range(100, 100 + B))]
    assert df["length"].tolist() == [8, 6, 3, 1, 5, 7]
    assert df["erank"].to_numpy() == pytest.approx([r[0] for r in ref], rel=1e-5, nan_ok=True)
    assert df["d2"].to_numpy() == pytest.approx([r[2] for r in ref], rel=1e-5, abs=1e-7, nan_ok=True)
    assert df["n_prefixes"].tolist() == [r[3] for r in ref]
    # step 2 is not measured (every=2 measures 1, 2, 4, ...: global_step 1 -> step 2 is measured; 2 -> 3 is not)
    trainer.state.global_step = 2
    assert not inst.needs_hidden
    ctx3, _, _ = make_ctx(trainer, seed=1, ids=torch.arange(B) + 200)
    inst.on_loss(ctx3)
    assert len(inst.rows) == 0
    trainer.state.global_step = 3
    inst.on_step_end(trainer)
    assert len(glob.glob(str(tmp_path / "diagnostics/hidden_rank/*.parquet"))) == 1


def test_bad_options_and_algorithms_are_user_errors(tmp_path):
    for kw, match in (
        ({"every": 0}, "every=0"),
        ({"stride": 0}, "stride=0"),
        ({"form": "log"}, "form='log'"),
        ({"diff": "delta"}, "diff='delta'"),
        ({"threshold": float("nan")}, "threshold"),
        ({"max_tokens": -1}, "max_tokens=-1"),
    ):
        with pytest.raises(UserError, match=match):
            make(tmp_path, **kw)
    with pytest.raises(UserError, match="needs rollouts with rewards: algo grpo|rloo"):
        make(tmp_path, algo="dpo")


# ---- integration: a grpo_tiny run, step 1 recomputed from an independent forward ------------------------------


@pytest.mark.slow
def test_grpo_tiny_run_measures_and_matches_an_independent_forward(run_recipe, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rlx.instruments import hidden_rank as hr

    seen = record_step1_batches(monkeypatch, hr.HiddenRank)
    run = run_recipe(
        "grpo_tiny",
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=16",
        "trainer.report_to=[]",
        "eval.before_after=false",
        "diagnostics.rollouts.fraction=1.0",
        "diagnostics.hidden_rank.enabled=true",
        "diagnostics.hidden_rank.every=2",
        "diagnostics.hidden_rank.stride=1",
    )
    metrics = {r["step"]: r for r in read_metrics(run) if "step" in r}
    logged = sorted(s for s, r in metrics.items() if "hidden_rank/erank" in r)
    assert logged == [1, 2]
    rows = pd.concat(
        pd.read_parquet(f) for f in sorted(glob.glob(str(run / "diagnostics/hidden_rank/*.parquet")))
    )
    assert (
        sorted(rows["step"].unique()) == [1, 2]
        and rows.groupby("step")["sample_id"].apply(lambda s: s.is_unique).all()
    )
    for step, g in rows.groupby("step"):
        assert metrics[step]["hidden_rank/erank"] == pytest.approx(g["erank"].mean(), rel=1e-6)
        correct = g[g["reward"] >= 1.0]["erank"]
        if len(correct):
            assert metrics[step]["hidden_rank/erank_correct"] == pytest.approx(correct.mean(), rel=1e-6)
    assert (rows["n_prefixes"] == (rows["length"] - 1).clip(lower=0)).all()
    assert (rows["d1"].isna() == (rows["n_prefixes"] < 2)).all()
    roll = pd.concat(pd.read_parquet(f) for f in glob.glob(str(run / "diagnostics/rollouts/*.parquet")))
    joined = rows.merge(roll, on="sample_id", suffixes=("", "_rollout"), validate="many_to_one")
    assert len(joined) == len(rows)
    assert joined["reward"].to_numpy() == pytest.approx(joined["reward_rollout"].to_numpy(), nan_ok=True)
    assert (joined["length"] == joined["completion_length"]).all()
    # step 1, recomputed: the warm-started model's post-norm last-layer states at the completion positions
    assert seen
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    step1 = rows[rows["step"] == 1].set_index("sample_id")
    checked = 0
    for b in seen:
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        att = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
        p = b["prompt_ids"].shape[1]
        for i, sid in enumerate(b["ids"].tolist()):
            n = int(b["completion_mask"][i].sum())
            states = h[i, p - 1 : p - 1 + n].double().numpy()  # the states that predict completion tokens
            e, d1, d2, _ = np_trajectory(states, 1)
            assert step1.loc[sid, "erank"] == pytest.approx(e, rel=1e-4, nan_ok=True)
            assert step1.loc[sid, "d1"] == pytest.approx(d1, rel=1e-3, abs=1e-4, nan_ok=True)
            checked += 1
    assert checked == len(step1)


# ---- analysis ---------------------------------------------------------------------------------------------------


def test_analysis_recovers_the_planted_buckets_and_joins_dsd(tmp_path):
    from analysis.loader import Run
    from analysis.measures import hidden_rank
    from analysis.synthetic import make_run

    run = Run(make_run(tmp_path / "r", "grpo", steps=6, relax=True, hidden_rank=True))
    t = hidden_rank.rank_over_steps(run)
    assert sorted(t["step"].unique()) == [1, 2, 4, 6] and set(t["bucket"]) == {"all", "correct", "wrong"}
    wide = t.pivot(index="step", columns="bucket", values="erank")
    assert (wide["correct"] > wide["wrong"] + 0.5).all()  # planted: +1 for correct rollouts
    assert (t.query("bucket == 'all'")["n"] == 32).all()
    both = hidden_rank.rank_and_dsd(run)
    assert both["step"].tolist() == [1, 2, 3, 4, 5, 6] and both["dsd"].notna().all()
    assert both["erank"].isna().tolist() == [False, False, True, False, True, False]
    # without the rows: the logged metrics
    bare = make_run(tmp_path / "b", "grpo", steps=2)
    lines = (bare / "metrics.jsonl").read_text().splitlines()
    extra = {"hidden_rank/erank": 3.0, "hidden_rank/erank_correct": 4.0, "hidden_rank/d1_wrong": -1.0}
    lines[0] = lines[0][:-1] + ", " + ", ".join(f'"{k}": {v}' for k, v in extra.items()) + "}"
    (bare / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    t = hidden_rank.rank_over_steps(Run(bare)).set_index("bucket")
    assert t.loc["all", "erank"] == 3.0 and t.loc["correct", "erank"] == 4.0 and t.loc["wrong", "d1"] == -1.0
    assert hidden_rank.rank_and_dsd(Run(bare)).empty
