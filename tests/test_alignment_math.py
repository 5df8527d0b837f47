"""Gradient alignment math on a tiny random Qwen2 (fp32 identities; float64 / closed-form references)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2ForCausalLM

from rlx.alignment.functional import (
    component_weights,
    cosine,
    dot,
    head_grad_from_activations,
    kl_token_weights,
    layer_groups,
    reweighting_units,
    run_summary,
    sq_norm,
    tertile_weights,
    weighted_grad,
)
from rlx.alignment.sketch import CountSketch, sketch_cosine
from rlx.alignment.target import batch_from_ids, target_gradient, target_head_gradient, target_nll
from tests._alignment_harness import V  # noqa: E402
from tests._alignment_harness import tiny_model as _tiny_model


def tiny_model(dtype=torch.float32, seed=0, tie=False) -> Qwen2ForCausalLM:
    return _tiny_model(seed=seed, dtype=dtype, tie=tie)


def token_logps(model, ids):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def grpo_like(model, ids, mask, adv, ref, beta):
    """GRPO 'grpo' loss on-policy with a k3 KL term: mean_i mean_t (-A_i + beta k3_t)."""
    lp = token_logps(model, ids)
    ratio = torch.exp(lp - lp.detach())
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_tok = -ratio * adv[:, None] + beta * kl
    loss = ((per_tok * mask).sum(-1) / mask.sum(-1)).mean()
    return loss, lp


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (6, 10), generator=g)
    mask = torch.zeros(6, 9)
    for i, L in enumerate([9, 7, 5, 9, 8, 6]):
        mask[i, 2:L] = 1
    target = batch_from_ids([[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12]], 0, "t")
    params = [p for p in model.parameters() if p.requires_grad]
    gT, R = target_gradient(model, target, params)
    return model, ids, mask, target, params, gT, R


def test_grpo_components_and_tertiles_sum_to_optimizer_gradient(setup):
    model, ids, mask, _, params, gT, _ = setup
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, 0.3])
    with torch.no_grad():
        ref = token_logps(model, ids) + 0.1 * torch.randn(6, 9, generator=torch.Generator().manual_seed(2))
    beta = 0.04
    model.zero_grad()
    loss, lp = grpo_like(model, ids, mask, adv, ref, beta)
    (w,) = torch.autograd.grad(loss, lp, retain_graph=True)
    w_kl = kl_token_weights(w, mask, lp.detach(), ref, adv, beta)
    # closed form: c_i = 1/(n_i B), w_kl = c_i beta (1 - exp(ref - lp))
    c = 1.0 / (mask.sum(-1) * 6)
    expected = c[:, None] * beta * (1 - torch.exp(ref - lp.detach())) * mask
    assert torch.allclose(w_kl, expected, rtol=1e-5, atol=1e-9)
    comps = component_weights(w, mask, w_kl)
    assert torch.allclose(sum(comps.values()), w * mask, atol=1e-9)
    G = {k: dot(gT, weighted_grad(lp, params, cw)).item() for k, cw in comps.items()}
    tert = tertile_weights(comps["pos"] + comps["neg"], reweighting_units("sequence", mask))
    G_t = {k: dot(gT, weighted_grad(lp, params, tw)).item() for k, tw in tert.items()}
    v = [torch.randn_like(p) for p in params]
    d_v = dot(v, weighted_grad(lp, params, w * mask)).item()
    loss.backward()
    grad = [p.grad.clone() for p in params]
    G_total = dot(gT, grad).item()
    assert rel(G["pos"] + G["neg"] + G["kl"], G_total) < 1e-5
    assert rel(G_t["top"] + G_t["mid"] + G_t["bot"] + G["kl"], G_total) < 1e-5
    assert rel(d_v, dot(v, grad).item()) < 1e-5  # sum_t w_t grad l_t == optimizer gradient
    # positive learning = positive advantage sequences
    pos_rows = (comps["pos"] != 0).any(-1)
    assert pos_rows.tolist() == [True, False, False, True, False, True]
    # zero-advantage sequence lands in the bottom tertile
    assert (tert["top"][2] == 0).all() and (tert["mid"][2] == 0).all() and (tert["top"][3] != 0).any()


def test_dpo_pair_tertiles_and_signs(setup):
    model, ids, mask, _, params, gT, _ = setup
    beta, P = 0.1, 3
    model.zero_grad()
    lp = token_logps(model, ids)
    with torch.no_grad():
        ref = lp.detach() - 0.05
    h = ((lp - ref) * mask).sum(-1)
    margin = h[:P] - h[P:]
    loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
    (w,) = torch.autograd.grad(loss, lp, retain_graph=True)
    omega = torch.sigmoid(-beta * margin.detach())
    # chosen rows: w = -(beta/P) omega_i on every scored token; rejected: +(beta/P) omega_i
    assert torch.allclose(w[:P], (-(beta / P) * omega[:, None]) * mask[:P], atol=1e-8)
    comps = component_weights(w, mask)
    assert (comps["pos"][:P] == w[:P] * mask[:P]).all() and (comps["pos"][P:] == 0).all()
    pair = torch.cat([torch.arange(P), torch.arange(P)])
    tert = tertile_weights(w * mask, reweighting_units("pair", mask, pair))
    top_pair = int(torch.argmax(omega))
    assert (tert["top"][top_pair] != 0).any() and (tert["top"][top_pair + P] != 0).any()
    G = {k: dot(gT, weighted_grad(lp, params, x)).item() for k, x in {**comps, **tert}.items()}
    loss.backward()
    G_total = dot(gT, [p.grad for p in params]).item()
    assert rel(G["pos"] + G["neg"], G_total) < 1e-5
    assert rel(G["top"] + G["mid"] + G["bot"], G_total) < 1e-5


def test_tertiles_hand_example():
    w = torch.tensor([[0.3, 0.1, -0.2, 0.0], [0.5, -0.4, 0.05, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]])
    t = tertile_weights(w, reweighting_units("token", mask))
    # |w| ranks: .5,.4 top | .3,.2 mid | .1,.05 bot
    assert t["top"].nonzero().tolist() == [[1, 0], [1, 1]]
    assert t["mid"].nonzero().tolist() == [[0, 0], [0, 2]]
    assert t["bot"].nonzero().tolist() == [[0, 1], [1, 2]]
    assert torch.equal(t["top"] + t["mid"] + t["bot"], w * mask)


def test_kl_weights_float64_with_clipping():
    g = torch.Generator().manual_seed(3)
    B, C = 4, 5
    lp = (torch.randn(B, C, generator=g, dtype=torch.float64) - 2).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.2 * torch.randn(B, C, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, C, dtype=torch.float64)
    mask[0, -2:] = 0
    beta, eps = 0.05, 0.2
    ratio = torch.exp(lp - old)
    surr = -torch.min(ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None])
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    loss = ((surr + beta * kl) * mask).sum() / mask.sum() / 2.0  # bnpo-like, GA=2
    (w,) = torch.autograd.grad(loss, lp)
    w_kl = kl_token_weights(w, mask, lp.detach(), ref, adv, beta, old_logps=old, eps_low=eps, eps_high=eps)
    expected = beta * (1 - torch.exp(ref - lp.detach())) * mask / mask.sum() / 2.0
    assert torch.allclose(w_kl.double(), expected, rtol=1e-5, atol=1e-12)


def _trl_like_w(bias_correction: bool, is_weights: bool = False):
    """w = dL/dl of TRL 1.16's clipped loss with k3 KL (x rho with bias correction), float64, off-policy rows."""
    g = torch.Generator().manual_seed(4)
    B, C = 4, 6
    lp = (torch.randn(B, C, generator=g, dtype=torch.float64) - 2).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, C, dtype=torch.float64)
    mask[1, -3:] = 0
    beta, eps = 0.05, 0.2
    ratio = torch.exp(lp - old)
    surr = -torch.min(ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None])
    if is_weights:  # vLLM's importance-sampling correction: a fixed per-token factor on the surrogate only
        surr = surr * (1.0 + 0.5 * torch.rand(B, C, generator=g, dtype=torch.float64))
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    if bias_correction:
        kl = kl * ratio
    loss = ((surr + beta * kl) * mask).sum() / mask.sum()  # dapo/bnpo-like
    (w,) = torch.autograd.grad(loss, lp)
    return w, mask, lp.detach(), ref, adv, beta, old, eps


