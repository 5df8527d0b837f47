"""The `h_neurons` monitor (rlx/instruments/h_neurons.py) and its math (rlx/algorithms/cett.py): CETT against a
direct computation on a tiny model through the real seam, the 3-vs-1 labels, the L1 solver (optimality conditions,
closed-form threshold, planted sparse signal), set overlap and gradient share by hand, resume, and a grpo_tiny run."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from rlx.algorithms import cett as H
from rlx.config.schema import HNeuronsConfig
from rlx.errors import UserError
from rlx.instruments.base import LossContext, capture_loss_forward, decoder_layers
from rlx.instruments.catalog import registered_instruments
from tests.conftest import read_metrics

# ---- helpers -------------------------------------------------------------------------------------------------


def make_cfg(**kw) -> HNeuronsConfig:
    return OmegaConf.structured(HNeuronsConfig(**{"enabled": True, **kw}))


def make_inst(tmp_path=None, algo="grpo", **kw):
    from rlx.run import RunContext
    from rlx.storage import DiagnosticsWriter

    run = RunContext(
        cfg=SimpleNamespace(algo=algo, seed=0),
        run_dir=tmp_path,
        writer=DiagnosticsWriter(tmp_path) if tmp_path is not None else None,
    )
    return registered_instruments()["h_neurons"](make_cfg(**kw), run)


def fake_trainer(policy, tok, step=0, max_grad_norm=1.0):
    return SimpleNamespace(
        model=policy,
        state=SimpleNamespace(global_step=step),
        args=SimpleNamespace(max_grad_norm=max_grad_norm),
        accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")),
        processing_class=tok,
        rlx_algo="grpo",
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def tiny_policy(bias_layer: int | None = None):
    """The embedded architecture at toy size, float64, with TRL's fused head; optionally one down_proj with a bias."""
    from trl.trainer.utils import add_fused_lm_head

    from rlx.config.schema import EmbeddedModelConfig
    from rlx.embedded import build_model, build_tokenizer

    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    policy = build_model(shape, tok, seed=0).double()
    if bias_layer is not None:
        old = decoder_layers(policy)[bias_layer].mlp.down_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True).double()
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(torch.randn(old.out_features, generator=torch.Generator().manual_seed(3)))
        decoder_layers(policy)[bias_layer].mlp.down_proj = new
    add_fused_lm_head(policy)
    return policy.train(), tok


def batch(tok, prompts: list[str], completions: list[tuple[str, bool]], P: int, C: int) -> dict:
    """Left-padded prompts, right-padded completions (text, ends with EOS) as TRL's GRPO micro-batch holds them."""
    ids = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731 (character-level tokenizer)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    pi, pm, ci, cm = [], [], [], []
    for p, (c, ends) in zip(prompts, completions):
        x = ids(p)
        pi.append([pad] * (P - len(x)) + x)
        pm.append([0] * (P - len(x)) + [1] * len(x))
        y = ids(c) + ([eos] if ends else [])
        ci.append(y + [pad] * (C - len(y)))
        cm.append([1] * len(y) + [0] * (C - len(y)))
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {"prompt_ids": t(pi), "prompt_mask": t(pm), "completion_ids": t(ci), "completion_mask": t(cm)}


def seam_features(inst, policy, tok, inputs, extras=None):
    """Run the loss forward through capture_loss_forward with the instrument's taps; its features and the ctx."""
    trainer = fake_trainer(policy, tok)
    inst._setup(trainer)
    taps = inst.taps(policy)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with capture_loss_forward(policy, hidden=False, taps=taps) as cap:
        policy(input_ids=ids, attention_mask=att, labels=ids, fused_lm_head=True)
    c = inputs["completion_ids"].shape[1]
    ctx = LossContext(
        trainer,
        "grpo",
        inputs,
        cap.token_logps.sum(),
        cap.token_logps,
        cap.label_mask,
        None,
        taps=cap.taps,
        extras={"completion_len": c, **(extras or {})},
    )
    return inst.features(ctx), ctx, trainer


