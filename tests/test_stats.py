"""Masked statistics and KL estimators (rlx/algorithms/stats.py) against hand-computed float64 numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algorithms.stats import (
    KL_ESTIMATORS,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

f64 = dict(dtype=torch.float64)


def t(x):
    return torch.tensor(x, **f64)


# ---- masked statistics ---------------------------------------------------------------------------------


def test_masked_reductions_per_row_and_bessel_edges():
    x = t([[1.0, 2.0, 7.0], [3.0, 5.0, 5.0], [4.0, 4.0, 4.0]])
    m = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(masked_sum(x, m, 1), t([3.0, 3.0, 0.0]))
    torch.testing.assert_close(masked_sum(x, m), t(6.0))
    # per-row means: a one-token row divides by 1, an empty row by max(0, 1) = 1 (never by zero)
    torch.testing.assert_close(masked_mean(x, m, 1), t([1.5, 3.0, 0.0]))
    # three masked entries 1, 2, 3: mean 2, sum of squares 2 -> unbiased 1, biased 2/3
    torch.testing.assert_close(masked_var(x, m), t(1.0))
    torch.testing.assert_close(masked_var(x, m, unbiased=False), t(2.0 / 3))
    two = t([[1.0, 3.0]])  # N = 2: unbiased divides by 1
    torch.testing.assert_close(masked_var(two, torch.ones_like(two)), t(2.0))
    one = t([[5.0, 9.0]])  # N = 1: no Bessel correction, variance 0 (not 0/0)
    torch.testing.assert_close(masked_var(one, t([[1, 0]])), t(0.0))


def test_masked_mean_and_var_by_hand_with_columns_and_bool_mask():
    # masked entries 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squared deviations 32 -> biased 4, unbiased 32/7
    x = t([[2.0, 4.0, 4.0, 4.0, -1.0], [5.0, 5.0, 7.0, 9.0, 100.0]])
    m = t([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(masked_mean(x, m), t(5.0))
    torch.testing.assert_close(masked_var(x, m, unbiased=False), t(4.0))
    torch.testing.assert_close(masked_var(x, m), t(32.0 / 7))
    # over dim 0 (columns): the last column has no masked entry and gives 0
    torch.testing.assert_close(masked_mean(x, m, 0), t([3.5, 4.5, 5.5, 6.5, 0.0]))
    # a bool mask gives the same numbers as the float one
    torch.testing.assert_close(masked_mean(x, m.bool(), 1), t([3.5, 6.5]))
    torch.testing.assert_close(masked_var(x, m.bool()), t(32.0 / 7))


def test_masked_whiten_by_hand():
    # masked entries 1, 2, 3, 4: mean 2.5, unbiased var = 5/3
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    s = math.sqrt(5 / 3)
    expected = t([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(expected[0, 0], t(-1.1618950038622251))
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-12
    unshifted = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(unshifted, (expected + 2.5) * mask, rtol=0, atol=1e-8)


def test_masked_whiten_eps_and_given_moments():
    x, m = t([[1.0, 2.0, 3.0, 4.0]]), t([[1, 1, 1, 1]])
    # eps enters as sqrt(var + eps): var = 5/3, eps = 1 -> divide by sqrt(8/3)
    torch.testing.assert_close(masked_whiten(x, m, eps=1.0), (x - 2.5) / math.sqrt(8 / 3))
    # moments from elsewhere (e.g. reduced over ranks) replace the local ones
    out = masked_whiten(x, m, eps=0.0, moments=(t(1.0), t(4.0)))
    torch.testing.assert_close(out, (x - 1.0) / 2.0)


# ---- KL estimators -------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    lp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), t([math.log(2)]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), t([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), t([0.5 - 1 + math.log(2)]))
    with pytest.raises(ValueError, match="unknown KL estimator 'k9': expected k1, k2 or k3"):
        kl_estimate(lp, ref, "k9")


def test_kl_functions_by_hand_both_sides():
    # pi = (0.5, 0.2), pi_ref = (0.25, 0.6): r = (0.5, 3)
    lp, ref = t([math.log(0.5), math.log(0.2)]), t([math.log(0.25), math.log(0.6)])
    torch.testing.assert_close(kl_k1(lp, ref), t([math.log(2), -math.log(3)]))
    torch.testing.assert_close(kl_k2(lp, ref), t([0.5 * math.log(2) ** 2, 0.5 * math.log(3) ** 2]))
    # k3 = r - 1 - log r: (0.5 - 1 + log 2, 3 - 1 - log 3), >= 0 even where k1 < 0
    torch.testing.assert_close(kl_k3(lp, ref), t([math.log(2) - 0.5, 2 - math.log(3)]))
    assert (kl_k3(lp, ref) >= 0).all()
    assert float(kl_k3(lp, lp).abs().max()) == 0  # pi = pi_ref: exactly 0
    for name, fn in KL_ESTIMATORS.items():
        assert torch.equal(kl_estimate(lp, ref, name), fn(lp, ref))


def test_kl_estimate_default_is_k1():
    lp, ref = t([math.log(0.5), math.log(0.1)]), t([math.log(0.25), math.log(0.3)])
    torch.testing.assert_close(kl_estimate(lp, ref), lp - ref)


def test_kl_k3_is_trls_expression_bit_for_bit():
    """kl_k3 is written exp(d) - d - 1 with d = ref - logp (TRL's GRPO loss, verl's low_var_kl, the ReLaX
    authors' code), not expm1(d) - d: the same bits in float32, so a loss built on it matches theirs exactly."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(64, 16, generator=g) * 5
    ref = -torch.rand(64, 16, generator=g) * 5
    d = ref - lp
    assert torch.equal(kl_k3(lp, ref), torch.exp(d) - d - 1)
    assert kl_k3(lp, ref).dtype == torch.float32