def test_kl_weights_with_trl_bias_correction():
    """TRL's default use_bias_correction_kl: K_t = rho_t k3_t, so dK/dl = rho (q + k3); the residual says which."""
    from rlx.instruments.grad_alignment import KL_FIT_TOLERANCE

    w, mask, lp, ref, adv, beta, old, eps = _trl_like_w(bias_correction=True)
    kw = dict(old_logps=old, eps_low=eps, eps_high=eps, return_residual=True)
    w_kl, res = kl_token_weights(w, mask, lp, ref, adv, beta, bias_correction=True, **kw)
    rho, k3 = torch.exp(lp - old), torch.exp(ref - lp) - (ref - lp) - 1
    expected = beta * rho * (1 - torch.exp(ref - lp) + k3) * mask / mask.sum()
    assert torch.allclose(w_kl.double(), expected, rtol=1e-5, atol=1e-12)
    assert res < 1e-6
    # modelled without the correction, the same loss leaves a residual far above round-off
    _, res_plain = kl_token_weights(w, mask, lp, ref, adv, beta, bias_correction=False, **kw)
    assert res_plain > max(KL_FIT_TOLERANCE, 1000 * res)
    # and a surrogate reweighted per token (vLLM IS correction) is not of the modelled form either way
    w2, *_ = _trl_like_w(bias_correction=True, is_weights=True)
    _, res_is = kl_token_weights(w2, mask, lp, ref, adv, beta, bias_correction=True, **kw)
    assert res_is > max(KL_FIT_TOLERANCE, 1000 * res)


def test_unmodelled_kl_terms_names_trl_settings():
    from trl import GRPOConfig

    from rlx.instruments.grad_alignment import unmodelled_kl_terms

    base = dict(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[])
    assert unmodelled_kl_terms(GRPOConfig(**base)) == []
    assert unmodelled_kl_terms(GRPOConfig(**base, loss_type="grpo")) == []
    odd = GRPOConfig(**base, loss_type="cispo", top_entropy_quantile=0.2, off_policy_mask_threshold=0.5)
    assert unmodelled_kl_terms(odd) == [
        "loss_type=cispo",
        "top_entropy_quantile=0.2",
        "off_policy_mask_threshold=0.5",
    ]
    # every setting it reads is a GRPOConfig field of this TRL (a rename would silently disable a check)
    for name in (
        "loss_type",
        "importance_sampling_level",
        "delta",
        "use_vllm",
        "vllm_importance_sampling_correction",
        "top_entropy_quantile",
        "off_policy_mask_threshold",
        "use_bias_correction_kl",
    ):
        assert name in GRPOConfig.__dataclass_fields__, name
    ns = SimpleNamespace(
        use_vllm=True, vllm_importance_sampling_correction=True, importance_sampling_level="sequence"
    )
    assert unmodelled_kl_terms(ns) == [
        "importance_sampling_level=sequence",
        "vLLM importance-sampling correction",
    ]