def direct_features(policy, inputs, answer_pos: list[list[int]], other_pos: list[list[int]]):
    """x_ans, x_oth computed independently: z from plain hooks on a separate forward, CETT from W_down's columns,
    ||u|| = ||sum_j W[:, j] z_j + bias||, means over the hand-listed positions."""
    layers = decoder_layers(policy)
    zs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: zs.__setitem__(i, a[0].detach()))
        for i, layer in enumerate(layers)
    ]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        policy(input_ids=ids, attention_mask=att)
    for h in hooks:
        h.remove()
    B = ids.shape[0]
    xa, xo = [], []
    for i, layer in enumerate(layers):
        W = layer.mlp.down_proj.weight.detach().double()
        bias = layer.mlp.down_proj.bias
        bias = torch.zeros(W.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
        m = W.shape[1]
        ra, ro = (
            torch.full((B, m), math.nan, dtype=torch.float64),
            torch.full((B, m), math.nan, dtype=torch.float64),
        )
        for b in range(B):
            for out, positions in ((ra, answer_pos[b]), (ro, other_pos[b])):
                rows = []
                for t in positions:
                    z = zs[i][b, t].double()
                    contrib = W * z[None, :]  # column j is W[:, j] z_j
                    u = contrib.sum(1) + bias
                    rows.append(contrib.norm(dim=0) / (u.norm() + H.CETT_EPS))
                if rows:
                    out[b] = torch.stack(rows).mean(0)
        xa.append(ra)
        xo.append(ro)
    return torch.cat(xa, 1), torch.cat(xo, 1)


# ---- CETT ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_layer", [None, 1])
def test_cett_equals_a_direct_computation_on_a_tiny_model(bias_layer):
    """The acceptance test: per-rollout CETT means from the real seam (taps on every down_proj) equal CETT computed
    independently from W_down's columns and a separate hooked forward (float64), answer tokens = completion minus
    the trailing EOS, other tokens = real prompt tokens + the rest of the completion; padding never enters."""
    policy, tok = tiny_policy(bias_layer)
    inputs = batch(tok, ["12+3=", "7-1=", "99+1="], [("15", True), ("6", True), ("100", False)], P=5, C=4)
    inst = make_inst()
    (xa, xo, n_ans, n_oth), _, _ = seam_features(inst, policy, tok, inputs)
    # positions in cat(prompt (5, left-padded), completion (4)):
    #  row 0: prompt 0-4, completion "15" at 5, 6, EOS at 7 -> answer 5, 6; other 0-4 and 7
    #  row 1: prompt 1-4 (one pad), "6" at 5, EOS at 6 -> answer 5; other 1-4, 6
    #  row 2: prompt 0-4, "100" at 5-7, no EOS (truncated) -> answer 5-7; other 0-4
    answer = [[5, 6], [5], [5, 6, 7]]
    other = [[0, 1, 2, 3, 4, 7], [1, 2, 3, 4, 6], [0, 1, 2, 3, 4]]
    ea, eo = direct_features(policy, inputs, answer, other)
    assert xa.dtype == torch.float64 and xa.shape == (3, 2 * 32)
    torch.testing.assert_close(xa, ea, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xo, eo, rtol=1e-12, atol=1e-14)
    assert n_ans.tolist() == [2, 1, 3] and n_oth.tolist() == [6, 5, 5]


def test_answer_marker_selects_the_tokens_after_its_last_occurrence():
    policy, tok = tiny_policy()
    inputs = batch(tok, ["1+1=", "2+2="], [("a:b:2", True), ("4", True)], P=4, C=6)
    inst = make_inst(answer_marker=":")
    (xa, xo, n_ans, n_oth), _, _ = seam_features(inst, policy, tok, inputs)
    # row 0: completion a : b : 2 EOS at 4..9 -> answer = "2" (9? no: 4 + 4 = 8), other = prompt + "a:b:" + EOS
    ea, eo = direct_features(policy, inputs, [[8], []], [[0, 1, 2, 3, 4, 5, 6, 7, 9], [0, 1, 2, 3, 4, 5]])
    torch.testing.assert_close(xa[0], ea[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xo, eo, rtol=1e-12, atol=1e-14)
    assert torch.isnan(xa[1]).all() and n_ans.tolist() == [1, 0]  # no marker: no answer, left out of fits


def test_marker_answer_start_and_answer_mask_by_hand():
    assert H.marker_answer_start(["x", "##", "##", " 4", "2"], "####") == 3
    assert (
        H.marker_answer_start(["#", "###4", "2"], "####") == 1
    )  # the token straddling the marker's end counts
    assert H.marker_answer_start(["a", "####"], "####") == 2  # nothing after it
    assert H.marker_answer_start(["<answer>", "1", "<answer>", "7"], "<answer>") == 3  # the last occurrence
    assert H.marker_answer_start(["1", "2"], "####") == 2  # absent
    ids = torch.tensor([[5, 6, 2, 0], [5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    got = H.answer_token_mask(ids, mask, eos_token_id=2)
    want = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert got.int().tolist() == want
    got = H.answer_token_mask(ids, mask, 2, answer_start=torch.tensor([1, 0, 2, 0]))
    assert got.int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    a, o = H.token_regions(torch.tensor([[0, 1], [1, 1], [1, 1], [1, 1]]), mask, got)
    assert a.int().tolist()[0] == [0, 0, 0, 1, 0, 0] and o.int().tolist()[0] == [0, 1, 1, 0, 1, 0]


def test_pooled_cett_means_over_regions_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    z, u = (
        torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 2, generator=g, dtype=torch.float64),
    )
    z[1, 3] = math.nan  # a padded position: must not leak into any mean
    cn = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    ans = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    oth = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    xa, xo = H.pooled_cett(z, u, cn, ans, oth)
    c = lambda b, t: z[b, t].abs() * cn / u[b, t].norm()  # noqa: E731 (eps is far below these norms)
    torch.testing.assert_close(xa[0], (c(0, 1) + c(0, 2)) / 2)
    torch.testing.assert_close(xo[0], (c(0, 0) + c(0, 3)) / 2)
    torch.testing.assert_close(xo[1], (c(1, 0) + c(1, 1) + c(1, 2)) / 3)
    assert torch.isnan(xa[1]).all()


# ---- labels ------------------------------------------------------------------------------------------------------


def test_three_vs_one_labels_by_hand():
    """y = 1 only for the answer features of wrong rollouts; right answers and every rollout's other tokens are 0."""
    xa = torch.tensor([[1.0, 2.0], [3.0, 4.0], [math.nan, math.nan], [5.0, 6.0]])
    xo = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    wrong = torch.tensor([True, False, True, True])
    X, y = H.three_vs_one(xa, xo, wrong)
    assert X.tolist() == [[1, 2], [3, 4], [5, 6], [0.1, 0.2], [0.3, 0.4], [0.7, 0.8]] or torch.allclose(
        X, torch.tensor([[1, 2], [3, 4], [5, 6], [0.1, 0.2], [0.3, 0.4], [0.7, 0.8]])
    )
    assert y.tolist() == [1, 0, 1, 0, 0, 0]  # the rollout without answer tokens is dropped entirely


def test_consistent_groups_by_hand():
    wrong = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    gid = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4])
    # group 0 all wrong, 1 all right, 2 mixed, 3 one valid rollout only, 4 a singleton
    assert H.consistent_groups(wrong, valid, gid).int().tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    from rlx.instruments.h_neurons import select_rollouts

    keep, data, note = select_rollouts(wrong, valid, gid, True, 2)
    assert data == "consistent" and keep.int().tolist()[:5] == [1] * 5
    keep, data, note = select_rollouts(wrong, valid, gid, True, 3)  # 2 right under the filter: fall back
    assert data == "all" and keep.tolist() == valid.tolist() and "fitted on every scored rollout" in note
    keep, data, note = select_rollouts(wrong, valid, gid, True, 5)
    assert data == "none" and not keep.any() and "no fit" in note


# ---- the L1 solver ----------------------------------------------------------------------------------------------


def kkt_by_hand(X, y, coef, b, C, weights=None):
    """Largest subgradient violation of min sum_j w_j |theta_j| + C sum_i loss_i, divided by lambda = 1/(C n)."""
    n = X.shape[0]
    lam = 1 / (C * n)
    w = torch.ones(X.shape[1], dtype=torch.float64) if weights is None else weights
    p = 1 / (1 + torch.exp(-(X @ coef + b)))
    g = X.T @ (p - y) / n  # gradient of the mean loss
    worst = abs(float((p - y).mean()))
    for j in range(X.shape[1]):
        if coef[j] != 0:
            worst = max(worst, abs(float(g[j] + lam * w[j] * torch.sign(coef[j]))))
        else:
            worst = max(worst, float(g[j].abs() - lam * w[j]))
    return worst / lam


def objective(X, y, coef, b, C, weights=None):
    w = torch.ones(X.shape[1], dtype=torch.float64) if weights is None else weights
    z = X @ coef + b
    return float((w * coef.abs()).sum() + C * (torch.log1p(torch.exp(z)) - y * z).sum())


def planted(n=1500, p=120, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    X = 0.1 + scale * torch.randn(n, p, generator=g, dtype=torch.float64)
    theta = torch.zeros(p, dtype=torch.float64)
    theta[[3, 17, 40, 77, 101]] = torch.tensor([60.0, 50.0, 70.0, 55.0, 65.0], dtype=torch.float64)
    theta[[9, 58]] = torch.tensor([-60.0, -50.0], dtype=torch.float64)
    z = (X - X.mean(0)) @ theta
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(z)).double()
    return X, y, theta


@pytest.mark.parametrize("standardize", [False, True])
def test_l1_solution_meets_the_optimality_conditions(standardize):
    X, y, _ = planted(n=400, p=120, seed=1)
    for C in (0.3, 3.0, 30.0):
        fit = H.l1_logistic_regression(X, y, C, standardize=standardize, tol=1e-7, max_iter=100000)
        weights = X.std(0, unbiased=False) if standardize else None
        assert fit.converged and kkt_by_hand(X, y, fit.coef, fit.intercept, C, weights) < 1e-6
        assert fit.objective == pytest.approx(objective(X, y, fit.coef, fit.intercept, C, weights), rel=1e-7)
        # no nearby point is better (convexity: the conditions make it the minimum)
        g = torch.Generator().manual_seed(2)
        base = objective(X, y, fit.coef, fit.intercept, C, weights)
        for _ in range(20):
            d = 1e-3 * torch.randn(X.shape[1], generator=g, dtype=torch.float64)
            assert objective(X, y, fit.coef + d, fit.intercept, C, weights) >= base - 1e-9
        assert objective(X, y, fit.coef, fit.intercept + 1e-3, C, weights) >= base - 1e-9


def test_l1_threshold_follows_scikit_learns_C_convention():
    """All weights are zero exactly when lambda = 1/(C n) >= max_j |x_j . (y - ybar)| / n, i.e. C <= C0 =
    1 / max_j |Xc^T (y - ybar)|: a closed form for the scaling of C (and for the unpenalised intercept)."""
    X, y, _ = planted(n=300, p=120, seed=3)
    Xc = X - X.mean(0)
    c0 = 1.0 / float((Xc.T @ (y - y.mean())).abs().max())
    below = H.l1_logistic_regression(X, y, 0.99 * c0)
    above = H.l1_logistic_regression(X, y, 1.05 * c0)
    assert (below.coef == 0).all() and (above.coef != 0).sum() >= 1
    assert below.intercept == pytest.approx(math.log(y.mean() / (1 - y.mean())), rel=1e-9)


def test_l1_recovers_a_planted_sparse_signal():
    X, y, theta = planted()
    fit = H.l1_logistic_regression(X, y, C=0.3)
    assert set((fit.coef != 0).nonzero().flatten().tolist()) == set(theta.nonzero().flatten().tolist())
    assert H.selected_set(fit.coef).tolist() == [3, 17, 40, 77, 101]  # the positive ones, sorted
    assert float(torch.corrcoef(torch.stack([fit.coef, theta]))[0, 1]) > 0.95


def test_top_variance_keeps_the_most_varying_columns():
    X = torch.tensor([[0.0, 1.0, 5.0, 2.0], [0.0, 3.0, 5.0, 2.5], [0.0, 5.0, 5.0, 1.0]])
    assert H.top_variance(X, 2).tolist() == [1, 3] and H.top_variance(X, 0).tolist() == [0, 1, 2, 3]


# ---- sets and gradient share ------------------------------------------------------------------------------------


def test_set_overlap_and_chance_by_hand():
    ov = H.set_overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5]), universe=100)
    e = 4 * 3 / 100
    assert (
        ov["intersection"] == 2
        and ov["jaccard"] == pytest.approx(2 / 5)
        and ov["overlap"] == pytest.approx(2 / 3)
    )
    assert ov["intersection_chance"] == pytest.approx(e)
    assert ov["jaccard_chance"] == pytest.approx(e / (4 + 3 - e)) and ov["overlap_chance"] == pytest.approx(
        e / 3
    )
    empty = H.set_overlap(torch.tensor([], dtype=torch.long), torch.tensor([1]), 10)
    assert empty["jaccard"] == 0 and math.isnan(empty["overlap"])
    assert math.isnan(
        H.set_overlap(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 10)["jaccard"]
    )


