"""ReLaX pure functions against independent float64 references and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlx.algorithms.stats import kl_k3
from rlx.regularizers.dictionary import fit_dictionary, init_dictionary, residual_loss
from rlx.regularizers.dsd import dispersion_from_features, dynamic_spectral_dispersion
from rlx.regularizers.koopman import dictionary_features, koopman_operator
from rlx.regularizers.loss import adaptive_kl, exploration_loss, positive_advantage

RIDGE, EPS = 1e-3, 1e-3


def relax_dsd(hidden, mask, weight, spectrum="svd"):
    k = koopman_operator(dictionary_features(hidden, weight), mask, RIDGE)
    return dynamic_spectral_dispersion(k, spectrum, EPS)


def numpy_dsd(h: np.ndarray, length: int, w: np.ndarray, spectrum="svd") -> float:
    """Independent float64 reference: ridge least squares by an augmented lstsq, no normal equations."""
    psi = 1.0 / (1.0 + np.exp(-(h[:length] @ w.T)))
    m = w.shape[0]
    px, py = psi[:-1], psi[1:]
    a = np.vstack([px, np.sqrt(RIDGE) * np.eye(m)])
    b = np.vstack([py, np.zeros((m, m))])
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    s = np.linalg.svd(k, compute_uv=False) if spectrum == "svd" else np.abs(np.linalg.eigvals(k))
    r = np.sqrt(s**2 + EPS)
    return float(np.var(r, ddof=1))


def random_batch(seed=0, b=5, t=40, d=16, m=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=torch.float64) * 2
    lengths = torch.tensor([t, t - 3, 17, 9, 2][:b])
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    weight = torch.randn(m, d, generator=g, dtype=torch.float64) * 0.5
    return hidden, mask, lengths, weight


@pytest.mark.parametrize("spectrum", ["svd", "eig"])
def test_dsd_matches_independent_float64(spectrum):
    hidden, mask, lengths, weight = random_batch()
    dsd, _ = relax_dsd(hidden, mask, weight, spectrum)
    ref = [
        numpy_dsd(hidden[i].numpy(), int(lengths[i]), weight.numpy(), spectrum) for i in range(len(lengths))
    ]
    np.testing.assert_allclose(dsd.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("t", [6, 40, 70])  # fewer and more transitions than m = 50
def test_gradient_free_lowrank_path_matches_reference(t):
    hidden, mask, lengths, weight = random_batch(seed=3, t=t)
    lengths = mask.sum(1).long()
    feats = dictionary_features(hidden, weight)
    fast, s_fast = dispersion_from_features(feats, mask, RIDGE, EPS)
    ref = [numpy_dsd(hidden[i].numpy(), int(lengths[i]), weight.numpy()) for i in range(len(lengths))]
    np.testing.assert_allclose(fast.numpy(), ref, rtol=1e-6)
    _, s_ref = relax_dsd(hidden, mask, weight)
    torch.testing.assert_close(s_fast, s_ref, rtol=1e-6, atol=1e-6)
    f32, _ = dispersion_from_features(feats.float(), mask.float(), RIDGE, EPS)
    assert f32.dtype == torch.float32


def test_dsd_fp32_close_to_float64():
    hidden, mask, lengths, weight = random_batch(seed=1)
    d64, _ = relax_dsd(hidden, mask, weight)
    d32, _ = relax_dsd(hidden.float(), mask.float(), weight.float())
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.double().numpy(), d64.numpy(), rtol=1e-3)


def test_padding_invariance():
    hidden, mask, lengths, weight = random_batch(seed=2)
    dsd, spec = relax_dsd(hidden, mask, weight)
    garbage = torch.randn(hidden.shape[0], 7, hidden.shape[2], dtype=torch.float64) * 100
    padded = torch.cat([hidden, garbage], 1)
    pmask = torch.cat([mask, torch.zeros(mask.shape[0], 7, dtype=mask.dtype)], 1)
    noisy = torch.where(pmask.bool()[..., None], padded, torch.randn_like(padded))  # junk under every pad
    dsd2, spec2 = relax_dsd(noisy, pmask, weight)
    torch.testing.assert_close(dsd2, dsd, rtol=1e-10, atol=0)
    torch.testing.assert_close(spec2, spec, rtol=1e-8, atol=1e-6)  # s = sqrt(eig(K^T K)): ~1e-8 at s = 0
    # each trajectory alone (cropped to its length) gives the same value as in the padded batch
    for i in range(len(lengths)):
        L = int(lengths[i])
        alone, _ = relax_dsd(hidden[i : i + 1, :L], None, weight)
        torch.testing.assert_close(alone[0], dsd[i], rtol=1e-10, atol=0)


def _grad_to_hidden(hidden, mask, weight, adv, group_ids, xi=1e9):
    hidden = hidden.clone().float().requires_grad_(True)
    dsd, _ = relax_dsd(hidden, mask, weight.float())
    loss, _ = exploration_loss(dsd, positive_advantage(adv), group_ids, xi)
    loss.backward()
    return loss, hidden.grad


@pytest.mark.parametrize(
    "case", ["constant", "length2", "length1", "all_masked_positions", "zero_adv", "all_over_xi"]
)
def test_finite_gradients_degenerate(case):
    torch.manual_seed(0)
    b, t, d = 4, 12, 8
    weight = init_dictionary(50, d, seed=3)
    hidden = torch.randn(b, t, d)
    mask = torch.ones(b, t)
    adv = torch.tensor([1.0, 0.5, -0.3, 2.0])
    xi = 1e9
    if case == "constant":
        hidden = torch.ones(b, t, d) * torch.randn(1, 1, d)
    elif case == "length2":
        mask[:, 2:] = 0
    elif case == "length1":
        mask[:, 1:] = 0
    elif case == "all_masked_positions":
        mask[:] = 0
    elif case == "zero_adv":
        adv = torch.tensor([-1.0, -0.5, 0.0, -2.0])
    elif case == "all_over_xi":
        xi = -1.0
    loss, grad = _grad_to_hidden(hidden, mask, weight, adv, torch.zeros(b, dtype=torch.long), xi)
    assert torch.isfinite(loss)
    assert grad is not None and torch.isfinite(grad).all()
    if case in ("zero_adv", "all_over_xi", "all_masked_positions", "length1"):
        assert float(grad.abs().max()) == 0.0
    if case == "length2":
        assert float(grad[:, 2:].abs().max()) == 0.0 and float(grad[:, :2].abs().max()) > 0


def test_exploration_loss_gradient_closed_form():
    g = torch.Generator().manual_seed(4)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    d = (torch.rand(8, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    a = positive_advantage(adv)
    loss, _ = exploration_loss(d, a, None, xi=1e9)
    (grad,) = torch.autograd.grad(loss, d)
    e = torch.exp(-a * d.detach())
    closed = -(1 / 8) * a * e / e.mean()
    torch.testing.assert_close(grad, closed, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, torch.log(e.mean()))


def test_exploration_loss_groups_and_stop_gradient():
    a = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.5, 0.0], dtype=torch.float64)
    d = torch.tensor([0.5, 3.0, 30.0, 1.0, 2.0, 40.0], dtype=torch.float64, requires_grad=True)
    gid = torch.tensor([7, 7, 7, 9, 9, 9])
    loss, z = exploration_loss(d, a, gid, xi=25.0)
    e = torch.exp(-a * d.detach())
    per_group = torch.stack([torch.log(e[:3].mean()), torch.log(e[3:].mean())])
    torch.testing.assert_close(loss, per_group.mean())
    (grad,) = torch.autograd.grad(loss, d)
    assert grad[2] == 0  # a > 0 and DSD > xi: detached
    assert grad[1] == 0 and grad[5] == 0  # a = 0: no push
    closed0 = 0.5 * -(1 / 3) * a[0] * e[0] / e[:3].mean()
    torch.testing.assert_close(grad[0], closed0)


def test_positive_advantage_code_compat_length_scaling():
    adv = torch.tensor([2.0, -1.0, 1.0])
    lengths = torch.tensor([10, 20, 30])
    torch.testing.assert_close(positive_advantage(adv), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(positive_advantage(adv, lengths, 40), torch.tensor([0.5, 0.0, 0.75]))


def test_adaptive_kl_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -20.0, -0.1]])
    tok = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    traj = torch.tensor([True, False])
    k3 = lambda lp, r: np.exp(r - lp) - (r - lp) - 1  # noqa: E731
    expected = (k3(-1.0, -1.5) + k3(-2.0, -1.0)) / 5
    torch.testing.assert_close(
        adaptive_kl(logps, ref, tok, traj), torch.tensor(expected, dtype=torch.float32)
    )
    # clamp at 10 for the huge ratio, masked trajectory 1 only
    got = adaptive_kl(logps, ref, tok, torch.tensor([False, True]))
    manual = (k3(-0.1, -0.3) + min(float(k3(-0.2, -20.0)), 10.0) + min(float(k3(-9.0, -0.1)), 10.0)) / 5
    torch.testing.assert_close(got, torch.tensor(manual, dtype=torch.float32))
    assert float(kl_k3(torch.zeros(3), torch.zeros(3)).abs().max()) == 0


def test_residual_loss_matches_numpy_and_fit_reduces_it():
    g = torch.Generator().manual_seed(5)
    n, t, d = 48, 30, 12
    a_true = torch.linalg.qr(torch.randn(d, d, generator=g))[0] * 0.95
    h = torch.zeros(n, t, d)
    h[:, 0] = torch.randn(n, d, generator=g)
    for s in range(1, t):
        h[:, s] = h[:, s - 1] @ a_true.T + 0.05 * torch.randn(n, d, generator=g)
    mask = torch.ones(n, t)
    mask[::3, 20:] = 0
    w0 = init_dictionary(50, d, seed=42)
    # numpy reference of the surrogate residual
    psi = 1 / (1 + np.exp(-(h.double().numpy() @ w0.double().numpy().T)))
    v = (mask[:, :-1] * mask[:, 1:]).bool().numpy()
    px, py = psi[:, :-1][v], psi[:, 1:][v]
    k = np.linalg.solve(px.T @ px + RIDGE * np.eye(50), px.T @ py)
    _, s_, vh = np.linalg.svd(k)
    ref = np.linalg.norm(py @ vh - (px @ vh) * s_) / n
    got = residual_loss(w0.double(), h.double(), mask.double(), RIDGE)
    np.testing.assert_allclose(float(got), ref, rtol=1e-6)
    w1, losses = fit_dictionary(h, mask, batch_size=16, epochs=15, lr=1e-2, seed=42)
    assert w1.shape == (50, d) and len(losses) == 45
    after = float(residual_loss(w1, h, mask, RIDGE))
    before = float(residual_loss(w0, h, mask, RIDGE))
    assert after < 0.9 * before, (before, after)
    w2, _ = fit_dictionary(h, mask, batch_size=16, epochs=15, lr=1e-2, seed=42)
    torch.testing.assert_close(w1, w2)  # deterministic


def test_init_dictionary_bound_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    w = init_dictionary(50, 64, seed=42)
    after = torch.rand(3)
    torch.testing.assert_close(before, after)
    assert float(w.abs().max()) <= (0.75 / 64) ** 0.5
    torch.testing.assert_close(w, init_dictionary(50, 64, seed=42))


def test_fit_budget_lowers_the_residual_and_moves_w():
    """A fit takes exactly `steps` Adam steps (reshuffled epochs over a small batch), lowers the residual on
    the whole fitting set, and moves W well away from its initialisation (default lr 1e-3)."""
    from rlx.regularizers.dictionary import dataset_loss

    g = torch.Generator().manual_seed(5)
    n, t, d = 64, 12, 64
    a_true = torch.linalg.qr(torch.randn(d, d, generator=g))[0] * 0.95
    h = torch.zeros(n, t, d)
    h[:, 0] = torch.randn(n, d, generator=g)
    for s in range(1, t):
        h[:, s] = h[:, s - 1] @ a_true.T + 0.05 * torch.randn(n, d, generator=g)
    mask = torch.ones(n, t)
    mask[::3, 8:] = 0
    w0 = init_dictionary(50, d, seed=42)
    w, losses = fit_dictionary(h, mask, steps=128, batch_size=16)
    assert len(losses) == 128  # 4 minibatches per epoch: 32 epochs
    before, after = dataset_loss(w0, h, mask, RIDGE, 16), dataset_loss(w, h, mask, RIDGE, 16)
    assert after < 0.85 * before, (before, after)
    assert np.mean(losses[-16:]) < 0.85 * np.mean(losses[:16])
    assert float((w - w0).norm() / w0.norm()) > 0.1
    _, one_epoch = fit_dictionary(h, mask, steps=0, epochs=1, batch_size=16)
    assert len(one_epoch) == 4 and one_epoch == losses[:4]  # the same first permutation
    w_none, none = fit_dictionary(h, mask, steps=0, epochs=0, batch_size=16)
    assert none == [] and torch.equal(w_none, w0)


def test_eig_spectrum_eq6_without_eps():
    """spectrum=eig with eps=0 is Eq. 6: the unbiased variance of |lambda_j| (float64 numpy reference),
    with finite gradients although most eigenvalues of a low-rank K are 0."""
    hidden, mask, lengths, weight = random_batch()
    h = hidden.clone().requires_grad_(True)
    k = koopman_operator(dictionary_features(h, weight), mask, RIDGE)
    dsd, mod = dynamic_spectral_dispersion(k, "eig", 0.0)
    for i in range(hidden.shape[0]):
        L = int(lengths[i])
        psi = 1.0 / (1.0 + np.exp(-(hidden[i, :L].numpy() @ weight.numpy().T)))
        px, py = psi[:-1], psi[1:]
        kk = np.linalg.solve(px.T @ px + RIDGE * np.eye(50), px.T @ py)
        ref = np.var(np.abs(np.linalg.eigvals(kk)), ddof=1)
        assert float(dsd[i].detach()) == pytest.approx(ref, rel=1e-6, abs=1e-12)
    smooth, _ = dynamic_spectral_dispersion(k, "eig", EPS)
    assert not torch.allclose(smooth, dsd)  # the eps variant is a different number
    dsd.sum().backward()
    assert torch.isfinite(h.grad).all()


# ---- edge cases and defaults (each pins a line a mutation test showed unchecked; docs/testing.md) ----------


def test_exploration_loss_all_positive_groups_unequal_sizes():
    """Every z_i > 0 (so the log-mean-exp shift max(-z) is not 0): the loss is still the size-weighted mean of
    log mean exp(-z) per group, in closed form."""
    a = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    d = torch.tensor([2.0, 4.0, 6.0, 1.0, 5.0], dtype=torch.float64)
    gid = torch.tensor([0, 0, 0, 1, 1])
    loss, z = exploration_loss(d, a, gid, xi=1e9)
    torch.testing.assert_close(z, a * d)
    g0 = np.log(np.mean(np.exp(-np.array([2.0, 8.0, 3.0]))))
    g1 = np.log(np.mean(np.exp(-np.array([1.5, 15.0]))))
    assert float(loss) == pytest.approx(3 / 5 * g0 + 2 / 5 * g1, rel=1e-12)
    big, _ = exploration_loss(d * 100, a, None, xi=1e9)  # exp(-z) underflows without the shift
    assert float(big) == pytest.approx(
        np.log(np.mean(np.exp(-(np.array([200.0, 800, 300, 150, 1500]) - 150)))) - 150
    )


def test_dsd_and_koopman_defaults_closed_form():
    """Defaults: singular values, eps = 1e-3, ridge = 1e-3. K = diag(3, 1): r = sqrt(s^2 + eps), unbiased var."""
    k = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))[None]
    dsd, s = dynamic_spectral_dispersion(k)
    r = np.sqrt(np.array([9.0, 1.0]) + 1e-3)
    assert float(dsd[0]) == pytest.approx((r[0] - r[1]) ** 2 / 2, rel=1e-12)
    torch.testing.assert_close(s[0], torch.tensor([3.0, 1.0], dtype=torch.float64))
    from rlx.regularizers.dsd import spectrum_moduli

    torch.testing.assert_close(spectrum_moduli(k), torch.tensor([[9.0, 1.0]], dtype=torch.float64))
    # one feature, transitions x: 1 -> 2 -> 4: K = sum x_t y_t / (sum x_t^2 + ridge) = 10 / (5 + 1e-3)
    feats = torch.tensor([[[1.0], [2.0], [4.0]]], dtype=torch.float64)
    assert float(koopman_operator(feats)[0, 0, 0]) == pytest.approx(10 / 5.001, rel=1e-12)


def test_dataset_loss_is_the_mean_over_consecutive_minibatches():
    from rlx.regularizers.dictionary import dataset_loss

    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(7, 9, 4, generator=g)
    mask = torch.ones(7, 9)
    w = init_dictionary(5, 4, 3)
    parts = [float(residual_loss(w, hidden[s : s + 3], mask[s : s + 3], RIDGE)) for s in (0, 3, 6)]
    assert dataset_loss(w, hidden, mask, RIDGE, 3) == pytest.approx(sum(parts) / 3, rel=1e-6)
    assert np.isnan(dataset_loss(w, hidden[:0], mask[:0], RIDGE, 3))  # nothing to score


def test_init_dictionary_default_seed_and_bound():
    w = init_dictionary(6, 12)
    expected = (torch.rand(6, 12, generator=torch.Generator().manual_seed(42)) * 2 - 1) * np.sqrt(0.75 / 12)
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


def _traj(n, t=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.ones(n, t)


def test_fit_dictionary_budget_defaults_init_and_seed():
    hidden, mask = _traj(130, t=4)
    _, losses = fit_dictionary(hidden, mask, dict_size=5)  # defaults: one epoch of batches of 64
    assert len(losses) == 3  # ceil(130 / 64)
    _, losses = fit_dictionary(hidden[:10], mask[:10], dict_size=5, steps=1, batch_size=4)
    assert len(losses) == 1  # steps = 1 is a budget of one step, not "use epochs"
    _, losses = fit_dictionary(hidden[:1], mask[:1], dict_size=5, steps=2)
    assert len(losses) == 2  # a single trajectory is fitted too
    # no step: the starting W is returned, from `init` or from the seeded initialisation
    init = torch.full((5, 4), 0.3)
    w, losses = fit_dictionary(hidden[:4], mask[:4], dict_size=5, epochs=0, init=init)
    assert losses == [] and torch.equal(w, init)
    w, _ = fit_dictionary(hidden[:4], mask[:4], dict_size=5, epochs=0, seed=7)
    assert torch.equal(w, init_dictionary(5, 4, 7))


def test_fit_dictionary_truncates_to_max_positions():
    hidden, mask = _traj(6, t=520, d=3, seed=1)
    kw = dict(dict_size=4, steps=2, batch_size=3)
    w_default, l_default = fit_dictionary(hidden, mask, **kw)  # max_positions = 512
    w_cut, l_cut = fit_dictionary(hidden[:, :512], mask[:, :512], max_positions=10_000, **kw)
    assert l_default == l_cut and torch.equal(w_default, w_cut)
    w_short, _ = fit_dictionary(hidden, mask, max_positions=5, **kw)
    w_ref, _ = fit_dictionary(hidden[:, :5], mask[:, :5], max_positions=10_000, **kw)
    assert torch.equal(w_short, w_ref)


def test_fit_dictionary_skips_steps_with_non_finite_gradients():
    """Constant trajectories have a finite residual but repeated singular values (non-finite SVD gradient):
    such a step is skipped, W stays finite, and later steps still run."""
    const, mask = torch.zeros(1, 8, 4), torch.ones(1, 8)
    w, losses = fit_dictionary(const, mask, dict_size=5, steps=3)
    assert losses == [] and torch.equal(w, init_dictionary(5, 4, 42))
    good, _ = _traj(1, seed=2)
    both = torch.cat([const, good])
    w, losses = fit_dictionary(both, torch.ones(2, 8), dict_size=5, steps=6, batch_size=1)
    assert len(losses) == 3 and torch.isfinite(w).all()  # the 3 steps on the good trajectory


def test_dictionary_features_promote_low_precision_and_transition_mask_holes():
    from rlx.regularizers.koopman import transition_mask

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)
    for hh, ww in ((h.bfloat16(), w), (h, w.bfloat16())):
        out = dictionary_features(hh, ww)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.sigmoid(hh.float() @ ww.float().t()))
    assert dictionary_features(h.double(), w).dtype == torch.float64
    m = torch.tensor([[1.0, 1, 1, 0], [1, 0, 1, 1]])
    assert transition_mask(m).tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


# ---- second mutation-testing round (docs/testing.md) -------------------------------------------------------


def test_dataset_loss_batches_over_trajectories_not_positions():
    """Minibatches run over the N trajectories (dim 0): with N = 7 > T = 3 there are three of them."""
    from rlx.regularizers.dictionary import dataset_loss

    g = torch.Generator().manual_seed(7)
    hidden, mask = torch.randn(7, 3, 4, generator=g), torch.ones(7, 3)
    w = init_dictionary(5, 4, 3)
    parts = [float(residual_loss(w, hidden[s : s + 3], mask[s : s + 3], RIDGE)) for s in (0, 3, 6)]
    assert dataset_loss(w, hidden, mask, RIDGE, 3) == pytest.approx(sum(parts) / 3, rel=1e-6)


def test_init_dictionary_is_float32_whatever_the_default_dtype():
    """W is drawn in float32 (same numbers) even when a caller has set another default dtype."""
    expected = init_dictionary(6, 12, seed=5)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = init_dictionary(6, 12, seed=5)
    finally:
        torch.set_default_dtype(old)
    assert w.dtype == torch.float32 and torch.equal(w, expected)


def test_koopman_operator_stays_on_the_features_device():
    """Meta tensors (a device without data): the ridge identity must be built on the features' device, in both
    the T-1 >= m and the push-through (T-1 < m) forms."""
    for t, m in ((6, 3), (3, 5)):
        feats = torch.empty(2, t, m, device="meta")
        assert koopman_operator(feats).device.type == "meta"
        assert koopman_operator(feats, torch.empty(2, t, device="meta")).device.type == "meta"