def test_target_gradient_is_isolated_and_exact(setup):
    model, _, _, target, params, gT, R = setup
    model.train()
    model.zero_grad(set_to_none=True)
    rng = torch.get_rng_state()
    g2, R2 = target_gradient(model, target, params, chunk=1)
    assert model.training and all(p.grad is None for p in params)
    assert torch.equal(rng, torch.get_rng_state())
    assert rel(R2, R) < 1e-6 and rel(dot(g2, gT).item(), sq_norm(gT).item()) < 1e-5
    # float64 reference of the NLL and of a directional derivative (central difference)
    m64 = tiny_model(torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    R64 = target_nll(m64, target)
    assert rel(R, R64) < 1e-5
    u = [g / math.sqrt(sq_norm(gT).item()) for g in gT]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(m64.parameters(), u):
            p.add_(eps * d.double())
        Rp = target_nll(m64, target)
        for p, d in zip(m64.parameters(), u):
            p.sub_(2 * eps * d.double())
        Rm = target_nll(m64, target)
    assert rel((Rp - Rm) / (2 * eps), math.sqrt(sq_norm(gT).item())) < 1e-4


def test_head_activation_variant_matches_parameter_head_gradient(setup):
    model, ids, mask, target, params, gT, _ = setup
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head_i = names.index("lm_head.weight")
    cap = {}
    hnd = model.model.register_forward_hook(lambda m, a, o: cap.__setitem__("h", o.last_hidden_state))
    lp = token_logps(model, ids)
    hnd.remove()
    coef = torch.randn(6, 9, generator=torch.Generator().manual_seed(4)) * mask
    g_param = weighted_grad(lp, params, coef)[head_i]
    sel = mask > 0
    g_act = head_grad_from_activations(
        cap["h"][:, :-1][sel], model.lm_head.weight, ids[:, 1:][sel], coef[sel]
    )
    assert torch.allclose(g_act, g_param, rtol=1e-4, atol=1e-6)
    gT_head, _ = target_head_gradient(model, model.model, target)
    assert torch.allclose(gT_head, gT[head_i], rtol=1e-4, atol=1e-6)


def test_layer_groups_qwen2_names():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    g = layer_groups(names, num_layers=4, k=2)
    assert set(g) == {"all", "embed", "blocks_0-1", "blocks_2-3", "head"}
    assert sorted(sum((g[k] for k in g if k != "all"), [])) == g["all"]
    assert [names[i] for i in g["embed"]] == ["model.embed_tokens.weight"]
    assert {names[i] for i in g["head"]} == {"model.norm.weight", "lm_head.weight"}
    assert all(".layers.2." in names[i] or ".layers.3." in names[i] for i in g["blocks_2-3"])
    lora = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert layer_groups(lora, 4, 2)["blocks_0-1"] == [0]


def test_run_summary_hand_computed():
    s = run_summary([1.0, 2.0, 3.0, 2.0])
    assert s["frac_positive"] == 1.0 and s["sign_flip_rate"] == 0.0
    assert math.isclose(s["cv"], math.sqrt(0.5) / 2.0) and s["regime"] == "supervised-like"
    s = run_summary([1.0, -1.0, 1.0, -1.0, 1.0])
    assert s["frac_positive"] == 0.6 and s["sign_flip_rate"] == 1.0 and s["regime"] == "RL-like"
    s = run_summary([1.0] * 9 + [-100.0])  # 90% positive but CV > 1
    assert s["frac_positive"] == 0.9 and s["cv"] > 1 and s["regime"] == "RL-like"
    assert run_summary([float("nan"), 1.0])["n_nonfinite"] == 1
    assert math.isclose(cosine(1.0, 4.0, 1.0), 0.5)


def test_countsketch_linear_deterministic_and_accurate():
    shapes = [torch.Size([300, 20]), torch.Size([50])]
    sk = CountSketch(shapes, dim=4096, seed=7)
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(s, generator=g) for s in shapes]
    b = [0.6 * x + 0.8 * torch.randn(x.shape, generator=g) for x in a]
    sa, sb = sk(a), sk(b)
    assert torch.allclose(sk([x + y for x, y in zip(a, b)]), sa + sb, atol=1e-4)
    assert torch.equal(CountSketch(shapes, dim=4096, seed=7)(a), sa)
    exact = cosine(dot(a, b).item(), sq_norm(a).item(), sq_norm(b).item())
    assert abs(sketch_cosine(sa, sb) - exact) < 0.05
    assert abs(sa.norm().item() ** 2 / sq_norm(a).item() - 1) < 0.1


def test_all_zero_advantage_batch_is_all_kl(setup):
    """GRPO micro-batch with every A_i = 0 and beta > 0: w_t is the KL term's alone. The policy part
    w - w_kl is fp32 round-off there, so no token may be labelled positive or negative learning, and the
    KL component must carry the whole of w (and of G)."""
    model, ids, mask, _, params, gT, _ = setup
    adv = torch.zeros(6)
    with torch.no_grad():
        ref = token_logps(model, ids) + 0.1 * torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    beta = 0.04
    loss, lp = grpo_like(model, ids, mask, adv, ref, beta)
    (w,) = torch.autograd.grad(loss, lp, retain_graph=True)
    w_kl = kl_token_weights(w, mask, lp.detach(), ref, adv, beta)
    pg = w * mask - w_kl * mask
    assert (pg != 0).any()  # the round-off the rule must not call learning
    comps = component_weights(w, mask, w_kl)
    assert int((comps["pos"] != 0).sum()) == 0 and int((comps["neg"] != 0).sum()) == 0
    assert torch.equal(comps["kl"], w * mask)
    G_kl = dot(gT, weighted_grad(lp, params, comps["kl"])).item()
    G_total = dot(gT, weighted_grad(lp, params, w * mask)).item()
    assert G_kl == pytest.approx(G_total, rel=1e-12)
    # the tolerance scales with w: a row with a real advantage 1e-3 of the KL scale is still learning
    adv2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1e-3])
    loss2, lp2 = grpo_like(model, ids, mask, adv2, ref, beta)
    (w2,) = torch.autograd.grad(loss2, lp2)
    c2 = component_weights(w2, mask, kl_token_weights(w2, mask, lp2.detach(), ref, adv2, beta))
    assert (c2["pos"][5] != 0).sum() == mask[5].sum() and (c2["pos"][:5] == 0).all()
    assert (c2["neg"] == 0).all()


# ---- edge cases and options (each pins a line a mutation test showed unchecked; docs/testing.md) ----------


def test_cosine_small_norms_and_zero():
    assert math.isclose(cosine(0.1, 0.04, 1.0), 0.5)  # |a| = 0.2: norms below 1 are not floored
    assert math.isclose(cosine(-0.01, 0.01, 0.04), -0.5)
    assert math.isnan(cosine(1.0, 0.0, 4.0)) and math.isnan(cosine(1.0, -1e-30, 4.0))


