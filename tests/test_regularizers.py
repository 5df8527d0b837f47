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
    inst = build("kl_cov", CovConfig(kl_ratio=0.25, kl_coef=2.0))
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
