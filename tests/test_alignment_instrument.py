"""The grad_alignment instrument in an HF-ordered loop (tests/_alignment_harness.py): identities, gradient
accumulation, isolation of the probe pass, storage, logger metrics, activation variant, 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _alignment_harness as harness  # noqa: E402

from rlx.storage import read_manifest, read_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def table(out: Path) -> pd.DataFrame:
    """The alignment table: every shard grad_alignment/step_NNNNNN.parquet the manifest lists."""
    return read_table(out, "grad_alignment")


def G(df, step, comp):
    return float(df[(df.step == step) & (df.component == comp)]["G"].iloc[0])


@pytest.fixture(scope="module")
def dpo_ga2(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_ga2")
    inst, checks, _ = harness.run(out, "dpo", steps=3, ga=2, sketch_dim=16384)
    return out, inst, checks


def test_components_tertiles_and_optimizer_gradient_identities(dpo_ga2):
    out, inst, checks = dpo_ga2
    df = table(out)
    assert sorted(df.step.unique()) == [1, 2, 3]
    for s in (1, 2, 3):
        tot = G(df, s, "total")  # <g_T, .grad> read before clipping
        assert rel(G(df, s, "pos") + G(df, s, "neg"), tot) < 1e-5
        assert rel(G(df, s, "top") + G(df, s, "mid") + G(df, s, "bot"), tot) < 1e-5
        assert abs(G(df, s, "other")) / abs(tot) < 1e-5
        layers = [G(df, s, c) for c in df.component.unique() if c.startswith("layer:")]
        assert len(layers) == 4 and rel(sum(layers), tot) < 1e-5
    for dv, grad_v, _ in checks:  # sum_t w_t grad l_t == the gradient the optimizer receives
        assert rel(dv, grad_v) < 1e-5
    # DPO: chosen tokens are positive learning, rejected negative; equal counts of scored tokens per side
    row = df[(df.step == 1) & (df.component == "total")].iloc[0]
    assert row.n_tokens > 0
    assert df[df.component.isin(["pos", "neg"])].n_tokens.gt(0).all()
    # realised update of SGD (after clipping): same direction as grad L, cos identical
    upd = df[df.component == "update"].set_index("step")
    totr = df[df.component == "total"].set_index("step")
    assert ((upd.cos - totr.cos).abs() < 1e-4).all()
    assert (upd.G * totr.G > 0).all()


def test_storage_manifest_and_logger_metrics(dpo_ga2):
    out, inst, _ = dpo_ga2
    man = {f["path"]: f for f in read_manifest(out)["files"]}
    shards = {p: f for p, f in man.items() if f["name"] == "grad_alignment" and f["format"] == "parquet"}
    # one shard per logged step
    assert sorted(shards) == [f"grad_alignment/step_{s:06d}.parquet" for s in (1, 2, 3)]
    assert all(f["schema_version"] == 1 and f["instrument"] == "grad_alignment" for f in shards.values())
    assert man["grad_alignment_sketches/step_000002.safetensors"]["instrument"] == "grad_alignment"
    summary = json.loads((out / "diagnostics" / "grad_alignment_summary.json").read_text())
    assert summary["n_logged"] == 3 and summary["regime"] in ("supervised-like", "RL-like")
    sk = out / "diagnostics" / "grad_alignment_sketches" / "step_000002.safetensors"
    per_step = (
        sk.stat().st_size + (out / "diagnostics" / "grad_alignment" / "step_000002.parquet").stat().st_size
    )
    assert per_step < 200_000, per_step
    from safetensors.torch import load_file

    t = load_file(str(sk))
    assert set(t) == {"loss/000002", "target/000002", "pos/000002", "neg/000002"}
    assert t["loss/000002"].shape == (16384,) and t["loss/000002"].dtype == torch.float16
    # same scalars in the logger: three logged steps of grad_align/G_total
    df = table(out)
    logged = inst._trainer._metrics["train"]["grad_align/G_total"]
    assert logged == pytest.approx(df[df.component == "total"].sort_values("step").G.tolist(), rel=1e-9)
    for k in ("G_pos", "G_neg", "G_top", "cos_total", "norm_pos", "cos_pos_neg", "drift", "realised"):
        assert f"grad_align/{k}" in inst._trainer._metrics["train"]


def test_grad_accumulation_matches_single_batch(tmp_path, dpo_ga2):
    out2, _, _ = dpo_ga2
    harness.run(tmp_path, "dpo", steps=3, ga=1, sketch_dim=16384)
    a, b = table(tmp_path), table(out2)
    for s in (1, 2, 3):
        for c in ("total", "pos", "neg", "layer:embed", "layer:head", "update"):
            assert rel(G(b, s, c), G(a, s, c)) < 1e-4, (s, c)


def test_grpo_kl_component_and_activation_variant(tmp_path):
    _, checks, _ = harness.run(tmp_path / "p", "grpo", steps=2, ga=1)
    df = table(tmp_path / "p")
    for s in (1, 2):
        tot = G(df, s, "total")
        assert rel(G(df, s, "pos") + G(df, s, "neg") + G(df, s, "kl"), tot) < 1e-5
        assert rel(G(df, s, "top") + G(df, s, "mid") + G(df, s, "bot") + G(df, s, "kl"), tot) < 1e-5
    inst, checks, _ = harness.run(tmp_path / "a", "grpo", steps=2, ga=1, variant="activation")
    da = table(tmp_path / "a")
    assert set(da.variant) == {"activation"}
    for s, (_, _, head_ref) in zip((1, 2), checks):
        # activation-space G restricted to the LM head == the parameter-space head gradient's alignment
        assert rel(G(da, s, "total"), head_ref) < 1e-4
        assert rel(G(da, s, "pos") + G(da, s, "neg") + G(da, s, "kl"), G(da, s, "total")) < 1e-6
        assert (
            rel(G(da, s, "top") + G(da, s, "mid") + G(da, s, "bot") + G(da, s, "kl"), G(da, s, "total"))
            < 1e-4
        )


def test_grpo_kl_split_fit_with_trl_bias_correction(tmp_path):
    """TRL's default KL (times rho) is split exactly: rows say kl_split=fit with a round-off residual."""
    inst, _, _ = harness.run(tmp_path, "grpo", steps=2, ga=2, targs={"use_bias_correction_kl": True})
    df = table(tmp_path)
    assert set(df.kl_split) == {"fit"} and (df.kl_fit_residual < 1e-5).all()
    for s in (1, 2):
        assert rel(G(df, s, "pos") + G(df, s, "neg") + G(df, s, "kl"), G(df, s, "total")) < 1e-5
    assert abs(G(df, 2, "kl")) > 0  # the policy moved away from the reference at step 2
    assert inst._trainer._metrics["train"]["grad_align/kl_split_unmodelled"] == [0.0, 0.0]