def test_gradient_share_on_a_hand_built_gradient():
    # one MLP, d = 2, m = 3: columns of dL/dW_down, rows of dL/dW_up / dL/dW_gate
    down = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # column energies 1, 9, 4
    up = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 2.0]])  # row energies 2, 0, 4
    gate = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # 0, 1, 0
    d, m = H.neuron_gradient_energy(down, up, gate)
    assert d.tolist() == [1, 9, 4] and m.tolist() == [3, 10, 8]
    # a second layer with no up/gate gradient; H = {layer 0 neuron 1, layer 1 neuron 0}, flat indices 1 and 3
    d2, m2 = H.neuron_gradient_energy(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    down_all, mlp_all = torch.cat([d, d2]), torch.cat([m, m2])
    h = torch.tensor([1, 3])
    assert H.set_share(down_all, h) == pytest.approx((9 + 4) / (14 + 5))
    assert H.set_share(mlp_all, h) == pytest.approx((10 + 4) / (21 + 5))
    assert math.isnan(H.set_share(torch.zeros(4), h))


def test_gradient_energy_reads_the_models_unclipped_grads():
    policy, tok = tiny_policy()
    inputs = batch(tok, ["1+2="], [("3", True)], P=4, C=2)
    inst = make_inst()
    (_, _, _, _), ctx, trainer = seam_features(inst, policy, tok, inputs)
    ctx.token_logps.sum().backward()
    step, down, mlp = inst._gradient_energy(trainer, 1)
    exp_d, exp_m = [], []
    for layer in decoder_layers(policy):
        gd = layer.mlp.down_proj.weight.grad
        gu, gg = layer.mlp.up_proj.weight.grad, layer.mlp.gate_proj.weight.grad
        exp_d.append(torch.stack([gd[:, j].pow(2).sum() for j in range(gd.shape[1])]))
        exp_m.append(exp_d[-1] + gu.pow(2).sum(1) + gg.pow(2).sum(1))
    torch.testing.assert_close(down, torch.cat(exp_d))
    torch.testing.assert_close(mlp, torch.cat(exp_m))
    for p in policy.parameters():
        p.grad = None
    assert (
        inst._gradient_energy(trainer, 1) is None and "no_grad" in inst.warned
    )  # frozen MLP: NaN, warned once


def test_layer_matched_random_sets():
    idx = torch.tensor([0, 1, 7, 10])  # width 4: layer 0 {0, 1}, layer 1 {7}, layer 2 {10}
    sets = H.layer_matched_random_sets(idx, 3, 4, 5, torch.Generator().manual_seed(0))
    again = H.layer_matched_random_sets(idx, 3, 4, 5, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(sets, again))
    for s in sets:
        assert (s // 4).bincount(minlength=3).tolist() == [2, 1, 1]
        assert not set(s.tolist()) & set(idx.tolist())


def test_activation_matched_sets_pick_close_neurons_of_the_same_layer():
    width = 6
    activity = torch.tensor([0.1, 0.5, 0.52, 0.9, 0.11, 0.3, 1.0, 2.0, 3.0, 2.1, 0.0, 5.0])
    # layer 0: 0.5 -> nearest outside {1}: 0.52 (2), then 0.3 (5); layer 1: 2.0 -> 2.1 (9), then 1.0 (6; 3.0 ties
    # with it, the first in index order wins)
    idx = torch.tensor([1, 7])
    sets = H.activation_matched_sets(idx, activity, width, 4, torch.Generator().manual_seed(0), pool=1)
    assert all(s.tolist() == [2, 9] for s in sets)
    sets = H.activation_matched_sets(idx, activity, width, 20, torch.Generator().manual_seed(0), pool=2)
    assert {tuple(s.tolist()) for s in sets} == {(2, 9), (5, 9), (2, 6), (5, 6)}


def test_split_groups_deals_whole_groups_balanced_by_label():
    from rlx.instruments.h_neurons import split_groups

    gid = torch.arange(10).repeat_interleave(3)
    wrong = (gid % 3 == 0) & (gid < 9)  # groups 0, 3, 6 wrong: 3 wrong groups, 7 right ones
    keep = gid != 9  # group 9 is not kept
    a, b = split_groups(keep, wrong, gid, torch.Generator().manual_seed(4))
    assert not (a & b).any() and ((a | b) == keep).all()
    for g in range(10):
        assert len(set(a[gid == g].tolist())) == 1 and len(set(b[gid == g].tolist())) == 1  # whole groups
    wa, wb = len(torch.unique(gid[a & wrong])), len(torch.unique(gid[b & wrong]))
    ra, rb = len(torch.unique(gid[a & ~wrong])), len(torch.unique(gid[b & ~wrong]))
    assert abs(wa - wb) <= 1 and abs(ra - rb) <= 1 and wa + wb == 3 and ra + rb == 6


# ---- the instrument ---------------------------------------------------------------------------------------------


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="needs rollouts with rewards"):
        make_inst(algo="dpo")
    with pytest.raises(UserError, match="C=0"):
        make_inst(C=0.0)
    with pytest.raises(UserError, match="min_per_class"):
        make_inst(min_per_class=1)
    with pytest.raises(UserError, match="refit_every"):
        make_inst(refit_every=-1)


def synthetic_step(inst, trainer, step, n_groups=8, G=4, seed=0):
    """Feed one measured step to the instrument without a model: features with a planted neuron set (flat indices
    5 and 9 are high on the answer tokens of wrong rollouts), rewards, groups; then on_step_end."""
    g = torch.Generator().manual_seed(seed + step)
    n = n_groups * G
    wrong_groups = torch.arange(n_groups) % 2 == 0
    wrong = wrong_groups.repeat_interleave(G)
    reward = (~wrong).double()
    x_ans = 0.05 + 0.01 * torch.rand(n, inst.num_neurons, generator=g)
    x_oth = 0.05 + 0.01 * torch.rand(n, inst.num_neurons, generator=g)
    x_ans[wrong, 5] += 0.05
    x_ans[wrong, 9] += 0.05
    ids = torch.arange(n) + 1000 * step
    inst._step = step
    from rlx.algorithms.probing import StepRows

    inst._rows = StepRows()
    trainer.state.global_step = step - 1
    cols = {
        "group_id": torch.arange(n_groups).repeat_interleave(G),
        "reward": reward,
        "n_answer": torch.full((n,), 2),
        "n_other": torch.full((n,), 5),
    }
    if inst._fit_step(step):
        inst._feats = [(ids, x_ans, x_oth)]
        inst._rows.add(ids, **cols)
    else:
        inst._rows.add(ids, **cols, **inst.set_columns(x_ans, x_oth))
    trainer.state.global_step = step
    inst.on_step_end(trainer)
    return x_ans, wrong


def fake_layers(inst, L=2, m=8):
    inst._layers, inst._width = [None] * L, m


def test_step_one_fit_metrics_dumps_and_resume(tmp_path):
    inst = make_inst(tmp_path, C=50.0, min_per_class=4, refit_every=2, every=1, num_random=3)
    fake_layers(inst)
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=0),
        accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")),
        _metrics={"train": defaultdict(list)},
        model=SimpleNamespace(training=True),
    )
    down = torch.arange(1.0, 17.0, dtype=torch.float64)  # per-neuron energies, as on_before_clip leaves them
    mlp = down.flip(0).clone()
    inst._grad = (1, down, mlp)
    x_ans, wrong = synthetic_step(inst, trainer, 1)
    assert set(inst.probe0.neurons.tolist()) == {5, 9}  # the planted set
    assert [len(c) for c in inst.controls] == [2, 2, 2] and all(
        not set(c.tolist()) & {5, 9} for c in inst.controls
    )
    assert all(
        len(c) == 2 and (c // 8).tolist() == [0, 1] and not set(c.tolist()) & {5, 9} for c in inst.matched
    )
    m = inst.last_metrics
    mass = x_ans[:, [5, 9]].double().sum(1)
    assert m["mass_wrong"] == pytest.approx(float(mass[wrong].mean()))
    assert m["mass_correct"] == pytest.approx(float(mass[~wrong].mean()))
    assert m["auroc"] == 1.0 and m["set_size"] == 2 and m["grad_share_chance"] == pytest.approx(2 / 16)
    assert m["grad_share_down"] == pytest.approx((6 + 10) / 136)
    assert m["grad_share_mlp"] == pytest.approx((11 + 7) / 136)
    by_hand = [float(down[c].sum() / 136) for c in inst.controls]
    assert m["grad_share_down_random"] == pytest.approx(sum(by_hand) / 3)
    by_hand = [float(mlp[c].sum() / 136) for c in inst.matched]
    assert m["grad_share_mlp_matched"] == pytest.approx(sum(by_hand) / 3)
    logged = trainer._metrics["train"]
    assert logged["h_neurons/set_size"] == [2.0] and logged["h_neurons/grad_share_down"] == [
        m["grad_share_down"]
    ]
    d = tmp_path / "diagnostics" / "h_neurons"
    fits = pd.read_parquet(d / "fits_step000001.parquet")
    assert list(fits["fit"]) == ["full", "half_a", "half_b"] and fits["data"].iloc[0] == "consistent"
    assert fits["converged"].all() and fits["set_size"].iloc[0] == 2
    sets = pd.read_parquet(d / "set_step000001.parquet")
    full = sets[(sets["fit"] == "full") & sets["in_set"]]
    assert sorted(zip(full["layer"], full["neuron"])) == [
        (0, 5),
        (1, 1),
    ]  # flat 9 = layer 1, neuron 1 (m = 8)
    per = pd.read_parquet(d / "rollouts_step000001.parquet")
    assert per["used_in_fit"].all() and per["mass"].to_numpy() == pytest.approx(mass.numpy())
    steps = pd.read_parquet(d / "steps_step000001.parquet").set_index("bucket")
    assert (
        steps.loc["wrong", "mass"] == pytest.approx(m["mass_wrong"])
        and steps.loc["wrong", "n_rollouts"] == 16
    )

    # resume: a new instrument with the saved state continues exactly (the refit at step 2 compares with H0)
    state = inst.state_dict()
    buf = tmp_path / "state.pt"
    torch.save(state, buf)
    again = make_inst(tmp_path, C=50.0, min_per_class=4, refit_every=2, every=1, num_random=3)
    fake_layers(again)
    again.load_state_dict(torch.load(buf, weights_only=False))
    assert not again._fit_step(1) and again._fit_step(2)
    for a in (inst, again):
        synthetic_step(a, trainer, 2)
    assert inst.last_metrics == pytest.approx(again.last_metrics, nan_ok=True)
    assert math.isnan(inst.last_metrics["grad_share_down"])  # no gradient recorded at step 2: NaN, not logged
    assert len(trainer._metrics["train"]["h_neurons/grad_share_down"]) == 1
    assert inst.last_metrics["jaccard"] == 1.0 and inst.last_metrics["jaccard_chance"] == pytest.approx(
        (4 / 16) / (4 - 4 / 16)
    )
    synthetic_step(inst, trainer, 3)  # not a refit step: no fit, the frozen set's values
    assert "jaccard" not in inst.last_metrics and inst.last_metrics["set_size"] == 2


def test_no_h0_when_too_few_rollouts(tmp_path, capsys):
    inst = make_inst(tmp_path, min_per_class=100)
    fake_layers(inst)
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=0),
        accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")),
        _metrics={"train": defaultdict(list)},
        model=SimpleNamespace(training=True),
    )
    synthetic_step(inst, trainer, 1)
    assert inst.probe0 is None and inst.h0_attempted and not inst._fit_step(1)
    assert "no H0 at step 1" in capsys.readouterr().out
    assert math.isnan(inst.last_metrics["mass_wrong"])
    fits = pd.read_parquet(tmp_path / "diagnostics" / "h_neurons" / "fits_step000001.parquet")
    assert fits["data"].tolist() == ["none"] and "no fit" in fits["note"].iloc[0]