def test_head_grad_with_temperature_and_bias_matches_autograd_float64():
    """grad_W sum_t c_t log softmax((W h_t + b) / T)[y_t], against autograd in float64."""
    g = torch.Generator().manual_seed(11)
    N, d, Vh, T = 7, 5, 9, 0.7
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(Vh, d, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(Vh, generator=g, dtype=torch.float64)
    y = torch.randint(0, Vh, (N,), generator=g)
    coef = torch.randn(N, generator=g, dtype=torch.float64)
    logp = torch.log_softmax((h @ W.T + b) / T, -1)[torch.arange(N), y]
    (ref,) = torch.autograd.grad((coef * logp).sum(), W)
    got = head_grad_from_activations(h, W.detach(), y, coef, temperature=T, bias=b)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    no_bias = torch.log_softmax(h @ W.T / T, -1)[torch.arange(N), y]
    (ref_nb,) = torch.autograd.grad((coef * no_bias).sum(), W)
    got_nb = head_grad_from_activations(h, W.detach(), y, coef, temperature=T)
    torch.testing.assert_close(got_nb.double(), ref_nb, rtol=1e-5, atol=1e-6)


def _clip_case(adv_value: float, rho_value: float, eps: float = 0.2):
    """One-token rows: w of the clipped surrogate with k3 KL, in float64, and kl_token_weights' split of it."""
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - math.log(rho_value)
    ref = lp.detach() - 0.3
    adv = torch.tensor([adv_value], dtype=torch.float64)
    beta = 0.1
    rho = torch.exp(lp - old)
    surr = -torch.min(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    (w,) = torch.autograd.grad((surr + beta * kl).sum(), lp)
    mask = torch.ones_like(w)
    w_kl = kl_token_weights(w, mask, lp.detach(), ref, adv, beta, old_logps=old, eps_low=eps, eps_high=eps)
    return w_kl.double(), beta * (1 - torch.exp(ref - lp.detach()))


@pytest.mark.parametrize(
    "adv,rho",
    [(0.5, 1.5), (-0.5, 0.5), (0.5, 0.5), (-0.5, 1.5), (2.0, 1.5), (-2.0, 0.5)],
)
def test_kl_weights_clip_mask_for_each_sign_and_side(adv, rho):
    """Clipped tokens (A > 0, rho > 1 + eps; A < 0, rho < 1 - eps) carry only the KL part, |A| < 1 included."""
    w_kl, expected = _clip_case(adv, rho)
    torch.testing.assert_close(w_kl, expected, rtol=1e-6, atol=1e-12)


def test_kl_weights_clip_mask_needs_old_logps_and_both_eps():
    """The not-clipped mask applies only with old_logps and both eps; any one alone leaves every token unclipped."""
    B, C = 2, 3
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(B, C, generator=g, dtype=torch.float64) - 2
    ref = lp + 0.2
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(B, C, dtype=torch.float64)
    beta = 0.1
    q = 1 - torch.exp(ref - lp)
    w = (-adv[:, None] + beta * q) / 6  # on-policy: rho = 1, nothing clipped
    base = kl_token_weights(w, mask, lp, ref, adv, beta)
    torch.testing.assert_close(base.double(), beta * q / 6, rtol=1e-6, atol=1e-12)
    for kw in (dict(eps_high=0.2), dict(eps_low=0.2), dict(old_logps=lp.clone())):
        torch.testing.assert_close(kl_token_weights(w, mask, lp, ref, adv, beta, **kw), base)


def test_kl_weights_residual_of_an_all_zero_w_is_zero():
    z = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.full((2, 3), -1.0, dtype=torch.float64)
    w_kl, res = kl_token_weights(
        z, torch.ones_like(z), lp, lp + 0.1, torch.zeros(2), 0.1, return_residual=True
    )
    assert res == 0.0 and float(w_kl.abs().sum()) == 0.0


def test_layer_groups_k_edges_other_and_other_architectures():
    names = [
        "gpt_neox.embed_in.weight",  # 0 Pythia
        "gpt_neox.layers.0.attention.dense.weight",  # 1
        "gpt_neox.layers.1.mlp.dense_h_to_4h.weight",  # 2
        "gpt_neox.layers.5.mlp.dense_4h_to_h.weight",  # 3: index >= num_layers -> last group
        "gpt_neox.final_layer_norm.weight",  # 4
        "embed_out.weight",  # 5
        "transformer.wte.weight",  # 6 GPT-2
        "transformer.h.1.attn.c_attn.weight",  # 7
        "transformer.ln_f.weight",  # 8
        "v_head.summary.weight",  # 9 neither
    ]
    g = layer_groups(names, num_layers=2, k=2)
    assert g == {
        "all": list(range(10)),
        "embed": [0, 6],
        "blocks_0-0": [1],
        "blocks_1-1": [2, 3, 7],
        "head": [4, 5, 8],
        "other": [9],
    }
    assert layer_groups(names, num_layers=2, k=0) == {"all": list(range(10))}
    one = layer_groups(names, num_layers=2, k=1)
    assert one["blocks_0-1"] == [1, 2, 3, 7] and "blocks_0-0" not in one
    # k is capped at the number of blocks
    single = layer_groups(["model.layers.0.mlp.up_proj.weight"], num_layers=1, k=2)
    assert single == {"all": [0], "embed": [], "blocks_0-0": [0], "head": []}
    three = layer_groups([f"model.layers.{i}.w" for i in range(7)], num_layers=7, k=3)
    assert [three[f"blocks_{a}-{b}"] for a, b in ((0, 1), (2, 4), (5, 6))] == [[0, 1], [2, 3, 4], [5, 6]]


def test_run_summary_keys_boundaries_and_edge_series():
    keys = {"n_logged", "n_nonfinite", "frac_positive", "sign_flip_rate", "cv", "mean", "std", "regime"}
    empty = run_summary([float("nan"), float("inf")])
    assert set(empty) == keys and empty["regime"] == "RL-like" and empty["n_logged"] == 2
    assert all(math.isnan(empty[k]) for k in ("frac_positive", "sign_flip_rate", "cv", "mean", "std"))
    assert empty["n_nonfinite"] == 2
    one = run_summary([2.0])  # a single logged step: defined, no flips
    assert set(one) == keys
    assert (one["frac_positive"], one["sign_flip_rate"], one["cv"], one["mean"], one["std"]) == (
        1.0,
        0.0,
        0.0,
        2.0,
        0.0,
    )
    assert one["regime"] == "supervised-like"
    # zero is not positive, neither for the fraction nor for sign flips
    z = run_summary([0.0, 1.0, 0.0])
    assert z["frac_positive"] == 1 / 3 and z["sign_flip_rate"] == 1.0
    assert run_summary([1.0, 0.0])["sign_flip_rate"] == 1.0  # n = 2: one pair, divided by 1
    assert run_summary([1.0, -1.0])["cv"] == math.inf  # mean 0
    assert run_summary([1.0, 1.0])["cv"] == 0.0  # mean 1 is an ordinary mean
    # frac exactly 0.9 with CV < 1 is supervised-like; CV exactly 1 is not (cv < 1 is required)
    edge = run_summary([1.0] * 9 + [-0.1])
    assert edge["frac_positive"] == 0.9 and edge["cv"] < 1 and edge["regime"] == "supervised-like"
    assert run_summary([2.0, 0.0], min_positive=0.5)["cv"] == 1.0
    assert run_summary([2.0, 0.0], min_positive=0.5)["regime"] == "RL-like"
    # the default CV bound is 1: CV 1.5 with every step positive is RL-like
    s = run_summary([0.5, 0.5, 0.5, 4.5])  # mean 1.5, std sqrt(3) -> cv 1.155
    assert s["frac_positive"] == 1.0 and 1 < s["cv"] < 2 and s["regime"] == "RL-like"


def test_sq_norm_and_dot_over_an_index():
    a = [torch.tensor([3.0]), torch.tensor([1.0, 2.0])]
    b = [torch.tensor([2.0]), torch.tensor([5.0, -1.0])]
    assert float(sq_norm(a)) == 14.0 and float(sq_norm(a, [0])) == 9.0 and float(sq_norm(a, [1])) == 5.0
    assert float(dot(a, b)) == 9.0 and float(dot(a, b, [1])) == 3.0


def test_weighted_grad_unused_params_and_dtypes():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    used = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    lp = used * x  # d lp_t / d used_t = x_t
    w32 = torch.tensor([2.0, 3.0], dtype=torch.float32)  # weights in another dtype than the log-probs
    g_used, g_unused = weighted_grad(lp, [used, unused], w32)
    assert g_used.dtype == torch.float32 and g_unused.dtype == torch.float32
    torch.testing.assert_close(g_used, torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(g_unused, torch.zeros(3))


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, [0]),
        (2, [0, 1]),
        (3, [0, 1, 2]),
        (4, [0, 0, 1, 2]),
        (5, [0, 0, 1, 1, 2]),
        (7, [0, 0, 0, 1, 1, 2, 2]),
        (8, [0, 0, 0, 1, 1, 1, 2, 2]),
    ],
)
def test_tiers_sizes_by_hand(n, expected):
    """Units sorted by score (descending) are cut into thirds whose sizes differ by at most one, top first."""
    from rlx.alignment.functional import _tiers

    score = torch.arange(n, 0, -1, dtype=torch.float64)  # already descending: rank = index
    assert _tiers(score).tolist() == expected
    assert _tiers(score.flip(0)).tolist() == expected[::-1]