@pytest.mark.parametrize(
    "targs, is_weights, reason",
    [
        ({"top_entropy_quantile": 0.2}, False, "top_entropy_quantile=0.2"),
        ({"use_vllm": True, "vllm_importance_sampling_correction": True}, False, "vLLM importance-sampling"),
        ({}, True, "KL fit residual"),  # nothing in the config says so: caught by the fit residual
    ],
)
def test_grpo_kl_split_unmodelled_is_marked_not_folded(tmp_path, capsys, targs, is_weights, reason):
    inst, checks, _ = harness.run(tmp_path, "grpo", steps=2, ga=1, targs=targs, is_weights=is_weights)
    df = table(tmp_path)
    assert set(df.kl_split) == {"unmodelled"}
    assert all(reason in r for r in df.kl_split_reason)
    for s in (1, 2):
        kl = G(df, s, "kl") if "kl" in set(df[df.step == s].component) else 0.0
        assert abs(kl) <= 1e-6 * abs(G(df, s, "total")), "a misfit was folded into kl"
        assert rel(G(df, s, "pos") + G(df, s, "neg") + kl, G(df, s, "total")) < 1e-5
    assert inst._trainer._metrics["train"]["grad_align/kl_split_unmodelled"] == [1.0, 1.0]
    assert "warning: grad_alignment: the KL term is not split" in capsys.readouterr().out


def test_fsdp_launch_is_refused_with_a_message(tmp_path, monkeypatch):
    from rlx.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(UserError, match="does not run under FSDP.*DDP or DeepSpeed"):
        harness.run(tmp_path, "grpo", steps=1)