# ---- a real run ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_tiny_run_logs_and_dumps(run_recipe):
    run = run_recipe(
        "grpo_tiny",
        "trainer.max_steps=4",
        "trainer.per_device_train_batch_size=64",
        "eval.num_prompts=16",
        "eval.before_after=false",
        "diagnostics.h_neurons.enabled=true",
        "diagnostics.h_neurons.every=1",
        "diagnostics.h_neurons.refit_every=3",
        "diagnostics.h_neurons.consistent_only=false",
        "diagnostics.h_neurons.min_per_class=4",
        "diagnostics.h_neurons.C=30",
    )
    rows = read_metrics(run)
    d = Path(run) / "diagnostics" / "h_neurons"
    fits1 = pd.read_parquet(d / "fits_step000001.parquet").set_index("fit")
    size = int(fits1.loc["full", "set_size"])
    assert size > 0 and fits1.loc["full", "data"] == "all" and bool(fits1.loc["full", "converged"])
    sets1 = pd.read_parquet(d / "set_step000001.parquet")
    h0 = sets1[(sets1["fit"] == "full") & sets1["in_set"]]
    assert len(h0) == size
    for r in rows:  # every step measured; the set and its chance level are the same at each
        assert r["h_neurons/set_size"] == size
        assert r["h_neurons/grad_share_chance"] == pytest.approx(size / (4 * 512))
        per = pd.read_parquet(d / f"rollouts_step{r['step']:06d}.parquet")
        assert len(per) == 64 and per["n_answer_tokens"].min() >= 1
        wrong = per["wrong"].to_numpy()
        assert r["h_neurons/mass_wrong"] == pytest.approx(per["mass"][wrong].mean())
        from analysis.measures._util import auroc as np_auroc

        assert r["h_neurons/auroc"] == pytest.approx(np_auroc(per["score"], wrong))
        if "grad_share_down" in r:
            assert 0 < r["h_neurons/grad_share_down"] < 1 and r["h_neurons/grad_share_mlp"] > 0
    assert sum("h_neurons/grad_share_down" in r for r in rows) >= 1  # a step with a non-zero gradient
    # the step-1 probe's score: theta . x_ans + b is what the rollout dump holds (weights from the set file)
    assert fits1.loc["full", "train_auroc"] == pytest.approx(
        np_auroc(
            *(lambda p: (p["score"][p["used_in_fit"]], p["wrong"][p["used_in_fit"]]))(
                pd.read_parquet(d / "rollouts_step000001.parquet")
            )
        )
    )
    # the refit at step 3: its Jaccard with H0, recomputed from the two set files
    r3 = next(r for r in rows if r["step"] == 3)
    sets3 = pd.read_parquet(d / "set_step000003.parquet")
    h3 = sets3[(sets3["fit"] == "full") & sets3["in_set"]]
    a = set(zip(h0["layer"], h0["neuron"]))
    b = set(zip(h3["layer"], h3["neuron"]))
    assert r3["h_neurons/fit_size"] == len(b)
    if a | b:
        assert r3["h_neurons/jaccard"] == pytest.approx(len(a & b) / len(a | b))
    e = len(a) * len(b) / 2048
    assert r3["h_neurons/jaccard_chance"] == pytest.approx(e / (len(a) + len(b) - e))
    from rlx.storage import read_manifest

    names = {f["name"] for f in read_manifest(run)["files"] if f["instrument"] == "h_neurons"}
    assert names == {"h_neurons_steps", "h_neurons_rollouts", "h_neurons_fits", "h_neurons_set"}


