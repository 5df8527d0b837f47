"""Token-level regularizers (entropy, Clip-Cov, KL-Cov) and the Cov(log pi, A) diagnostic, on a synthetic seam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlx.config.schema import CovConfig, EntropyBonusConfig, RunConfig
from rlx.instruments.base import InstrumentSet, LossContext, registered_instruments
from rlx.regularizers.covariance import clip_cov_selection, kl_cov_selection, token_covariance


def make_ctx(seed=0, b=6, s=9, c=6, vocab=11, d=8, old_shift=0.0, loss_scale=0.5):
    """A GRPO-like micro-batch: l_t from a linear head on hidden states, loss = -token-mean(A * l)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d, generator=g, requires_grad=True)
    head = torch.randn(vocab, d, generator=g)
    labels = torch.randint(0, vocab, (b, s - 1), generator=g)
    logits = hidden[:, :-1] @ head.t()
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lengths = torch.tensor([6, 5, 6, 3, 2, 6][:b])
    mask = torch.zeros(b, s - 1)
    for i, n in enumerate(lengths):
        mask[i, s - 1 - c : s - 1 - c + int(n)] = 1
    token_logps = token_logps * mask
    probs = torch.softmax(logits, -1)
    entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1) * mask
    adv = torch.tensor([1.5, -0.5, 0.8, -1.2, 0.3, -0.9][:b])
    lp = token_logps[:, -c:]
    loss = -(adv[:, None] * lp * mask[:, -c:]).sum() / mask.sum()
    extras = {
        "advantages": adv,
        "completion_len": c,
        "old_logps": (lp.detach() + old_shift * torch.randn(b, c, generator=g)) if old_shift else None,
        "group_ids": torch.arange(b) // 3,
    }
    return LossContext(
        trainer=None,
        algo="grpo",
        inputs={},
        loss=loss,
        token_logps=token_logps,
        mask=mask,
        hidden=hidden,
        entropy=entropy,
        loss_scale=loss_scale,
        extras=extras,
    )


def build(name, section):
    return registered_instruments()[name](OmegaConf.structured(section), None)


def test_token_covariance_matches_numpy():
    ctx = make_ctx()
    cov = token_covariance(ctx.completion_logps, ctx.extras["advantages"], ctx.completion_mask)
    lp = ctx.completion_logps.detach().numpy()
    m = ctx.completion_mask.numpy().astype(bool)
    a = np.broadcast_to(ctx.extras["advantages"].numpy()[:, None], lp.shape)
    ref = (lp[m] - lp[m].mean()) * (a[m] - a[m].mean())
    np.testing.assert_allclose(cov.numpy()[m], ref, rtol=1e-5, atol=1e-6)
    assert float(cov[~torch.from_numpy(m)].abs().max()) == 0