def test_probe_pass_does_not_change_training(tmp_path):
    """Dropout on: the probe pass must not consume the training RNG, touch .grad or leave eval mode on."""
    _, _, m_on = harness.run(tmp_path / "on", "dpo", steps=3, ga=2, dropout=0.2)
    _, _, m_off = harness.run(tmp_path / "off", "dpo", steps=3, ga=2, dropout=0.2, instrument=False)
    assert m_on.training
    for a, b in zip(m_on.parameters(), m_off.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29571",
        str(REPO / "tests" / "_alignment_harness.py"),
        str(tmp_path / "ddp"),
        "dpo",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    harness.run(tmp_path / "one", "dpo", steps=2, sketch_dim=16384)
    one, two = table(tmp_path / "one"), table(tmp_path / "ddp")
    assert len(one) == len(two)
    m = one.merge(two, on=["step", "component"], suffixes=("_1", "_2"))
    for _, r in m.iterrows():
        tot = float(one[(one.step == r.step) & (one.component == "total")].G.iloc[0])
        if r.component == "other":
            assert abs(r.G_2) / abs(tot) < 1e-5
            continue
        assert rel(r.G_2, r.G_1) < 1e-4, (r.step, r.component)
        assert r.n_tokens_2 == r.n_tokens_1
        if r.component in ("total", "update") or r.component.startswith("layer:"):
            assert rel(r.cos_2, r.cos_1) < 1e-4 and rel(r.norm_2, r.norm_1) < 1e-4
        if r.component in ("pos", "neg"):  # norms of per-rank component vectors: all-reduced sketches
            assert r.norm_source_2 == "sketch" and rel(r.norm_2, r.norm_1) < 0.05
    d = m[(m.component == "total") & m.drift_1.notna()]
    assert ((d.drift_1 - d.drift_2).abs() < 1e-4).all()


@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_row_path_equals_per_component_backwards(tmp_path, algo):
    """One-backward row path (layer captures on the trainer's backward) == one backward per component."""
    fast, _, _ = harness.run(tmp_path / "fast", algo, steps=2, ga=2, kl=False)
    slow, _, _ = harness.run(tmp_path / "slow", algo, steps=2, ga=2, kl=False, fast=False)
    assert fast.rowcap is not None and slow.rowcap is None
    a, b = table(tmp_path / "fast"), table(tmp_path / "slow")
    m = a.merge(b, on=["step", "component"], suffixes=("_f", "_s"))
    for _, r in m.iterrows():
        tot = float(b[(b.step == r.step) & (b.component == "total")].G.iloc[0])
        assert abs(r.G_f - r.G_s) / abs(tot) < 1e-5, (r.step, r.component)
        if r.component in ("pos", "neg"):
            assert rel(r.norm_f, r.norm_s) < 1e-5 and abs(r.cos_pos_neg_f - r.cos_pos_neg_s) < 1e-5


@pytest.mark.slow
def test_grpo_and_dpo_recipes_end_to_end(run_recipe):
    """Real TRL trainers (fused LM head, tied embeddings): finite rows every logged step, identities hold,
    and the logger gets the same G_total as the table."""
    from conftest import read_metrics

    for recipe, extra in (("grpo_tiny_align", ()), ("dpo_tiny_align", ("preference.num_pairs=64",))):
        run_dir = run_recipe(
            recipe, "trainer.max_steps=3", "trainer.logging_steps=1", "eval.before_after=false", *extra
        )
        df = table(run_dir)
        assert sorted(df.step.unique()) == [1, 2, 3]
        main = df[df.component.isin(["total", "pos", "neg", "top", "mid", "bot", "update"])]
        assert main.G.map(math.isfinite).all()
        for s in (1, 2, 3):
            tot = G(df, s, "total")
            assert abs(G(df, s, "other")) / abs(tot) < 1e-4, (recipe, s)
            assert rel(G(df, s, "top") + G(df, s, "mid") + G(df, s, "bot"), tot) < 1e-4
        logged = {
            r["step"]: r["grad_align/G_total"] for r in read_metrics(run_dir) if "grad_align/G_total" in r
        }
        tot = df[df.component == "total"].set_index("step").G
        assert sorted(logged) == [1, 2, 3] and all(rel(logged[s], tot[s]) < 1e-6 for s in logged)
        assert (df.target == "heldout_chosen").all()  # target=auto, for every algorithm


def test_ppo_on_policy_steps_and_identities(tmp_path):
    """PPO: rollouts of 4 optimizer steps; only the first step of each (rho = 1) is logged, even with
    every=1, and there G_pos + G_neg = G_total, the tertiles sum to it, `other` vanishes, the layer groups
    sum to it, and the positive-learning tokens are exactly those with A_t > 0 (token-level signs)."""
    inst, checks, _ = harness.run(tmp_path, "ppo", steps=8, ga=2, rollout_steps=4)
    df = table(tmp_path)
    assert sorted(df.step.unique()) == [1, 5]
    for dv, grad_v, _ in checks:  # every step: sum_t w_t grad l_t == the optimizer's gradient
        assert rel(dv, grad_v) < 1e-5
    for s, batch_step in ((1, 0), (5, 4)):
        tot = G(df, s, "total")
        assert rel(G(df, s, "pos") + G(df, s, "neg"), tot) < 1e-5
        assert rel(G(df, s, "top") + G(df, s, "mid") + G(df, s, "bot"), tot) < 1e-5
        assert abs(G(df, s, "other")) / abs(tot) < 1e-5
        layers = [G(df, s, c) for c in df.component.unique() if c.startswith("layer:")]
        assert rel(sum(layers), tot) < 1e-5
        assert "kl" not in set(df[df.step == s].component)  # PPO's KL is in the reward, not a loss term
        # on-policy (rho = 1, nothing clipped): w_t = -A_t / n, so pos = {A_t > 0} on scored tokens
        _, mask, _ = harness.global_batch(batch_step)
        a = torch.randn(mask.shape, generator=torch.Generator().manual_seed(200 + batch_step))
        n_pos = int(((a > 0) & (mask > 0)).sum())
        row = df[(df.step == s) & (df.component == "pos")].iloc[0]
        assert row.n_tokens == n_pos and 0 < n_pos < int(mask.sum())
    # every=3: the on-policy steps 1, 5, 9 qualify when (previous start, step] holds a multiple of 3
    every3, _, _ = harness.run(tmp_path / "e3", "ppo", steps=12, rollout_steps=4, every=3)
    assert sorted(table(tmp_path / "e3").step.unique()) == [1, 5, 9]
    assert [s for s in range(1, 40) if every3._logged(s)] == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]


