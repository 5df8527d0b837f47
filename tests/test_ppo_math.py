"""PPO math (rlx/algorithms/ppo.py) against hand-computed numbers and a closed form in float64."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algorithms.ppo import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    token_level_rewards,
)
from rlx.algorithms.stats import masked_mean

f64 = dict(dtype=torch.float64)


def t(x):
    return torch.tensor(x, **f64)


# ---- GAE -----------------------------------------------------------------------------------------------


def test_gae_gamma1_lambda1_ragged_by_hand():
    # gamma = lambda = 1: A_t = sum_{k >= t} r_k - V_t, R_t = sum_{k >= t} r_k (terminal value 0).
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])  # 9.0 is padding and must not leak
    values = t([[0.5, 0.2, 0.4], [1.0, -1.0, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t([[0.5, 0.8, 0.6], [1.0, 3.0, 0.0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]), rtol=0, atol=1e-12)


def test_gae_099_095_ragged_by_hand():
    # Worked by hand, gamma*lambda = 0.9405:
    # row 0 (len 2): d1 = 1 - 0.2 = 0.8; d0 = 0 + .99*.2 - .5 = -0.302; A0 = -0.302 + .9405*.8 = 0.4504
    # row 1 (len 1): A0 = 2 - 0.5 = 1.5
    # row 2 (len 3): d2 = 0.2; d1 = .99*.8 - .6 = 0.192, A1 = 0.192 + .9405*.2 = 0.3801;
    #                d0 = -.1 + .99*.6 - .4 = 0.094, A0 = 0.094 + .9405*.3801 = 0.45148405
    rewards = t([[0.0, 1.0, 5.0], [2.0, 5.0, 5.0], [-0.1, 0.0, 1.0]])
    values = t([[0.5, 0.2, 3.0], [0.5, 3.0, 3.0], [0.4, 0.6, 0.8]])
    mask = t([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected_adv = t([[0.4504, 0.8, 0.0], [1.5, 0.0, 0.0], [0.45148405, 0.3801, 0.2]])
    expected_ret = t([[0.9504, 1.0, 0.0], [2.0, 0.0, 0.0], [0.85148405, 0.9801, 1.0]])
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)


def _gae_closed_form(r, v, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0: a matrix product."""
    out = torch.zeros_like(r)
    for i, n in enumerate(lengths):
        rr, vv = r[i, :n], v[i, :n]
        v_next = torch.cat([vv[1:], vv.new_zeros(1)])
        delta = rr + gamma * v_next - vv
        idx = torch.arange(n, dtype=torch.float64)
        expo = idx[None, :] - idx[:, None]  # l = k - t
        weights = torch.where(expo >= 0, (gamma * lam) ** expo.clamp(min=0), torch.zeros_like(expo))
        out[i, :n] = weights @ delta
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_matches_closed_form_random_ragged(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 0, 5]
    r = torch.randn(5, 7, generator=g, **f64)
    v = torch.randn(5, 7, generator=g, **f64)
    mask = torch.zeros(5, 7, **f64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    adv, ret = gae(r, v, mask, gamma, lam)
    ref = _gae_closed_form(r, v, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, (ref + v) * mask, rtol=0, atol=1e-12)


def test_gae_mask_holes_are_skipped():
    # A hole (e.g. a tool-output token) is skipped: the result equals GAE on the compressed row.
    r, v = t([[0.3, 8.0, 1.0]]), t([[0.1, 8.0, 0.4]])
    adv, _ = gae(r, v, t([[1, 0, 1]]), 0.99, 0.95)
    ref, _ = gae(t([[0.3, 1.0]]), t([[0.1, 0.4]]), t([[1, 1]]), 0.99, 0.95)
    torch.testing.assert_close(adv[:, [0, 2]], ref)
    assert adv[0, 1] == 0


# ---- losses --------------------------------------------------------------------------------------------

# rows of (A, rho): inside range, outside high, outside low, large rho with A<0 (unclipped pessimistic branch),
# rho < 1 with A > 0 (unclipped), padding.
ADV = [[1.0, 1.0, -1.0, -1.0], [-2.0, 1.0, 5.0, 5.0]]
RATIO = [[1.1, 1.5, 0.5, 3.0], [1.5, 0.5, 1.0, 1.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]


def _policy(**kw):
    a, rho, m = t(ADV), t(RATIO), t(MASK)
    out = clipped_policy_loss(torch.log(rho), torch.zeros_like(rho), a, **kw)
    return out, m


def test_clipped_policy_loss_by_hand():
    out, m = _policy(epsilon=0.2)
    # per token: -1.1 (inside), max(-1.5,-1.2) = -1.2 (clipped), max(0.5,0.8) = 0.8 (clipped),
    # max(3.0,1.2) = 3.0, max(3.0,2.4) = 3.0, max(-0.5,-0.8) = -0.5
    torch.testing.assert_close(out.loss * m, t([[-1.1, -1.2, 0.8, 3.0], [3.0, -0.5, 0.0, 0.0]]))
    torch.testing.assert_close(masked_mean(out.loss, m), t(4.0 / 6))
    torch.testing.assert_close(out.clipped * m, t([[0, 1, 1, 0], [0, 0, 0, 0]]))
    torch.testing.assert_close(masked_mean(out.clipped, m), t(2 / 6))


def test_clipped_policy_loss_epsilon_high_and_dual_clip_by_hand():
    out, m = _policy(epsilon=0.2, epsilon_high=0.28, dual_clip=2.0)
    # epsilon_high: token (A=1, rho=1.5) -> -1.28. Dual clip c=2: (A=-1, rho=3) -> min(3.0, 2.0) = 2.0;
    # (A=-2, rho=1.5) keeps 3.0 < 4.0.
    torch.testing.assert_close(out.loss * m, t([[-1.1, -1.28, 0.8, 2.0], [3.0, -0.5, 0.0, 0.0]]))
    torch.testing.assert_close(masked_mean(out.loss, m), t(2.92 / 6))
    torch.testing.assert_close(out.dual_clipped * m, t([[0, 0, 0, 1], [0, 0, 0, 0]]))


def test_clipped_policy_loss_gradient_is_masked_rho_a():
    # d L_t / d log pi_t = -A_t rho_t on unclipped tokens, 0 on clipped ones (docs/gradient_alignment.md)
    a, rho = t(ADV), t(RATIO)
    logps = torch.log(rho).requires_grad_(True)
    out = clipped_policy_loss(logps, torch.zeros_like(rho), a, epsilon=0.2)
    out.loss.sum().backward()
    torch.testing.assert_close(logps.grad, -a * rho * (1 - out.clipped))


def test_clipped_value_loss_by_hand():
    values = t([[0.5, 1.0, 0.0], [2.0, 0.0, 4.0]])
    old = t([[0.4, 0.5, 0.5], [1.0, 1.0, 4.0]])
    ret = t([[1.0, 1.0, 1.0], [0.0, 0.0, 9.0]])
    m = t([[1, 1, 1], [1, 1, 0]])
    loss, clipped = clipped_value_loss(values, old, ret, cliprange_value=0.2)
    # inside: .5*.25; clipped: V_clip=.7 -> .5*.09; V_clip=.3 but unclipped 1.0 larger -> .5;
    # V_clip=1.2, unclipped 4 larger -> 2.0; V_clip=.8 -> .5*.64 = .32 (clipped)
    torch.testing.assert_close(loss * m, t([[0.125, 0.045, 0.5], [2.0, 0.32, 0.0]]))
    torch.testing.assert_close(masked_mean(loss, m), t(2.99 / 5))
    torch.testing.assert_close(masked_mean(clipped, m), t(0.4))
    loss_nc, clipped_nc = clipped_value_loss(values, old, ret, cliprange_value=None)
    torch.testing.assert_close(masked_mean(loss_nc, m), t(2.625 / 5))
    assert clipped_nc.sum() == 0


# ---- rewards, EV, controller ---------------------------------------------------------------------------


def test_token_level_rewards_by_hand():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    r = token_level_rewards(t([1.0, 0.5, 3.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(r, t([[-0.05, -0.1, 0.85], [-0.2, 0.25, 0.0], [0.0, 0.0, 0.0]]))


def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = t([[1, 1, 1], [1, 0, 0]])
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, m).item() == pytest.approx(0.0)
    # V = R - (1, -1, 1, -1): Var[R - V] = 4/3, Var[R] = 5/3 -> EV = 0.2
    v = ret - t([[1.0, -1.0, 1.0], [-1.0, 0.0, 0.0]])
    assert explained_variance(v, ret, m).item() == pytest.approx(0.2)


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(0.1, target=1.0, horizon=100)
    c.update(current_kl=1.5, n_steps=10)  # error clipped to +0.2 -> 0.1 * 1.02
    assert c.value == pytest.approx(0.102)
    c.update(current_kl=0.9, n_steps=10)  # error -0.1 -> * 0.99
    assert c.value == pytest.approx(0.10098)


# ---- edge cases and defaults (each pins a line a mutation test showed unchecked; docs/testing.md) ----------


def test_gae_accepts_a_bool_mask():
    r, v = t([[0.3, 0.5, 1.0]]), t([[0.1, 0.2, 0.4]])
    adv_f, ret_f = gae(r, v, t([[1, 1, 0]]), 0.99, 0.95)
    adv_b, ret_b = gae(r, v, torch.tensor([[True, True, False]]), 0.99, 0.95)
    torch.testing.assert_close(adv_b, adv_f)
    torch.testing.assert_close(ret_b, ret_f)


def test_token_level_rewards_one_token_rows_and_more_rows_than_columns():
    # B = 4 > C = 2; a one-token row still receives its score at its only token
    kl = t([[0.2, 0.4], [0.6, 9.0], [1.0, 1.0], [0.0, 0.0]])
    mask = t([[1, 1], [1, 0], [0, 0], [0, 1]])
    r = token_level_rewards(t([1.0, 2.0, 3.0, 4.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(r, t([[-0.1, 0.8], [1.7, 0.0], [0.0, 0.0], [0.0, 4.0]]))


def test_clipped_policy_loss_reads_old_logps_and_defaults():
    logps, old = t([[math.log(0.22), math.log(0.2)]]), t([[math.log(0.2), math.log(0.4)]])
    adv = t([[1.0, -1.0]])
    out = clipped_policy_loss(logps, old, adv)  # default epsilon 0.2
    torch.testing.assert_close(out.ratio, t([[1.1, 0.5]]))  # pi / pi_old
    # A=1, rho=1.1 inside the range: -1.1; A=-1, rho=0.5: max(0.5, 0.8) = 0.8 (clipped at 1 - 0.2)
    torch.testing.assert_close(out.loss, t([[-1.1, 0.8]]))
    torch.testing.assert_close(out.clipped, t([[0.0, 1.0]]))
    assert out.dual_clipped.dtype == torch.float64 and out.dual_clipped.sum() == 0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_policy_loss(logps, old, adv, dual_clip=1.0)


def test_dual_clip_only_for_negative_advantages():
    # A = 0.5 > 0 is never dual-clipped, even where its loss is above -c*A
    rho, adv = t([[0.5, 3.0]]), t([[0.5, -1.0]])
    out = clipped_policy_loss(torch.log(rho), torch.zeros_like(rho), adv, epsilon=0.2, dual_clip=2.0)
    # A=0.5, rho=0.5: max(-0.25, -0.4) = -0.25; A=-1, rho=3: min(3.0, 2.0) = 2.0
    torch.testing.assert_close(out.loss, t([[-0.25, 2.0]]))
    torch.testing.assert_close(out.dual_clipped, t([[0.0, 1.0]]))
    assert out.dual_clipped.dtype == torch.float64


def test_clipped_value_loss_indicator_is_float():
    _, clipped = clipped_value_loss(t([[1.0]]), t([[0.0]]), t([[0.0]]), cliprange_value=0.2)
    assert clipped.dtype == torch.float64


def test_explained_variance_constant_returns_and_unit_variance():
    ret, m = t([[2.0, 2.0, 2.0]]), t([[1, 1, 1]])
    ev = explained_variance(ret - 1.0, ret, m)  # Var[R] = 0: undefined
    assert math.isnan(ev.item()) and ev.dtype == torch.float64
    ret = t([[0.0, 1.0, 2.0]])  # Var[R] = 1 exactly: an ordinary value
    v = ret - t([[0.5, -0.5, 0.5]])  # Var[R - V] = 1/3
    assert explained_variance(v, ret, m).item() == pytest.approx(2 / 3)


def test_explained_variance_from_given_variances():
    """PPO passes the variances reduced over all ranks; the tensors then only give the dtype."""
    ret, m = t([[0.0, 1.0, 2.0]]), t([[1, 1, 1]])
    assert explained_variance(ret, ret, m, variances=(t(1.0), t(4.0))).item() == 0.75
    ev = explained_variance(ret, ret, m, variances=(t(1.0), t(0.0)))  # Var[R] = 0: undefined
    assert math.isnan(ev.item()) and ev.dtype == torch.float64


def test_kl_controllers_by_hand_and_bad_settings():
    from rlx.algorithms.ppo import FixedKLController

    f = FixedKLController(0.05)
    f.update(current_kl=10.0, n_steps=100)
    assert f.value == 0.05
    c = AdaptiveKLController(0.1, target=2.0, horizon=10)
    c.update(current_kl=2.2, n_steps=5)  # error 2.2/2 - 1 = 0.1 -> * (1 + 0.1 * 0.5)
    assert c.value == pytest.approx(0.105)
    c.update(current_kl=0.0, n_steps=5)  # error -1 clipped to -0.2 -> * 0.9
    assert c.value == pytest.approx(0.0945)
    assert AdaptiveKLController(0.1, target=1.0, horizon=1).horizon == 1
    for target, horizon in ((0.0, 10), (1.0, 0), (-1.0, 10)):
        with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
            AdaptiveKLController(0.1, target=target, horizon=horizon)


# ---- second mutation-testing round (docs/testing.md): dtype, device and tie contracts ----------------------


def test_gae_runs_in_the_dtype_of_values():
    """float64 rewards with float32 values: the recursion runs in float32 (the rewards are cast first), so the
    result is bit-identical to passing float32 rewards, not a float64 recursion rounded at the end."""
    g = torch.Generator().manual_seed(0)
    r64 = torch.randn(3, 24, generator=g, dtype=torch.float64) * 0.37
    v32 = torch.randn(3, 24, generator=g)
    mask = torch.ones(3, 24)
    mask[1, 17:] = 0
    adv, ret = gae(r64, v32, mask, 0.99, 0.95)
    adv_ref, ret_ref = gae(r64.float(), v32, mask, 0.99, 0.95)
    assert adv.dtype == torch.float32 and torch.equal(adv, adv_ref) and torch.equal(ret, ret_ref)


def test_dual_clip_indicator_is_strict_at_the_bound():
    """A_t < 0 with a loss exactly at -c * A_t: the bound does not change the loss, so the token is not counted
    as dual-clipped (strict >, as the `clipped` indicator)."""
    logps = t([[1.0]])
    rho = float(torch.exp(logps))  # the ratio exactly as clipped_policy_loss computes it
    out = clipped_policy_loss(logps, torch.zeros_like(logps), t([[-1.0]]), epsilon=0.2, dual_clip=rho)
    assert float(out.loss) == rho  # -A * rho, already at the bound
    assert float(out.dual_clipped) == 0.0


def test_last_token_index_and_rewards_stay_on_the_mask_device():
    """Meta tensors carry a device but no data: a helper tensor created on the default device would clash."""
    from rlx.algorithms.ppo import last_token_index

    mask = torch.ones(2, 5, device="meta")
    assert last_token_index(mask).device.type == "meta"
    r = token_level_rewards(torch.ones(2, device="meta"), torch.ones(2, 5, device="meta"), mask, 0.1)
    assert r.device.type == "meta"
