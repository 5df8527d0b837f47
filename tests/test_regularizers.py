"""Token-level regularizers (entropy, Clip-Cov, KL-Cov) and the Cov(log pi, A) diagnostic, on a synthetic seam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlx.config.schema import CovConfig, EntropyBonusConfig, RunConfig
from rlx.instruments.base import InstrumentSet, LossContext
from rlx.instruments.catalog import registered_instruments
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


def test_entropy_cov_diagnostic_always_on_for_grpo(tmp_path):
    from rlx.run import RunContext, build_instruments

    cls = registered_instruments()["entropy_cov"]
    cfg = OmegaConf.structured(
        RunConfig
    )  # diagnostics.entropy_cov is not a config section: on by the spec only
    built = lambda: [i.name for i in build_instruments(cfg, RunContext(cfg=cfg, run_dir=tmp_path))]  # noqa: E731
    assert built() == ["entropy_cov"] and not cls.changes_loss
    cfg.algo = "dpo"
    assert built() == []
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


# ---- edge cases and contracts (each pins a line a mutation test showed unchecked; docs/testing.md) --------


def test_clip_cov_candidates_open_interval_valid_and_eligible_tokens():
    """ratio 1 selects every candidate: lb < Cov_t < ub (open), valid, and eligible."""
    cov = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 3.5, 2.5, 3.0], [9.0, -1.0, 1.5, 4.5]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    eligible = torch.ones_like(mask, dtype=torch.bool)
    eligible[2, 3] = False
    sel = clip_cov_selection(cov, mask, 1.0, 1.0, 5.0, torch.Generator().manual_seed(0), eligible)
    expected = [
        [0, 2],
        [0, 3],
        [1, 0],
        [1, 1],
        [1, 2],
        [2, 2],
    ]  # not 1.0 / 5.0, (1, 3) unmasked, (2, 3) ineligible
    assert sel.nonzero().tolist() == expected and sel.dtype == torch.bool


def test_clip_cov_selection_depends_only_on_its_generator():
    cov = torch.linspace(1.1, 4.9, 40).view(4, 10)
    mask = torch.ones(4, 10)
    picks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        picks.append(clip_cov_selection(cov, mask, 0.5, 1.0, 5.0, torch.Generator().manual_seed(7)))
    assert torch.equal(picks[0], picks[1]) and int(picks[0].sum()) == 20
    other = clip_cov_selection(cov, mask, 0.5, 1.0, 5.0, torch.Generator().manual_seed(8))
    assert not torch.equal(other, picks[0])


def test_kl_cov_selection_default_ratio_zero_and_dtype():
    cov = torch.tensor([[0.5, 2.0, 3.0, 6.0], [1.5, 4.0, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    assert int(kl_cov_selection(cov, mask, 0.1).sum()) == 0  # int(0.7) = 0: no token unless at_least_one
    assert int(kl_cov_selection(cov, mask, 0.1, at_least_one=True).sum()) == 1
    assert int(kl_cov_selection(cov, mask, 0.0, at_least_one=True).sum()) == 0  # ratio 0: off
    assert kl_cov_selection(cov, mask, 0.5).dtype == torch.bool


def test_positive_advantage_length_scaling_needs_both():
    from rlx.regularizers.loss import adaptive_kl, positive_advantage

    adv = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(positive_advantage(adv, None, 10), torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(
        positive_advantage(adv, torch.tensor([5, 5, 2]), None), torch.tensor([1.0, 0.0, 0.5])
    )
    torch.testing.assert_close(
        positive_advantage(adv, torch.tensor([5, 5, 2]), 10), torch.tensor([0.5, 0.0, 0.1])
    )
    # one completion token: the token-mean divides by 1
    lp, ref = torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.5, 0.0]])
    k3 = math.exp(-0.5) + 0.5 - 1
    got = adaptive_kl(lp, ref, torch.tensor([[1.0, 0.0]]), torch.tensor([True]))
    assert float(got) == pytest.approx(k3)


def _one_token_ctx(loss_scale=1.0):
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    adv = torch.tensor([1.0])
    loss = -(adv[:, None] * lp * mask).sum() / mask.sum()
    extras = {"advantages": adv, "completion_len": 2, "old_logps": lp.detach() - 0.5, "group_ids": None}
    ent = torch.tensor([[0.7, 9.0]])
    return LossContext(
        trainer=None,
        algo="grpo",
        inputs={},
        loss=loss,
        token_logps=lp,
        mask=mask,
        hidden=None,
        entropy=ent,
        loss_scale=loss_scale,
        extras=extras,
    )


def test_regularizers_on_a_single_token_divide_by_one():
    term = build("entropy", EntropyBonusConfig(coef=1.0)).on_loss(_one_token_ctx())
    assert float(term.loss) == pytest.approx(-0.7)
    term = build("clip_cov", CovConfig(clip_ratio=1.0, clip_cov_lb=-1.0, clip_cov_ub=1.0)).on_loss(
        _one_token_ctx()
    )
    assert term.metrics == {"clip_cov/clipped_frac": 1.0, "clip_cov/cov_mean": 0.0}
    # KL-Cov penalty: the one token is selected (at least one) and |l - l_old| = 0.5 over n = 1
    term = build("kl_cov", CovConfig(kl_ratio=0.1, kl_coef=1.0)).on_loss(_one_token_ctx())
    assert (
        term.metrics["kl_cov/penalty"] == pytest.approx(0.5) and term.metrics["kl_cov/selected_frac"] == 1.0
    )


def test_cov_regularizers_with_a_zero_loss_scale_stay_finite():
    """A zero GA scale must not divide by zero inside the terms (they are multiplied by it afterwards)."""
    for name, cfg in (
        ("clip_cov", CovConfig(clip_ratio=1.0, clip_cov_lb=-1.0, clip_cov_ub=1.0)),
        ("kl_cov", CovConfig()),
    ):
        ctx = _one_token_ctx(loss_scale=0.0)
        loss, _ = InstrumentSet([build(name, cfg)]).on_loss(ctx)
        (g,) = torch.autograd.grad(loss, ctx.token_logps)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def _clip_cov_selected(seed, step, calls=1, clip_ratio=0.3):
    """Which completion tokens Clip-Cov cuts at (run seed, global step), for `calls` calls of one instrument."""
    from types import SimpleNamespace

    run = SimpleNamespace(cfg=SimpleNamespace(seed=seed))
    inst = registered_instruments()["clip_cov"](
        OmegaConf.structured(CovConfig(clip_ratio=clip_ratio, clip_cov_lb=-10.0, clip_cov_ub=10.0)), run
    )
    out = []
    for _ in range(calls):
        ctx = make_ctx(b=6, c=6)
        ctx.trainer = SimpleNamespace(state=SimpleNamespace(global_step=step))
        term = inst.on_loss(ctx)
        (g,) = torch.autograd.grad(ctx.loss + term.loss * ctx.loss_scale, ctx.token_logps)
        w = ctx.token_weights()
        out.append(((g == 0) & (w != 0))[:, -ctx.completion_len :])
    return out


def test_clip_cov_selection_is_reproducible_and_varies_with_seed_step_and_call():
    a = _clip_cov_selected(seed=3, step=5)[0]
    torch.manual_seed(123)  # the global RNG does not enter
    b = _clip_cov_selected(seed=3, step=5)[0]
    assert torch.equal(a, b) and int(a.sum()) == int(0.3 * 28)
    assert not torch.equal(_clip_cov_selected(seed=0, step=5)[0], _clip_cov_selected(seed=1, step=5)[0])
    assert not torch.equal(_clip_cov_selected(seed=3, step=0)[0], _clip_cov_selected(seed=3, step=1)[0])
    calls = _clip_cov_selected(seed=3, step=5, calls=3)  # micro-batches of one step draw anew
    assert not torch.equal(calls[0], calls[1]) and not torch.equal(calls[1], calls[2])
    assert torch.equal(calls[0], a)


def test_clip_cov_skips_tokens_without_gradient():
    """Tokens whose w_t is already 0 (here: a zero advantage) are not eligible; with ratio 1 every other is cut."""
    ctx = make_ctx()
    ctx.extras["advantages"] = torch.tensor([1.5, 0.0, 0.8, -1.2, 0.0, -0.9])
    lp, mask = ctx.completion_logps, ctx.completion_mask
    ctx.loss = -(ctx.extras["advantages"][:, None] * lp * mask).sum() / mask.sum()
    inst = build("clip_cov", CovConfig(clip_ratio=1.0, clip_cov_lb=-100.0, clip_cov_ub=100.0))
    term = inst.on_loss(ctx)
    eligible = float((mask * (ctx.extras["advantages"] != 0)[:, None]).sum())
    assert term.metrics["clip_cov/clipped_frac"] == pytest.approx(eligible / float(mask.sum()))
    cov = token_covariance(lp, ctx.extras["advantages"], mask)
    assert term.metrics["clip_cov/cov_mean"] == pytest.approx(float(cov.sum() / mask.sum()))


def test_kl_cov_warns_once():
    import warnings

    inst = build("kl_cov", CovConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inst.on_loss(make_ctx())
        inst.on_loss(make_ctx())
    assert sum("no old log-probs" in str(w.message) for w in caught) == 1


def _on_policy_kl_ctx(algo, beta, trainer_beta, with_eps=True):
    """On-policy GRPO/PPO-like micro-batch (rho = 1) whose loss has a k3 term of weight `beta`."""
    from types import SimpleNamespace

    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.2, -1.8], [-0.4, -2.6]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    loss = (-adv[:, None] * torch.exp(lp - lp.detach()) + beta * k3).sum() / 4
    trainer = SimpleNamespace() if trainer_beta is None else SimpleNamespace(beta=trainer_beta)
    if with_eps:
        trainer.epsilon_low = trainer.epsilon_high = 0.2
    extras = {"advantages": adv, "completion_len": 2, "old_logps": lp.detach(), "ref_logps": ref}
    ctx = LossContext(
        trainer=trainer,
        algo=algo,
        inputs={},
        loss=loss,
        token_logps=lp,
        mask=torch.ones(2, 2, dtype=torch.float64),
        hidden=None,
        extras=extras,
    )
    return ctx, lp, adv, ref


@pytest.mark.parametrize(
    "algo,beta,trainer_beta,with_eps",
    [
        ("grpo", 0.1, 0.1, False),  # no epsilon attributes on the trainer: unclipped
        ("grpo", 1.0, 1.0, True),  # beta = 1 is an ordinary beta
        ("grpo", 0.0, 0.0, True),  # beta 0: w is all policy gradient, nothing to split
        ("grpo", 0.0, None, True),  # a trainer without beta: same
        ("ppo", 0.0, 0.1, True),  # PPO: its KL is in the reward; w is all policy gradient
    ],
)
def test_kl_cov_reference_on_policy_keeps_the_trainers_gradient(algo, beta, trainer_beta, with_eps):
    """On-policy (rho = 1, old = l) verl's unclipped -A rho has the same gradient as the trainer's loss and the
    penalty |l - l_old| is 0, so KL-Cov must leave the gradient unchanged, KL term included."""
    ctx, lp, adv, ref = _on_policy_kl_ctx(algo, beta, trainer_beta, with_eps)
    loss, metrics = InstrumentSet([build("kl_cov", CovConfig(kl_ratio=0.5))]).on_loss(ctx)
    (g,) = torch.autograd.grad(loss, lp)
    expected = (-adv[:, None] + beta * (1 - torch.exp(ref - lp.detach()))) / 4
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-7)  # w_kl is float32
    assert set(metrics) == {"kl_cov/selected_frac", "kl_cov/penalty", "kl_cov/cov_mean"}
    cov = token_covariance(lp, adv, ctx.completion_mask)
    assert metrics["kl_cov/cov_mean"] == pytest.approx(float(cov.sum() / 4))


def test_entropy_cov_needs_log_probs_and_averages_the_top_tokens():
    cls = registered_instruments()["entropy_cov"]
    ctx = make_ctx()
    ctx.token_logps = None
    assert cls(None, None).on_loss(ctx) is None
    # 1000 valid tokens: the top 0.2% are k = 2 tokens, and cov_top is their mean (not the max)
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(10, 100, generator=g)
    adv = torch.randn(10, generator=g)
    mask = torch.ones(10, 100)
    ctx = LossContext(
        trainer=None,
        algo="grpo",
        inputs={},
        loss=lp.sum(),
        token_logps=lp,
        mask=mask,
        hidden=None,
        extras={"advantages": adv, "completion_len": 100},
    )
    term = cls(None, None).on_loss(ctx)
    cov = token_covariance(lp, adv, mask).reshape(-1)
    top2 = torch.topk(cov, 2).values
    assert term.metrics["entropy_cov/cov_top"] == pytest.approx(float(top2.mean()), rel=1e-6)
    assert float(top2[0]) != float(top2[1])


# ---- second mutation-testing round (docs/testing.md) -------------------------------------------------------


def test_clip_cov_generator_seed_is_pinned():
    """The Clip-Cov draw is seeded with seed * 1_000_003 + global_step * 1009 + call index (from 0), with seed and
    step 0 when the run or the trainer do not say: pinned, so a recorded run's cuts are reproduced exactly."""
    from types import SimpleNamespace

    cfg = CovConfig(clip_ratio=0.3, clip_cov_lb=-10.0, clip_cov_ub=10.0)

    def expected(seed_value, ctx):
        cov = token_covariance(ctx.completion_logps, ctx.extras["advantages"], ctx.completion_mask)
        w = ctx.token_weights()[:, -ctx.completion_len :]
        gen = torch.Generator().manual_seed(seed_value)
        return clip_cov_selection(cov, ctx.completion_mask, 0.3, -10.0, 10.0, gen, w != 0)

    def cut(inst, ctx):
        term = inst.on_loss(ctx)
        (g,) = torch.autograd.grad(ctx.loss + term.loss * ctx.loss_scale, ctx.token_logps)
        w = ctx.token_weights()
        return ((g == 0) & (w != 0))[:, -ctx.completion_len :]

    inst = registered_instruments()["clip_cov"](
        OmegaConf.structured(cfg), SimpleNamespace(cfg=SimpleNamespace(seed=3))
    )
    for call in range(3):
        ctx = make_ctx(seed=call)
        ctx.trainer = SimpleNamespace(state=SimpleNamespace(global_step=5))
        assert torch.equal(cut(inst, ctx), expected(3 * 1_000_003 + 5 * 1009 + call, ctx))
    # no run config, and a trainer state without global_step: seed 0, step 0
    bare = registered_instruments()["clip_cov"](OmegaConf.structured(cfg), None)
    for call, trainer in enumerate((SimpleNamespace(state=SimpleNamespace()), None)):
        ctx = make_ctx(seed=10 + call)
        ctx.trainer = trainer
        assert torch.equal(cut(bare, ctx), expected(call, ctx))


