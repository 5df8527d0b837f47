"""The `probes` monitor: scores equal a manual dot product on the states of an independent forward
(output_hidden_states) for every position kind, an inner and the final layer; bad probe files are user errors;
a grpo_tiny run with probe files written by `save_probe`."""

from __future__ import annotations

import glob
import math
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from rlx.algorithms.probing import auroc
from rlx.config.schema import EmbeddedModelConfig, ProbesConfig
from rlx.errors import UserError
from rlx.instruments.base import LossContext, capture_loss_forward
from rlx.instruments.catalog import registered_instruments
from rlx.instruments.probes import load_probe, pooled_states, save_probe
from rlx.run import RunContext
from rlx.storage import DiagnosticsWriter
from tests.conftest import read_metrics, record_step1_batches

D, L = 16, 3


def tiny_policy():
    from rlx.embedded import build_model, build_tokenizer

    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=D, num_layers=L, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    return build_model(shape, tok, seed=0), tok


def fake_trainer(model, step: int = 0):
    return SimpleNamespace(
        state=SimpleNamespace(global_step=step),
        model=model,
        accelerator=SimpleNamespace(num_processes=1),
        args=SimpleNamespace(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def make(tmp_path, paths, algo="grpo", **kw):
    cfg = OmegaConf.structured(ProbesConfig(**{"enabled": True, "paths": [str(p) for p in paths], **kw}))
    run = RunContext(cfg=SimpleNamespace(algo=algo), run_dir=tmp_path, writer=DiagnosticsWriter(tmp_path))
    return registered_instruments()["probes"](cfg, run)


def batch(tok, seed=0):
    """Left-padded prompts, right-padded completions of ragged length (one empty)."""
    g = torch.Generator().manual_seed(seed)
    b, p, c = 5, 4, 6
    prompt_len = torch.tensor([4, 2, 3, 1, 4])
    comp_len = torch.tensor([6, 3, 1, 0, 5])
    low, high = 7, len(tok)
    prompt_ids = torch.randint(low, high, (b, p), generator=g)
    completion_ids = torch.randint(low, high, (b, c), generator=g)
    prompt_mask = (torch.arange(p).unsqueeze(0) >= (p - prompt_len).unsqueeze(1)).long()
    completion_mask = (torch.arange(c).unsqueeze(0) < comp_len.unsqueeze(1)).long()
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, tok.pad_token_id)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def manual_score(hs, layer, position, inputs, i, direction, bias):
    """<h_layer(position), direction> + bias for rollout i by explicit indexing (float64)."""
    p = inputs["prompt_ids"].shape[1]
    cm = inputs["completion_mask"][i].tolist()
    h = hs[layer][i].double()
    v = torch.as_tensor(direction).double()
    if position == "prompt_last":
        j = max(k for k, m in enumerate(inputs["prompt_mask"][i].tolist()) if m)
        return float(h[j] @ v) + bias
    valid = [p + k for k, m in enumerate(cm) if m]
    if not valid:
        return math.nan
    if position == "last":
        return float(h[valid[-1]] @ v) + bias
    return float(torch.stack([h[j] for j in valid]).mean(0) @ v) + bias


SPECS = [  # name, layer (file), HF index, position, bias, normalize
    ("emb_mean", 0, 0, "mean", 0.0, False),
    ("mid_last", 1, 1, "last", 0.5, False),
    ("mid_prompt", 2, 2, "prompt_last", -1.0, False),
    ("final_last", "final", L, "last", 0.25, False),
    ("final_mean", L, L, "mean", 0.0, True),
    ("final_prompt", "final", L, "prompt_last", 2.0, False),
]


def test_scores_equal_a_manual_dot_product_on_an_independent_forward(tmp_path):
    from trl.trainer.utils import add_fused_lm_head

    policy, tok = tiny_policy()
    inputs = batch(tok)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        hs = policy(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    assert len(hs) == L + 1
    g = torch.Generator().manual_seed(3)
    paths, dirs = [], {}
    for name, layer, _, position, bias, normalize in SPECS:
        v = torch.randn(D, generator=g)
        dirs[name] = v / v.norm() if normalize else v
        paths.append(
            save_probe(
                tmp_path / "p" / f"{name}.safetensors",
                v,
                bias=bias,
                layer=layer,
                position=position,
                name=name,
                normalize=normalize,
            )
        )
    inst = make(tmp_path, paths)
    add_fused_lm_head(policy)
    policy.train()
    trainer = fake_trainer(policy)
    inst.on_train_begin(trainer)
    assert inst.num_layers == L and inst.needs_hidden
    taps = inst.taps(policy)
    assert sorted(taps) == ["probes/layer0", "probes/layer1", "probes/layer2"]
    labels = ids.masked_fill(att == 0, -100)
    with capture_loss_forward(policy, hidden=inst.needs_hidden, taps=taps) as cap:
        policy(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True)
    c = inputs["completion_ids"].shape[1]
    rewards = torch.tensor([1.0, 0.0, 1.0, math.nan, 0.0])
    extras = {"rewards": rewards, "sample_ids": torch.arange(5) + 10, "completion_len": c}
    mask = torch.cat([torch.zeros(5, ids.shape[1] - 1 - c), inputs["completion_mask"].float()], 1)
    ctx = LossContext(
        trainer,
        "grpo",
        inputs,
        torch.zeros(()),
        cap.token_logps,
        mask,
        cap.hidden,
        None,
        1.0,
        extras=extras,
        taps=cap.taps,
    )
    inst.on_loss(ctx)
    trainer.state.global_step = 1
    inst.on_step_end(trainer)
    df = pd.read_parquet(glob.glob(str(tmp_path / "diagnostics/probes/*.parquet"))[0])
    assert len(df) == 5 * len(SPECS) and set(df["step"]) == {1}
    store = trainer._metrics["train"]
    for name, _, hf_index, position, bias, _ in SPECS:
        got = df[df["probe"] == name].set_index("sample_id").loc[list(range(10, 15)), "score"].to_numpy()
        want = [manual_score(hs, hf_index, position, inputs, i, dirs[name], bias) for i in range(5)]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5, nan_ok=True), name
        assert math.isnan(got[3]) == (position != "prompt_last")  # rollout 3 has an empty completion
        ok = np.isfinite(want)
        correct, wrong = np.array([1, 0, 1, 0, 0], bool), np.array([0, 1, 0, 0, 1], bool)
        assert store[f"probes/{name}/mean"] == pytest.approx([np.mean(np.array(want)[ok])], rel=1e-5)
        assert store[f"probes/{name}/mean_correct"] == pytest.approx(
            [np.mean(np.array(want)[ok & correct])], rel=1e-5
        )
        assert store[f"probes/{name}/mean_wrong"] == pytest.approx(
            [np.mean(np.array(want)[ok & wrong])], rel=1e-5
        )
        sel = ok & (correct | wrong)
        assert store[f"probes/{name}/auroc"] == pytest.approx(
            [auroc(torch.tensor(want)[sel], torch.tensor(correct)[sel])]
        )
    # an unscored step installs no taps and reads nothing
    inst.cfg.every = 5
    trainer.state.global_step = 1  # step 2: not a multiple of 5
    assert inst.taps(policy) == {} and not inst.needs_hidden


def test_pooled_states_positions_by_hand():
    states = torch.arange(2 * 5 * 1, dtype=torch.float64).reshape(2, 5, 1)  # value = position (+5 for row 1)
    pm = torch.tensor([[0, 1], [1, 1]])
    cm = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert pooled_states(states, "last", pm, cm)[:, 0].tolist()[0] == 3.0  # P=2 + last completion index 1
    assert math.isnan(pooled_states(states, "last", pm, cm)[1, 0])
    assert pooled_states(states, "mean", pm, cm)[0, 0].item() == 2.5
    assert pooled_states(states, "prompt_last", pm, cm)[:, 0].tolist() == [1.0, 6.0]
    with pytest.raises(ValueError, match="cat\\(prompt, completion\\)"):
        pooled_states(states, "last", torch.ones(2, 3), cm)


def test_bad_files_and_options_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    good = save_probe(tmp_path / "good.safetensors", torch.randn(D), layer=1, position="mean")
    assert load_probe(good).name == "good" and load_probe(good).layer == 1
    cases = {
        "missing": (tmp_path / "nope.safetensors", "does not exist"),
    }
    text = tmp_path / "text.safetensors"
    text.write_text("not a tensor file")
    cases["not safetensors"] = (text, "not a readable safetensors file")
    save_file(
        {"direction": torch.randn(2, D)},
        str(tmp_path / "2d.safetensors"),
        metadata={"layer": "1", "position": "last"},
    )
    cases["2-D"] = (tmp_path / "2d.safetensors", "expected a float \\(d,\\) vector")
    save_file(
        {"w": torch.randn(D)}, str(tmp_path / "w.safetensors"), metadata={"layer": "1", "position": "last"}
    )
    cases["no direction"] = (tmp_path / "w.safetensors", "expected `direction`")
    save_file({"direction": torch.randn(D)}, str(tmp_path / "nometa.safetensors"))
    cases["no layer"] = (tmp_path / "nometa.safetensors", "no `layer` metadata")
    save_file(
        {"direction": torch.randn(D)},
        str(tmp_path / "pos.safetensors"),
        metadata={"layer": "1", "position": "first"},
    )
    cases["unknown position"] = (tmp_path / "pos.safetensors", "position='first' is unknown")
    save_file(
        {"direction": torch.randn(D)},
        str(tmp_path / "neg.safetensors"),
        metadata={"layer": "-2", "position": "last"},
    )
    cases["negative layer"] = (tmp_path / "neg.safetensors", "layer='-2'")
    save_file(
        {"direction": torch.randn(D), "bias": torch.ones(3)},
        str(tmp_path / "bias.safetensors"),
        metadata={"layer": "1", "position": "last"},
    )
    cases["bias shape"] = (tmp_path / "bias.safetensors", "expected a float scalar or \\(1,\\)")
    for label, (path, match) in cases.items():
        with pytest.raises(UserError, match=match):
            make(tmp_path, [path])
        assert label
    with pytest.raises(UserError, match="position='first' is unknown"):
        save_probe(tmp_path / "x.safetensors", torch.randn(D), position="first")
    with pytest.raises(UserError, match="paths is empty"):
        make(tmp_path, [])
    with pytest.raises(UserError, match="several files have the name"):
        make(tmp_path, [good, save_probe(tmp_path / "sub" / "good.safetensors", torch.randn(D), layer=0)])
    with pytest.raises(UserError, match="needs rollouts with rewards"):
        make(tmp_path, [good], algo="sft")
    with pytest.raises(UserError, match="every=0"):
        make(tmp_path, [good], every=0)
    # checked against the model at train begin: hidden size and layer range
    policy, _ = tiny_policy()
    for probe, match in (
        (save_probe(tmp_path / "wide.safetensors", torch.randn(D + 1), layer=1), "hidden size is 16"),
        (save_probe(tmp_path / "deep.safetensors", torch.randn(D), layer=L + 1), "layer 4 is out of range"),
    ):
        inst = make(tmp_path, [probe])
        with pytest.raises(UserError, match=match):
            inst.on_train_begin(fake_trainer(policy))
    inst = make(tmp_path, [save_probe(tmp_path / "top.safetensors", torch.randn(D), layer=L)])
    inst.on_train_begin(fake_trainer(policy))  # layer L (= final) is in range


@pytest.mark.slow
def test_grpo_tiny_run_scores_rollouts_like_an_independent_forward(
    run_recipe, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from transformers import AutoModelForCausalLM

    from rlx.instruments import probes as pr

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    v_mid, v_final = torch.randn(d, generator=g), torch.randn(d, generator=g)
    mid = save_probe(tmp_path / "mid.safetensors", v_mid, bias=0.1, layer=2, position="last", name="mid")
    fin = save_probe(tmp_path / "fin.safetensors", v_final, layer="final", position="mean", name="fin")
    bad = save_probe(tmp_path / "bad.safetensors", v_mid, layer=n_layers + 3, position="last")
    with pytest.raises(
        SystemExit
    ) as exc:  # refused at train begin (a UserError: exit code 2), before any step
        run_recipe(
            "grpo_tiny",
            "trainer.max_steps=1",
            "eval.before_after=false",
            "diagnostics.probes.enabled=true",
            f"diagnostics.probes.paths=[{bad}]",
        )
    out = capsys.readouterr()
    assert exc.value.code == 2 and f"layer {n_layers + 3} is out of range" in out.err
    bad_run = Path(re.search(r"run dir: (\S+)", out.out).group(1))
    no_step = not (bad_run / "metrics.jsonl").exists() or not [
        r for r in read_metrics(bad_run) if "loss" in r
    ]
    assert no_step

    seen = record_step1_batches(monkeypatch, pr.Probes)
    run = run_recipe(
        "grpo_tiny",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=16",
        "trainer.report_to=[]",
        "eval.before_after=false",
        "diagnostics.rollouts.fraction=1.0",
        "diagnostics.probes.enabled=true",
        f"diagnostics.probes.paths=[{mid},{fin}]",
    )
    metrics = {r["step"]: r for r in read_metrics(run) if "step" in r}
    rows = pd.concat(pd.read_parquet(f) for f in sorted(glob.glob(str(run / "diagnostics/probes/*.parquet"))))
    assert sorted(rows["step"].unique()) == [1, 2] and set(rows["probe"]) == {"mid", "fin"}
    for (step, name), grp in rows.groupby(["step", "probe"]):
        assert grp["sample_id"].is_unique
        assert metrics[step][f"probes/{name}/mean"] == pytest.approx(grp["score"].mean(), rel=1e-6)
    roll = pd.concat(pd.read_parquet(f) for f in glob.glob(str(run / "diagnostics/rollouts/*.parquet")))
    joined = rows.merge(roll, on="sample_id", suffixes=("", "_rollout"), validate="many_to_one")
    assert len(joined) == len(rows)
    assert joined["reward"].to_numpy() == pytest.approx(joined["reward_rollout"].to_numpy(), nan_ok=True)
    step1 = rows[rows["step"] == 1].set_index(["probe", "sample_id"])["score"]
    checked = 0
    for b in seen:
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        att = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        for i, sid in enumerate(b["ids"].tolist()):
            want_mid = manual_score(hs, 2, "last", b, i, v_mid, 0.1)
            want_fin = manual_score(hs, n_layers, "mean", b, i, v_final, 0.0)
            assert step1[("mid", sid)] == pytest.approx(want_mid, rel=1e-4, abs=1e-4, nan_ok=True)
            assert step1[("fin", sid)] == pytest.approx(want_fin, rel=1e-4, abs=1e-4, nan_ok=True)
            checked += 1
    assert checked == len(step1) // 2 > 0


def test_analysis_recovers_the_planted_probe(tmp_path):
    from analysis.loader import Run
    from analysis.measures import probes
    from analysis.synthetic import make_run

    run = Run(make_run(tmp_path / "r", "grpo", steps=6, probes=True))
    au = probes.probe_auroc(run).set_index(["probe", "step"])["auroc"]
    assert au.loc["planted"].iloc[-1] > 0.9 and au.loc["planted"].iloc[-1] > au.loc["planted"].iloc[0]
    assert abs(au.loc["noise"].mean() - 0.5) < 0.2
    sc = probes.score_over_steps(run)
    last = sc[(sc["probe"] == "planted") & (sc["step"] == 6)].set_index("bucket")
    assert last.loc["correct", "mean"] - last.loc["wrong", "mean"] > 1.0
    assert last.loc["all", "n"] == last.loc["correct", "n"] + last.loc["wrong", "n"] == 32