# ---- what the instrument installs is always undone --------------------------------------------------------------


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_seam_fires_on_before_clip_and_closes_instruments_however_train_ends():
    """rlx's trainers hand the pre-clip gradient to instruments by an event (nothing is patched on the trainer),
    and `train()` closes the instruments when it returns and when it raises."""
    from rlx.instruments.base import Instrument, InstrumentSet
    from rlx.trainers.common import InstrumentedMixin

    events = []

    class Probe(Instrument):
        name = "probe"

        def on_before_clip(self, trainer):
            events.append("before_clip")

        def close(self):
            events.append("close")

    class Base:
        def _clip_grad_norm(self, model):
            events.append("clip")
            return 1.5

        def train(self, fail=False):
            assert self._clip_grad_norm(None) == 1.5
            if fail:
                raise RuntimeError("boom")
            return "done"

    class Trainer(InstrumentedMixin, Base):
        pass

    t = Trainer.__new__(Trainer)
    t.instruments = InstrumentSet([Probe(None, None)])
    assert t.train() == "done" and events == ["before_clip", "clip", "close"]
    events.clear()
    with pytest.raises(RuntimeError, match="boom"):
        t.train(fail=True)
    assert events == ["before_clip", "clip", "close"]
    assert "_clip_grad_norm" not in vars(t) and type(t)._clip_grad_norm is InstrumentedMixin._clip_grad_norm
    with pytest.raises(TypeError, match="override _clip_gradients instead"):

        class Overrides(InstrumentedMixin, Base):
            def _clip_grad_norm(self, model):
                return 0.0


def test_hooks_are_removed_after_training_and_after_an_exception(tmp_path, monkeypatch):
    """The row path's hooks exist only during logged steps and are gone after training; a forward that raises
    inside a logged step (its layer hooks attached) leaves none once the instrument is closed."""
    inst, _, model = harness.run(tmp_path / "ok", "dpo", steps=2, ga=2, sketch_dim=0)
    assert inst.rowcap is not None and _hooks(model) == 0

    made = {}
    real_model, real_logps = harness.tiny_model, harness.token_logps

    class Kept(harness.GradAlignment):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made["inst"] = self

    def model_kept(*a, **k):
        made["model"] = real_model(*a, **k)
        return made["model"]

    def raise_in_the_backbone(module, args, out):
        raise RuntimeError("forward failed")

    def logps_raising(model, ids):
        model.model.register_forward_hook(raise_in_the_backbone)
        return real_logps(model, ids)

    monkeypatch.setattr(harness, "GradAlignment", Kept)
    monkeypatch.setattr(harness, "tiny_model", model_kept)
    monkeypatch.setattr(harness, "token_logps", logps_raising)
    with pytest.raises(RuntimeError, match="forward failed"):
        harness.run(tmp_path / "fail", "dpo", steps=2, ga=2, sketch_dim=0)
    inst, model = made["inst"], made["model"]
    model.model._forward_hooks.clear()  # the test's raising hook and the harness's hidden-state hook
    assert inst.rowcap._handles and _hooks(model) > 2  # the policy's two hooks and the layer hooks it armed
    inst.close()
    assert _hooks(model) == 0