def test_tiers_break_ties_by_unit_id():
    from rlx.alignment.functional import _tiers

    tied = torch.ones(120, dtype=torch.float64)  # enough ties for an unstable sort to reorder them
    assert _tiers(tied).tolist() == [0] * 40 + [1] * 40 + [2] * 40


def test_token_tiers_mean_score_gather_and_unscored_tokens():
    from rlx.alignment.functional import token_tiers

    # unit 0: one token |w| = 1.0 (mean 1.0); unit 1: two tokens of 0.8 (mean 0.8, sum 1.6); unit 2: 0.1 each
    w = torch.tensor([[1.0, 0.0, 0.0], [0.8, -0.8, 0.0], [0.1, 0.1, -0.1]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    units = reweighting_units("sequence", mask)
    assert units.tolist() == [[0, -1, -1], [1, 1, -1], [2, 2, 2]]
    tt = token_tiers(w, units)
    assert tt.tolist() == [[0, -1, -1], [1, 1, -1], [2, 2, 2]]
    # ranked among other ranks' units (scores 5, 4, 3, 2, 0.01, 0.01 sit before this batch's three)
    others = torch.tensor([5.0, 4.0, 3.0, 2.0, 0.01, 0.01], dtype=torch.float64)

    def gather(score):
        return torch.cat([others, score]), len(others)

    # all nine ranked: 5 4 3 | 2 1.0 0.8 | 0.1 0.01 0.01 -> unit 0 and 1 mid, unit 2 bot
    assert token_tiers(w, units, gather).tolist() == [[1, -1, -1], [1, 1, -1], [2, 2, 2]]
    parts = tertile_weights(w, units, gather)
    assert float(parts["top"].abs().sum()) == 0.0
    torch.testing.assert_close(parts["mid"] + parts["bot"], w * mask)


def test_reweighting_units_levels_and_unscored():
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    assert reweighting_units("token", mask).tolist() == [[-1, 1, 2], [3, -1, 5]]
    assert reweighting_units("sequence", mask).tolist() == [[-1, 0, 0], [1, -1, 1]]
    pairs = reweighting_units("pair", mask, torch.tensor([7, 7]))
    assert pairs.tolist() == [[-1, 7, 7], [7, -1, 7]]
    with pytest.raises(ValueError, match="needs pair_index"):
        reweighting_units("pair", mask)
    with pytest.raises(ValueError, match="unknown reweighting level"):
        reweighting_units("row", mask)


def test_component_weights_ignores_w_kl_outside_the_mask_and_empty_batches():
    w = torch.tensor([[-2.0, 1.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w_kl = torch.tensor([[0.5, 0.25, 9.0]])  # 9.0 sits on an unscored token
    c = component_weights(w, mask, w_kl)
    torch.testing.assert_close(c["pos"], torch.tensor([[-2.5, 0.0, 0.0]]))
    torch.testing.assert_close(c["neg"], torch.tensor([[0.0, 0.75, 0.0]]))
    torch.testing.assert_close(c["kl"], torch.tensor([[0.5, 0.25, 0.0]]))
    empty = torch.zeros(0, 4)
    out = component_weights(empty, empty, empty)
    assert set(out) == {"pos", "neg", "kl"} and all(v.shape == (0, 4) for v in out.values())


def test_per_param_dot_accumulates_in_float64_and_handles_no_tensors():
    from rlx.alignment.functional import per_param_dot

    a = [torch.tensor([1e8, 1.0, -1e8], dtype=torch.float32)]
    b = [torch.ones(3, dtype=torch.float32)]
    d = per_param_dot(a, b)
    assert d.dtype == torch.float64 and d.tolist() == [1.0]  # an fp32 sum would give 0
    none = per_param_dot([], [])
    assert none.dtype == torch.float64 and none.shape == (0,)


# ---- second mutation-testing round (docs/testing.md): ties at the clip bounds, tolerance, devices ----------


def _tie_case(side: str, adv_value: float):
    """One token whose ratio sits exactly on a clip bound (rho = 1 + eps_high or 1 - eps_low, bit for bit)."""
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - (0.25 if side == "high" else -0.25)
    rho_value = float(torch.exp(lp.detach() - old))
    eps_high = rho_value - 1.0 if side == "high" else 0.2
    eps_low = 1.0 - rho_value if side == "low" else 0.2
    assert (1 + eps_high if side == "high" else 1 - eps_low) == rho_value  # an exact tie
    ref = lp.detach() - 0.3
    adv = torch.tensor([adv_value], dtype=torch.float64)
    beta = 0.1
    rho = torch.exp(lp - old)
    surr = -torch.min(rho * adv, rho.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    (w,) = torch.autograd.grad((surr + beta * kl).sum(), lp)
    w_kl = kl_token_weights(
        w, torch.ones_like(w), lp.detach(), ref, adv, beta, old_logps=old, eps_low=eps_low, eps_high=eps_high
    )
    return w, w_kl.double(), beta * (1 - torch.exp(ref - lp.detach())), rho.detach() * adv


@pytest.mark.parametrize("side,adv", [("high", 0.5), ("low", -0.5)])
def test_kl_weights_ratio_on_the_clip_bound_is_not_clipped(side, adv):
    """At rho exactly on the bound, clamp passes the gradient and min's two equal branches share it, so autograd
    gives the full surrogate gradient: the token is not clipped, and w_kl is only the KL part."""
    w, w_kl, kl_part, rho_a = _tie_case(side, adv)
    torch.testing.assert_close(w, -rho_a + kl_part, rtol=1e-12, atol=0)  # autograd: not clipped
    torch.testing.assert_close(w_kl, kl_part, rtol=1e-6, atol=1e-12)


def test_component_weights_at_exactly_the_tolerance_is_round_off():
    """|pg| must exceed tol = 1e-5 max|w| to count as learning: exactly tol is round-off (goes to kl)."""
    tol = torch.tensor(1e-5).item()  # the float32 value the comparison sees
    w = torch.tensor([[1.0, 0.0, 0.0]])
    w_kl = torch.tensor([[0.0, tol, -tol]])  # pg = w - w_kl = [1, -tol, +tol]
    c = component_weights(w, torch.ones_like(w), w_kl)
    assert c["pos"].tolist() == [[0.0, 0.0, 0.0]]
    assert c["neg"].tolist() == [[1.0, 0.0, 0.0]]
    torch.testing.assert_close(c["kl"], torch.tensor([[0.0, 0.0, 0.0]]))


def test_tiers_and_reweighting_units_stay_on_the_input_device():
    """Meta tensors (a device without data): a helper tensor created on the default device would clash or leak."""
    from rlx.alignment.functional import _tiers

    assert _tiers(torch.empty(7, device="meta")).device.type == "meta"
    mask = torch.empty(2, 3, device="meta")
    assert reweighting_units("token", mask).device.type == "meta"
    assert reweighting_units("sequence", mask).device.type == "meta"
    assert reweighting_units("pair", mask, torch.tensor([4, 4])).device.type == "meta"  # a CPU pair index


# ---- rowgrad: per-row alignment from one backward, against per-row autograd (float64 references) ----------


class _ToyRMSNorm(torch.nn.Module):
    """HF-style RMSNorm (the class name ends in RMSNorm; y = w * (x / rms(x)).to(input dtype))."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(
            1.0 + 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(9))
        )
        self.variance_epsilon = eps

    def forward(self, x):
        xf = x.float()
        xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xh.to(x.dtype)


class _ToyLM(torch.nn.Module):
    """Embedding (padding row 0) -> Linear applied twice (its records accumulate) -> RMSNorm -> head.

    `fused=True` applies the head as a matmul on its weight, not as a module call (TRL's fused head), so its
    gradient must come from row_alignment's analytic head path."""

    def __init__(self, vocab=11, d=6, fused=False, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=0)
        self.lin = torch.nn.Linear(d, d)
        self.norm = _ToyRMSNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.fused, self.scale = fused, scale
        self.last_hidden = None

    def forward(self, ids):
        h = self.lin(torch.tanh(self.lin(self.emb(ids))))
        h = self.norm(h)
        self.last_hidden = h
        if self.fused:
            return (h @ self.head.weight.T) * self.scale
        return self.head(h) * self.scale


def _row_losses(model, ids, coef):
    """L_b = sum_t coef_bt l_bt with l_bt = log p(ids_b,t+1 | ids_b,<=t): one loss per row."""
    logits = model(ids)[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (coef * lp).sum(-1)


def _rowgrad_case(fused: bool, scale: float = 1.0):
    from rlx.alignment.rowgrad import RowCapture, row_alignment

    model = _ToyLM(fused=fused, scale=scale)
    params = [model.emb.weight, model.lin.weight, model.lin.bias, model.norm.weight, model.head.weight]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (4, 7), generator=g)
    ids[1, 2] = ids[3, 0] = ids[3, 5] = 0  # padding tokens inside rows: no gradient into the padding row
    coef = torch.randn(4, 6, generator=g)
    gT = [torch.randn(p.shape, generator=g) for p in params]
    # per-row references: one autograd call per row, float64 dot products
    s_ref, per_row = [], []
    for b in range(4):
        grads = torch.autograd.grad(_row_losses(model, ids, coef)[b], params)
        per_row.append(grads)
        s_ref.append(sum((gt.double() * gr.double()).sum() for gt, gr in zip(gT, grads)))
    cap = RowCapture(model, params, model.head)
    assert cap.supported
    cap.attach()
    cap.start()
    loss = _row_losses(model, ids, coef).sum()
    cap.accept_grads = True
    loss.backward()
    cap.detach()
    assert cap.complete() and cap.head_called() == (not fused)
    head = None
    if fused:
        head = {
            "weight_index": 4,
            "hidden": model.last_hidden[:, :-1].detach(),
            "labels": ids[:, 1:],
            "coef": coef,
            "weight": model.head.weight.detach(),
            "scale": scale,
        }
    subsets = {"odd": torch.tensor([False, True, False, True]), "none": torch.zeros(4, dtype=torch.bool)}
    s, vecs = row_alignment(cap.records, gT, subsets, len(params), [p.shape for p in params], head)
    return s, vecs, torch.stack(s_ref), per_row, (cap, gT, params, head)


@pytest.mark.parametrize("fused,scale", [(False, 1.0), (True, 1.0), (True, 1 / 0.7)])
def test_row_alignment_equals_per_row_autograd(fused, scale):
    """s_b = <g_T, grad L_b> and the gradient of a row subset, from ONE backward of the whole batch, equal one
    autograd call per row: Linear (weight, bias, called twice), Embedding with a padding row, RMSNorm, and the
    LM head as a module or through the analytic fused-head path with a temperature scale."""
    s, vecs, s_ref, per_row, _ = _rowgrad_case(fused, scale)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-7)
    for i in range(5):
        expected = per_row[1][i] + per_row[3][i]
        torch.testing.assert_close(vecs["odd"][i].double(), expected.double(), rtol=1e-5, atol=1e-7)
    assert vecs["none"] == [None] * 5  # an empty subset forms nothing


def test_row_alignment_casts_the_target_to_the_records_dtype():
    """A float64 target gradient gives bit for bit the result of the same target in float32."""
    from rlx.alignment.rowgrad import row_alignment

    for fused in (False, True):
        s, vecs, _, _, (cap, gT, params, head) = _rowgrad_case(fused)
        gT64 = [g.double() for g in gT]
        s64, vecs64 = row_alignment(
            cap.records,
            gT64,
            {"odd": torch.tensor([False, True, False, True])},
            5,
            [p.shape for p in params],
            head,
        )
        assert s64.dtype == torch.float64 and torch.equal(s64, s)
        assert all(torch.equal(a, b) for a, b in zip(vecs64["odd"], vecs["odd"]))


def test_row_alignment_rmsnorm_rounds_normed_input_to_the_input_dtype():
    """bf16 activations: the norm's weight gradient is d * (x / rms(x)) rounded to bf16, as the module computes
    it; a record built by hand against a float64 reference of that rounding."""
    from rlx.alignment.rowgrad import row_alignment

    norm = _ToyRMSNorm(8, eps=1e-5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 8, generator=g).to(torch.bfloat16)
    d = torch.randn(3, 5, 8, generator=g)
    gT = [torch.randn(8, generator=g)]
    xf = x.float()
    xh = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16).double()
    prod = d.double() * xh
    s_ref = (prod @ gT[0].double()).sum(1)
    s, vecs = row_alignment(
        [[norm, "rmsnorm", 0, None, x, d]], gT, {"all": torch.ones(3, dtype=torch.bool)}, 1, [(8,)]
    )
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(vecs["all"][0].double(), prod.sum((0, 1)), rtol=1e-6, atol=1e-9)


def test_norm_eps_reads_rmsnorm_epsilon_only():
    from rlx.alignment.rowgrad import _norm_eps

    assert _norm_eps(_ToyRMSNorm(4, eps=1e-6)) == 1e-6  # variance_epsilon (HF)

    class OtherRMSNorm(torch.nn.Module):
        eps = 2e-5  # `eps` (torch.nn.RMSNorm style)

    assert _norm_eps(OtherRMSNorm()) == 2e-5
    assert _norm_eps(torch.nn.RMSNorm(4)) is None  # eps=None: no float epsilon to model
    assert _norm_eps(torch.nn.LayerNorm(4)) is None  # not an RMSNorm, although it has a float eps

    class NoEpsRMSNorm(torch.nn.Module):
        variance_epsilon = "1e-6"

    assert _norm_eps(NoEpsRMSNorm()) is None


def test_row_capture_coverage_and_supported():
    """Handled owners: Linear, Embedding, RMSNorm without bias; the head weight may be left to the fused path;
    any other trainable parameter (LayerNorm, an RMSNorm with a bias) makes the row path unsupported."""
    from rlx.alignment.rowgrad import RowCapture

    model = _ToyLM()
    params = [model.emb.weight, model.lin.weight, model.lin.bias, model.norm.weight, model.head.weight]
    cap = RowCapture(model, params, model.head)
    assert cap.owners == [
        (model.emb, "embedding", 0, None),
        (model.lin, "linear", 1, 2),
        (model.norm, "rmsnorm", 3, None),
        (model.head, "linear", 4, None),
    ]
    assert cap.head_index == 4 and cap.supported
    # a subset of parameters: only their owners are hooked, indices refer to the subset
    sub = RowCapture(model, [model.norm.weight, model.lin.bias], None)
    assert [(o[0], o[1], o[2], o[3]) for o in sub.owners] == [
        (model.lin, "linear", None, 1),
        (model.norm, "rmsnorm", 0, None),
    ]
    assert sub.supported and sub.head_index is None
    # the head left uncovered as a module (not in owners) is still supported through the fused path
    no_head = RowCapture(
        torch.nn.ModuleDict({"emb": model.emb}), [model.emb.weight, model.head.weight], model.head
    )
    assert no_head.supported and no_head.head_index == 1
    assert not RowCapture(
        torch.nn.ModuleDict({"emb": model.emb}), [model.emb.weight, model.head.weight], None
    ).supported
    ln = torch.nn.ModuleDict({"ln": torch.nn.LayerNorm(4)})
    assert not RowCapture(ln, list(ln.parameters()), None).supported
    biased = _ToyRMSNorm(4)
    biased.bias = torch.nn.Parameter(torch.zeros(4))
    assert not RowCapture(biased, [biased.weight, biased.bias], None).supported


def test_row_capture_records_only_armed_grad_forwards_and_the_first_accepted_gradient():
    from rlx.alignment.rowgrad import RowCapture

    lin = torch.nn.Linear(3, 2)
    cap = RowCapture(lin, [lin.weight], None)
    x = torch.randn(4, 3)
    cap.attach()
    lin(x)
    assert cap.records == [] and not cap.complete()  # not armed
    cap.start()
    with torch.no_grad():
        lin(x)
    assert cap.records == []  # no graph, nothing to read in a backward
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    lin(x)
    assert cap.records == []  # output without gradient
    lin.weight.requires_grad_(True)
    lin.bias.requires_grad_(True)
    out = lin(x)
    assert len(cap.records) == 1 and cap.records[0].module is lin and torch.equal(cap.records[0].inputs, x)
    out.sum().backward(retain_graph=True)
    assert cap.records[0].out_grad is None and not cap.complete()  # gradients not accepted yet
    cap.accept_grads = True
    (2 * out).sum().backward(retain_graph=True)
    torch.testing.assert_close(cap.records[0].out_grad, torch.full((4, 2), 2.0))
    (3 * out).sum().backward()
    # the first accepted one is kept
    torch.testing.assert_close(cap.records[0].out_grad, torch.full((4, 2), 2.0))
    assert cap.complete() and not cap.head_called()
    cap.start()
    assert cap.records == [] and cap.armed and not cap.accept_grads
    cap.detach()
    lin(x)
    assert cap.records == [] and cap._handles == []  # hooks removed
    lin2 = torch.nn.Linear(3, 2)
    head_cap = RowCapture(lin2, [lin2.weight], lin2)
    head_cap.attach()
    head_cap.start()
    lin2(x)
    assert head_cap.head_called()
    other = torch.nn.Linear(3, 2)
    cap3 = RowCapture(torch.nn.ModuleList([lin2, other]), [lin2.weight, other.weight], other)
    cap3.attach()
    cap3.start()
    lin2(x)
    assert not cap3.head_called()  # records exist, but none of the head


def test_row_alignment_head_only_and_on_the_records_device():
    """No layer records (only the fused head is trained): s is the head term alone. Meta tensors (a device
    without data): every accumulator is created on the records' device."""
    from rlx.alignment.rowgrad import row_alignment

    _, _, _, per_row, (cap, gT, params, head) = _rowgrad_case(True)
    s, vecs = row_alignment(
        [], gT, {"odd": torch.tensor([False, True, False, True])}, 5, [p.shape for p in params], head
    )
    s_ref = torch.stack([(gT[4].double() * per_row[b][4].double()).sum() for b in range(4)])
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-7)
    assert vecs["odd"][:4] == [None] * 4
    meta_records = [
        [r.module, r.kind, r.weight_index, r.bias_index, r.inputs.to("meta"), r.out_grad.to("meta")]
        for r in cap.records
        if r.kind != "embedding"
    ]
    emb = [r for r in cap.records if r.kind == "embedding"][0]
    meta_records.append([emb.module, "embedding", 0, None, emb.inputs.to("meta"), emb.out_grad.to("meta")])
    gT_meta = [g.to("meta") for g in gT]
    s, vecs = row_alignment(meta_records, gT_meta, {}, 5, [p.shape for p in params])
    assert s.device.type == "meta"
    s, vecs = row_alignment(
        meta_records, gT_meta, {"a": torch.tensor([True, False, True, False])}, 5, [p.shape for p in params]
    )
    assert {v.device.type for v in vecs["a"] if v is not None} == {"meta"}


def test_row_alignment_embedding_subset_under_another_default_dtype():
    """The embedding subset gradient is built in the records' dtype (float32), whatever the default dtype."""
    from rlx.alignment.rowgrad import row_alignment

    s, vecs, _, _, (cap, gT, params, _) = _rowgrad_case(False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        s2, vecs2 = row_alignment(
            cap.records, gT, {"odd": torch.tensor([False, True, False, True])}, 5, [p.shape for p in params]
        )
    finally:
        torch.set_default_dtype(old)
    assert vecs2["odd"][0].dtype == torch.float32 and torch.equal(vecs2["odd"][0], vecs["odd"][0])
    assert torch.equal(s2, s)


def test_row_capture_owners_by_own_parameters_in_module_order():
    """A module is classified by its own parameters (not its children's); modules after an unhandled one are
    still scanned; a module with parameters but no `weight` is unhandled; a handled module whose output is not
    a tensor is not recorded."""
    from rlx.alignment.rowgrad import RowCapture

    class GatedRMSNorm(_ToyRMSNorm):  # an RMSNorm with a child Linear
        def __init__(self, d):
            super().__init__(d)
            self.gate = torch.nn.Linear(d, d)

    norm = GatedRMSNorm(4)
    cap = RowCapture(norm, [norm.gate.weight], None)  # only the child's weight is trained
    assert cap.owners == [(norm.gate, "linear", 0, None)] and cap.supported

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.ones(1))

    seq = torch.nn.ModuleDict({"ln": torch.nn.LayerNorm(4), "scale": Scale(), "lin": torch.nn.Linear(4, 4)})
    cap = RowCapture(seq, list(seq.parameters()), None)
    assert cap.owners == [(seq["lin"], "linear", 3, 4)] and not cap.supported

    class TupleRMSNorm(_ToyRMSNorm):
        def forward(self, x):
            return (super().forward(x),)

    tnorm = TupleRMSNorm(4)
    cap = RowCapture(tnorm, [tnorm.weight], None)
    cap.attach()
    cap.start()
    tnorm(torch.randn(2, 4))
    assert cap.records == []
