"""The paper's D' in exact two-pass form (rlx/alignment/exact.py): a run saves its weights and measured batches at
logged steps (`diagnostics.grad_alignment.exact.*`), `python -m analysis alignment-exact RUN_DIR` recomputes every
row of the instrument at those steps against this run's own final responses (`final_exact`) or, for verification,
against the D' the run used online.

The acceptance check: given the online D', the offline pass reproduces the online table to 1e-5 on tiny GRPO
(rollouts, two micro-batches per step), SFT and DPO runs; and it is step-specific: a saved batch or weight file
from the neighbouring step breaks the match, the saved weights chain from the base model to final/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from analysis.__main__ import main as analysis_main
from analysis.loader import Run
from analysis.measures.grad_alignment import table
from rlx.alignment.exact import load_params, replay, step_dirs
from rlx.config.schema import RunConfig
from rlx.errors import UserError
from rlx.instruments.grad_alignment import GradAlignment
from rlx.instruments.grad_alignment.exact_saver import ExactSaver
from rlx.run import RunContext

TINY = ["eval.before_after=false", "diagnostics.grad_alignment.target_size=16"]
GRPO = [
    "trainer.max_steps=3",
    "trainer.per_device_train_batch_size=16",
    "trainer.num_generations=4",
    "trainer.gradient_accumulation_steps=2",
    "trainer.warmup_steps=0",
    "trainer.learning_rate=1e-3",  # steps that move the model: neighbouring steps' weights differ
    "diagnostics.grad_alignment.exact.enabled=true",
]
TOL = 1e-5


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _tables(run_dir: Path, online: str = "heldout_chosen"):
    """The run's online rows and the offline rows against the online D' (analysis loader)."""
    df = table(Run(run_dir))
    return df[df.target == online], df[df.target == f"replay:{online}"]


def _assert_replay_equals_online(run_dir: Path, steps: list[int], update: bool = True, drift: bool = True):
    online, offline = _tables(run_dir)
    assert sorted(offline.step.unique()) == steps
    on = online[online.step.isin(steps)]
    if not update:
        assert "update" not in set(offline.component)
        on = on[on.component != "update"]
    m = on.merge(offline, on=["step", "component"], suffixes=("_o", "_r"), how="outer", indicator=True)
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"][["step", "component", "_merge"]]
    tot = on[on.component == "total"].set_index("step")
    norms = on.set_index(["step", "component"]).norm
    checked = 0
    for _, r in m.iterrows():
        where = (r.step, r.component)
        G_scale, norm_scale = abs(tot.G[r.step]), tot.norm[r.step]
        # a component that is zero up to round-off (SFT has no negative learning: neg = grad L - pos) has no
        # direction; its cosines are round-off online and NaN (0/0) offline, so they are not compared
        vanishing = {c for c in ("pos", "neg") if norms.get((r.step, c), 1.0) <= TOL * norm_scale}
        assert abs(r.G_o - r.G_r) <= TOL * G_scale, (where, r.G_o, r.G_r)
        if r.norm_o == r.norm_o:  # NaN for tertiles and `other`
            scale = abs(r.norm_o) if r.component == "update" else norm_scale
            assert abs(r.norm_o - r.norm_r) <= TOL * scale, (where, r.norm_o, r.norm_r)
        for col in ("cos", "cos_pos_neg") + (("drift",) if drift else ()):
            a, b = r.get(f"{col}_o"), r.get(f"{col}_r")
            if col == "cos_pos_neg" and vanishing or col == "cos" and r.component in vanishing:
                continue
            if a is not None and a == a:
                assert abs(a - b) <= TOL, (where, col, a, b)
        for col in ("R_T", "norm_target"):
            assert abs(r[f"{col}_o"] - r[f"{col}_r"]) <= TOL * abs(r[f"{col}_o"]), (where, col)
        if r.component == "update":
            assert abs(r.delta_R_o - r.delta_R_r) <= TOL * abs(r.R_T_o), where
        assert r.n_tokens_o == r.n_tokens_r and r.kl_split_o == r.kl_split_r, where
        checked += 1
    # a check that cannot pass by accident: the steps' values are far apart at this tolerance
    G = tot.G.to_numpy()
    assert all(abs(a - b) > 1e3 * TOL * max(abs(a), abs(b)) for a, b in zip(G, G[1:]))
    return checked


@pytest.fixture(scope="module")
def grpo_run(run_recipe) -> Path:
    return run_recipe("grpo_tiny_align", *GRPO, *TINY)


@pytest.mark.slow
def test_grpo_offline_pass_with_the_online_target_reproduces_the_online_rows(grpo_run):
    steps = [s for s, _ in step_dirs(grpo_run)]
    assert steps == [1, 2, 3]
    meta = json.loads((grpo_run / "grad_alignment_exact/step_000002/meta.json").read_text())
    assert meta["micro_batches"] == 2 and meta["logged_index"] == 1
    assert meta["total_bytes"] == sum(meta["bytes"].values()) > 2 * meta["bytes"]["batch"]
    # the rollouts the loss consumed are in the saved batch: ids, masks, advantages
    batch = torch.load(grpo_run / "grad_alignment_exact/step_000002/batch.pt", weights_only=True)
    inputs = batch["micro"][0]["inputs"]
    assert {"prompt_ids", "completion_ids", "completion_mask", "advantages", "rlx_sample_ids"} <= set(inputs)
    assert inputs["completion_ids"].shape[0] == 16  # per_device_train_batch_size completions per micro-batch
    assert batch["micro"][0]["w"].shape == (
        16,
        inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1] - 1,
    )
    assert analysis_main(["alignment-exact", str(grpo_run), "target=online"]) == 0
    n = _assert_replay_equals_online(grpo_run, steps)
    assert n == 3 * 12  # total, pos, neg, top, mid, bot, other, 4 layer groups, update
    summary = json.loads((grpo_run / "diagnostics/grad_alignment_replay_online_summary.json").read_text())
    online = json.loads((grpo_run / "diagnostics/grad_alignment_summary.json").read_text())
    for k in ("n_logged", "frac_positive", "sign_flip_rate", "regime"):
        assert summary[k] == online[k], k
    assert abs(summary["cv"] - online["cv"]) <= TOL * online["cv"]


@pytest.mark.slow
def test_saved_weights_chain_from_the_base_model_to_final(grpo_run, tiny_model_dir):
    """weights_before(1) = the model training started from, weights_before(s+1) = weights_after(s), and
    weights_after(last) = final/: no saved checkpoint is a step early or late."""
    steps = step_dirs(grpo_run)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    first = load_params(steps[0][1], "weights_before")
    assert first.keys() <= base.keys() and all(torch.equal(first[k], base[k]) for k in first)
    for (_, a), (_, b) in zip(steps, steps[1:]):
        after, before = load_params(a, "weights_after"), load_params(b, "weights_before")
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
        assert any(not torch.equal(after[k], load_params(a, "weights_before")[k]) for k in after)
    final = load_file(str(grpo_run / "final/model.safetensors"))
    last = load_params(steps[-1][1], "weights_after")
    assert all(torch.equal(last[k], final[k]) for k in last)


@pytest.mark.slow
def test_a_batch_or_weights_from_the_neighbouring_step_break_the_match(grpo_run, tmp_path):
    """Step 2 replayed with step 3's batch, step 3 with step 2's weights: neither matches the online row."""
    copy = tmp_path / "run"
    shutil.copytree(grpo_run, copy, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    ex = copy / "grad_alignment_exact"
    shutil.rmtree(ex / "step_000001")
    shutil.copy(ex / "step_000003/batch.pt", ex / "step_000002/batch.pt")
    for f in (ex / "step_000003").glob("weights_before-*.safetensors"):
        shutil.copy(ex / "step_000002" / f.name, f)
    replay(copy, target="online", progress=False)
    online, offline = _tables(copy)
    for s in (2, 3):
        a = float(online[(online.step == s) & (online.component == "total")].G.iloc[0])
        b = float(offline[(offline.step == s) & (offline.component == "total")].G.iloc[0])
        assert abs(a - b) > 1e-3 * abs(a), (s, a, b)


@pytest.mark.slow
def test_final_exact_is_measured_against_this_runs_own_final_responses(grpo_run, tiny_model_dir):
    """target=final: D' = this run's final greedy responses (final_responses.jsonl, as rlx final-responses writes
    it); R_T at the first saved step is their float64 NLL under the starting model, R_T + delta_R at the last step
    their NLL under final/ (the run's own final model, not a sibling's)."""
    path = replay(grpo_run, n=8, progress=False)
    assert path.name == "grad_alignment_final_exact.parquet"
    rows = [json.loads(line) for line in (grpo_run / "final_responses.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    df = table(Run(grpo_run))
    fe = df[df.target == "final_exact"]
    assert sorted(fe.step.unique()) == [1, 2, 3]
    first = fe[(fe.step == 1) & (fe.component == "total")].iloc[0]
    last = fe[(fe.step == 3) & (fe.component == "update")].iloc[0]
    before, after = _nll64(tiny_model_dir, rows), _nll64(grpo_run / "final", rows)
    assert abs(first.R_T - before) <= TOL * before, (first.R_T, before)
    assert abs(last.R_T + last.delta_R - after) <= TOL * after, (last.R_T + last.delta_R, after)
    summary = json.loads((grpo_run / "diagnostics/grad_alignment_final_exact_summary.json").read_text())
    assert summary["target"] == "final_exact" and summary["n_logged"] == 3 and summary["steps"] == [1, 2, 3]
    assert summary["regime"] in ("supervised-like", "RL-like") and "cv" in summary
    from analysis.measures.grad_alignment import classify

    assert "final_exact" in set(classify(Run(grpo_run)).target)


@torch.no_grad()
def _nll64(model_dir: Path, rows: list[dict]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for r in rows:
        p, c = r["prompt_ids"], r["completion_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
        total -= sum(float(logp[len(p) + j - 1, tok]) for j, tok in enumerate(c))
        count += len(c)
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,extra,saved,update",
    [
        # every 2nd logged step, no weights after the update: steps 1 and 3, no update row
        (
            "sft_tiny_align",
            [
                "diagnostics.grad_alignment.exact.save_every=2",
                "diagnostics.grad_alignment.exact.save_update=false",
            ],
            [1, 3],
            False,
        ),
        ("dpo_tiny_align", ["preference.num_pairs=32", "trainer.max_steps=2"], [1, 2], True),
    ],
)
def test_sft_and_dpo_offline_pass_reproduces_the_online_rows(run_recipe, recipe, extra, saved, update):
    run_dir = run_recipe(
        recipe,
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=8",
        "diagnostics.grad_alignment.exact.enabled=true",
        *TINY,
        *extra,
    )
    assert [s for s, _ in step_dirs(run_dir)] == saved
    assert not any(Path(run_dir, "grad_alignment_exact").glob(".step_*"))  # no unfinished step left
    replay(run_dir, target="online", progress=False)
    # drift is cos(grad L(t), grad L(previous SAVED step)) offline: the online value only when every step is saved
    _assert_replay_equals_online(run_dir, saved, update=update, drift=saved == [1, 2])


# ---- options and bad input -----------------------------------------------------------------------------------


def test_saved_steps_are_every_kth_logged_step():
    saver = ExactSaver.__new__(ExactSaver)
    saver.every = 3
    inst = SimpleNamespace(_logged=lambda s: s == 1 or s % 10 == 0, series=[])
    saved = []
    for step in range(1, 80):
        if saver.wants(inst, step):
            saved.append(step)
        if inst._logged(step):
            inst.series.append(0.0)
    assert saved == [1, 30, 60]  # logged steps 1, 10, 20, ...: indices 0, 3, 6


def _instrument(tmp_path: Path, world_size: int = 1, **exact) -> GradAlignment:
    cfg = OmegaConf.structured(RunConfig)
    cfg.output_dir = str(tmp_path)
    ga = cfg.diagnostics.grad_alignment
    ga.enabled, ga.exact.enabled = True, True
    for k, v in exact.items():
        setattr(ga.exact, k, v)
    return GradAlignment(ga, RunContext(cfg=cfg, run_dir=tmp_path, world_size=world_size))


def test_exact_options_are_checked_before_training(tmp_path):
    assert _instrument(tmp_path).exact is not None
    with pytest.raises(UserError, match="save_every=0: expected an integer >= 1"):
        _instrument(tmp_path, save_every=0)
    with pytest.raises(UserError, match="single-process"):
        _instrument(tmp_path, world_size=2)
    cfg = OmegaConf.structured(RunConfig)
    assert cfg.diagnostics.grad_alignment.exact.enabled is False  # off by default


def test_alignment_exact_refuses_a_run_without_saved_data(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("algo: sft\n")
    with pytest.raises(SystemExit) as e:
        analysis_main(["alignment-exact", str(run_dir)])
    assert e.value.code == 2
    _one_line_error(capsys, f"{run_dir} has no saved exact data", "exact.enabled=true")
    assert not (run_dir / "final_responses.jsonl").exists()
    assert not (run_dir / "diagnostics").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["{d}", "target=heldout"], "target=heldout: expected final"),
        (["{d}", "n=x"], "n=x: expected an integer"),
        (["{d}", "k=3"], "unknown argument 'k=3'"),
        (["{d}/missing"], "is not a directory"),
        (["{d}/nofinal"], "has no final/ model"),
    ],
)
def test_alignment_exact_bad_arguments(tmp_path, capsys, args, needle):
    (tmp_path / "nofinal").mkdir()
    (tmp_path / "nofinal" / "config.yaml").write_text("algo: sft\n")
    with pytest.raises(SystemExit) as e:
        analysis_main(["alignment-exact", *[a.format(d=tmp_path) for a in args]])
    assert e.value.code == 2
    _one_line_error(capsys, needle)