def test_entropy_cov_top_token_is_the_best_valid_one_not_padding():
    """k = 1 top token (n = 550 valid, 0.2%) whose Cov_t is negative: cov_top is that token's value, not the 0
    of a padded position. Here l_t = -A_t, so every valid Cov_t = -(A_t - mean A)^2 < 0."""
    cls = registered_instruments()["entropy_cov"]
    adv = torch.linspace(-1.0, 1.0, 550).reshape(1, 550)  # an even count: no token sits at the mean
    adv = torch.cat([adv, torch.zeros(1, 50)], 1)
    mask = torch.cat([torch.ones(1, 550), torch.zeros(1, 50)], 1)
    lp = -adv * mask
    ctx = LossContext(
        trainer=None,
        algo="grpo",
        inputs={},
        loss=lp.sum(),
        token_logps=lp,
        mask=mask,
        hidden=None,
        extras={"advantages": adv, "completion_len": 600},
    )
    term = cls(None, None).on_loss(ctx)
    cov = token_covariance(lp, adv, mask)
    best = float(cov[mask > 0].max())
    assert best < 0 and term.metrics["entropy_cov/cov_top"] == pytest.approx(best, rel=1e-6)


def test_kl_cov_grpo_with_beta_but_no_reference_log_probs_takes_w_as_policy_gradient():
    """GRPO with trainer.beta > 0 but no ref_logps in the seam: there is no KL term to split off, so the trainer's
    gradient is cancelled whole and replaced by verl's (the on-policy case leaves it unchanged)."""
    ctx, lp, adv, _ = _on_policy_kl_ctx("grpo", 0.0, 0.1)
    del ctx.extras["ref_logps"]
    loss, _ = InstrumentSet([build("kl_cov", CovConfig(kl_ratio=0.5))]).on_loss(ctx)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, -adv[:, None].expand(2, 2) / 4, rtol=0, atol=1e-12)


def test_kl_cov_term_is_in_the_dtype_of_the_log_probs():
    """float64 old log-probs and advantages with float32 log-probs: both are cast to float32 first, so the term
    and its metrics are exactly those of float32 inputs."""
    ctx32 = make_ctx(old_shift=0.3)
    ctx64 = make_ctx(old_shift=0.3)
    ctx64.extras["old_logps"] = ctx64.extras["old_logps"].double() + 1e-9  # below float32 resolution here
    ctx64.extras["advantages"] = ctx64.extras["advantages"].double() + 1e-12
    inst = build("kl_cov", CovConfig(kl_ratio=0.3, kl_coef=0.7))
    t32, t64 = inst.on_loss(ctx32), inst.on_loss(ctx64)
    assert t64.loss.dtype == torch.float32
    assert torch.equal(t64.loss, t32.loss) and t64.metrics == t32.metrics
    (g32,) = torch.autograd.grad(t32.loss, ctx32.token_logps)
    (g64,) = torch.autograd.grad(t64.loss, ctx64.token_logps)
    assert torch.equal(g64, g32)