def test_selections():
    cov = torch.tensor([[0.5, 2.0, 3.0, 6.0], [1.5, 4.0, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    sel = clip_cov_selection(cov, mask, ratio=0.5, lb=1.0, ub=5.0, generator=torch.Generator().manual_seed(0))
    assert int(sel.sum()) == 3  # int(0.5 * 7) = 3, all among the 4 candidates in (1, 5)
    assert bool(((cov > 1) & (cov < 5) & (mask > 0))[sel].all())
    top = kl_cov_selection(cov, mask, ratio=2 / 7)
    assert top.nonzero().tolist() == [[0, 3], [1, 1]]  # 9.0 is masked out
    assert int(clip_cov_selection(cov, mask, 1e-6, 1.0, 5.0).sum()) == 1  # at least one token, as verl


def test_clip_cov_removes_exactly_the_selected_gradients():
    ctx = make_ctx(loss_scale=0.5)
    inst = build("clip_cov", CovConfig(clip_ratio=0.3, clip_cov_lb=-10.0, clip_cov_ub=10.0))
    loss, metrics = InstrumentSet([inst]).on_loss(ctx)
    torch.testing.assert_close(loss, ctx.loss)  # value untouched
    (g,) = torch.autograd.grad(loss, ctx.token_logps, retain_graph=True)
    w = ctx.token_weights()
    changed = (g - w).abs() > 0
    c = ctx.completion_len
    n_sel = int(0.3 * ctx.completion_mask.sum())
    assert int(changed.sum()) == n_sel
    assert float(g[changed].abs().max()) < 1e-7  # selected: zero gradient
    assert not bool(changed[:, :-c].any())
    assert metrics["clip_cov/clipped_frac"] == pytest.approx(n_sel / float(ctx.completion_mask.sum()))


def test_kl_cov_penalty_and_gradient():
    ctx = make_ctx(old_shift=0.3)
    inst = build("kl_cov", CovConfig(kl_ratio=0.25, kl_coef=2.0, kl_variant="penalty"))
    term = inst.on_loss(ctx)
    lp, old, mask = ctx.completion_logps, ctx.extras["old_logps"], ctx.completion_mask
    cov = token_covariance(lp, ctx.extras["advantages"], mask)
    sel = kl_cov_selection(cov, mask, 0.25)
    n = mask.sum()
    assert int(sel.sum()) == int(0.25 * n)
    expected = 2.0 * ((lp.detach() - old).abs() * sel).sum() / n
    torch.testing.assert_close(term.loss, expected)
    (g,) = torch.autograd.grad(term.loss, ctx.token_logps)
    torch.testing.assert_close(g[:, -ctx.completion_len :], 2.0 * torch.sign(lp.detach() - old) * sel / n)


def _hand_ctx(loss_scale=1.0):
    """2 sequences x 2 completion tokens, all valid (n = 4); TRL-like clipped loss with eps = 0.2.

    l = [[-1, -2], [-0.5, -3]], l_old = [[-1, -2.5], [-0.5, -2]]  ->  log rho = [[0, 0.5], [0, -1]]
    A = [1, -1] per sequence  ->  A_t = [[1, 1], [-1, -1]], mean A = 0; mean l = -6.5 / 4 = -1.625
    Cov_t = (l - mean l)(A - mean A) = [[0.625, -0.375], [-1.125, 1.375]]
    """
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -2.5], [-0.5, -2.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.float64)
    rho = torch.exp(lp - old)
    a = adv[:, None]
    clipped = -torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)  # TRL's surrogate: (0,1) and (1,1) clipped
    loss = loss_scale * clipped.sum() / 4
    extras = {"advantages": adv, "completion_len": 2, "old_logps": old, "group_ids": torch.tensor([0, 0])}
    return LossContext(
        trainer=None,
        algo="grpo",
        inputs={},
        loss=loss,
        token_logps=lp,
        mask=mask,
        hidden=None,
        loss_scale=loss_scale,
        extras=extras,
    )


@pytest.mark.parametrize("loss_scale", [1.0, 0.5])
def test_kl_cov_reference_hand_computed(loss_scale):
    """verl's KL-Cov on the hand case of `_hand_ctx`, kl_ratio 0.1 (int(0.1 * 4) = 0), kl_coef 0.5.

    Reference: k = max(1, 0) = 1 token, the top Cov_t = 1.375 at (1, 1), where |l - l_old| = 1.
    verl's loss = 1/4 sum_t (-A_t rho_t) + 0.5 * 1 / 4, so dL/dl_t = (-A_t rho_t + 0.5 sign(l - l_old) 1[sel]) / 4:
      (0,0): -1/4 = -0.25            (0,1): -e^0.5 / 4 = -0.412180
      (1,0): +1/4 = +0.25            (1,1): (e^-1 - 0.5) / 4 = -0.033030
    The trainer's clipped loss alone has gradient [[-0.25, 0], [0.25, 0]] (both rho-extreme tokens clipped),
    so only the unclipped loss can give the (0,1) and (1,1) entries. All of it times the GA scale.
    Penalty variant: k = int(0.4) = 0 tokens, so nothing changes: the trainer's gradient and a zero term.
    """
    ctx = _hand_ctx(loss_scale)
    inst = build("kl_cov", CovConfig(kl_ratio=0.1, kl_coef=0.5))
    loss, metrics = InstrumentSet([inst]).on_loss(ctx)
    (g,) = torch.autograd.grad(loss, ctx.token_logps, retain_graph=True)
    hand = torch.tensor([[-0.25, -0.412180318], [0.25, -0.033030139]], dtype=torch.float64)
    torch.testing.assert_close(g, loss_scale * hand, rtol=0, atol=1e-8)
    assert metrics["kl_cov/selected_frac"] == 0.25 and metrics["kl_cov/penalty"] == pytest.approx(0.25)
    # value: the trainer's loss plus the penalty 0.5 * 1/4 (times the GA scale)
    assert float(loss.detach()) == pytest.approx(float(ctx.loss.detach()) + loss_scale * 0.125, abs=1e-12)

    ctx = _hand_ctx(loss_scale)
    inst = build("kl_cov", CovConfig(kl_ratio=0.1, kl_coef=0.5, kl_variant="penalty"))
    loss, metrics = InstrumentSet([inst]).on_loss(ctx)
    (g,) = torch.autograd.grad(loss, ctx.token_logps)
    torch.testing.assert_close(g, loss_scale * torch.tensor([[-0.25, 0.0], [0.25, 0.0]], dtype=torch.float64))
    assert metrics["kl_cov/selected_frac"] == 0.0


def test_kl_cov_reference_keeps_grpo_kl_term():
    """GRPO with beta > 0: only the policy-gradient part of w_t is replaced; the k3 term's gradient
    beta * (1 - exp(ref - l)) / 4 stays, on top of the hand-computed verl gradient."""
    from types import SimpleNamespace

    ctx = _hand_ctx()
    lp, beta = ctx.token_logps, 0.1
    ref = torch.tensor([[-1.2, -1.8], [-0.4, -2.6]], dtype=torch.float64)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    ctx.loss = ctx.loss + beta * k3.sum() / 4
    ctx.trainer = SimpleNamespace(beta=beta, epsilon_low=0.2, epsilon_high=0.2)
    ctx.extras["ref_logps"] = ref
    loss, _ = InstrumentSet([build("kl_cov", CovConfig(kl_ratio=0.1, kl_coef=0.5))]).on_loss(ctx)
    (g,) = torch.autograd.grad(loss, lp)
    hand = torch.tensor([[-0.25, -0.412180318], [0.25, -0.033030139]], dtype=torch.float64)
    kl_grad = beta * (1 - torch.exp(ref - lp.detach())) / 4
    torch.testing.assert_close(g, hand + kl_grad, rtol=0, atol=1e-8)


def test_kl_cov_variant_is_validated():
    from rlx.errors import UserError

    with pytest.raises(UserError, match="kl_variant"):
        build("kl_cov", CovConfig(kl_variant="verl"))


def test_kl_cov_on_policy_is_zero_and_warns():
    ctx = make_ctx()
    with pytest.warns(UserWarning, match="no old log-probs"):
        term = build("kl_cov", CovConfig()).on_loss(ctx)
    assert float(term.loss.detach()) == 0.0


def test_entropy_bonus():
    ctx = make_ctx()
    term = build("entropy", EntropyBonusConfig(coef=0.05)).on_loss(ctx)
    ent, mask = ctx.entropy[:, -ctx.completion_len :], ctx.completion_mask
    torch.testing.assert_close(term.loss, -0.05 * (ent * mask).sum() / mask.sum())
    assert term.metrics["entropy_bonus/entropy"] > 0


def test_entropy_cov_diagnostic_always_on_for_grpo():
    cls = registered_instruments()["entropy_cov"]
    cfg = OmegaConf.structured(RunConfig)
    assert cls.always_on(cfg) and not cls.changes_loss
    cfg.algo = "dpo"
    assert not cls.always_on(cfg)
    ctx = make_ctx()
    term = cls(None, None).on_loss(ctx)
    assert term.loss is None
    cov = token_covariance(ctx.completion_logps, ctx.extras["advantages"], ctx.completion_mask)
    assert term.metrics["entropy_cov/cov"] == pytest.approx(float(cov.sum() / ctx.completion_mask.sum()))
    assert term.metrics["entropy_cov/cov_top"] == pytest.approx(float(cov.max()))


def test_build_instruments_composes_regularizers(tmp_path):
    from rlx.config.loader import load_config
    from rlx.run import RunContext, build_instruments

    cfg = load_config(["regularizers=[relax,entropy,kl_cov]", "regularizers.relax.alpha=0.2"])
    run = RunContext(cfg=cfg, run_dir=tmp_path)
    names = [i.name for i in build_instruments(cfg, run)]
    assert names[:3] == ["relax", "entropy", "kl_cov"] and "entropy_cov" in names
    assert cfg.regularizers.relax.alpha == 0.2