@pytest.mark.slow
def test_resume_equals_straight(tmp_path, tiny_model_dir):
    """Killed after step 4's log and resumed from checkpoint-3: the refit at step 4 compares with the H0 restored
    from the checkpoint (probe, control sets, halves), so every metric and dump equals the straight run's."""
    from tests.test_resume import assert_same_diagnostics, assert_same_metrics, killed_and_resumed, train

    args = [
        "recipe=grpo_tiny",
        "diagnostics.h_neurons.enabled=true",
        "diagnostics.h_neurons.every=2",
        "diagnostics.h_neurons.refit_every=4",
        "diagnostics.h_neurons.consistent_only=false",
        "diagnostics.h_neurons.min_per_class=4",
        "trainer.per_device_train_batch_size=32",
        "trainer.max_steps=6",
        "trainer.save_steps=3",
        "eval.before_after=false",
        "trainer.report_to=[]",
    ]
    straight = tmp_path / "straight"
    p = train(straight, args)
    assert p.returncode == 0, p.stderr[-4000:]
    run = killed_and_resumed(tmp_path, args, ["after_log:4"])
    assert_same_metrics(straight, run)
    assert_same_diagnostics(straight, run)
    rows = {r["step"]: r for r in read_metrics(run)}
    assert "h_neurons/jaccard_chance" in rows[4] and "h_neurons/set_size" in rows[6]
