"""The `correctness_probe` monitor: its math against hand-computed values and independent references, a planted
signal (found) and shuffled labels (chance), the instrument on a synthetic seam (positions, gradients, dumps,
freeze, resume), update alignment on a real tiny model against a separate forward, and a grpo_tiny run."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from rlx import dumps
from rlx.algorithms import correctness as cm
from rlx.algorithms.probing import auroc
from rlx.config.schema import CorrectnessProbeConfig
from rlx.errors import UserError
from rlx.instruments.base import LossContext
from rlx.instruments.catalog import registered_instruments
from rlx.instruments.correctness_probe import PREFIX, resolve_layers
from rlx.run import RunContext
from rlx.storage import DiagnosticsWriter

# ---- math ------------------------------------------------------------------------------------------------------


def planted(seed, n_groups=32, k=8, d=64, delta=6.0, shuffle=False):
    """States with a prompt offset, noise and delta * u added to the correct rollouts; labels shuffled on request."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    u = torch.randn(d, generator=g, dtype=dt)
    u /= u.norm()
    groups = torch.arange(n_groups).repeat_interleave(k)
    p = torch.rand(n_groups, generator=g, dtype=dt)[groups]
    y = torch.rand(len(groups), generator=g, dtype=dt) < p
    h = torch.randn(n_groups, d, generator=g, dtype=dt)[groups] + torch.randn(
        len(groups), d, generator=g, dtype=dt
    )
    h = h + delta * y[:, None].double() * u
    if shuffle:
        y = y[torch.randperm(len(y), generator=g)]
    return h, y, groups, u


@pytest.mark.parametrize("method", ["diff_means", "logistic"])
def test_planted_signal_is_found_and_shuffled_labels_give_chance(method):
    """Acceptance (issue #17): a planted linear signal gives held-out AUROC > 0.95, shuffled labels about 0.5."""
    found, chance = [], []
    for seed in range(20):
        for shuffle, out in ((False, found), (True, chance)):
            h, y, groups, u = planted(seed, shuffle=shuffle)
            fit, held = cm.group_split(groups)
            v, n = cm.fit_direction(h[fit], y[fit], groups[fit], method)
            assert n >= 8 and abs(float(v.norm()) - 1) < 1e-12
            out.append(auroc(h[held] @ v, y[held]))
            if not shuffle:
                assert float(v @ u) > 0.7  # the planted axis (64 dims, 128 fit rollouts), not some other one
    assert min(found) > 0.95, found
    assert abs(sum(chance) / len(chance) - 0.5) < 0.05 and max(abs(a - 0.5) for a in chance) < 0.2, chance


def test_diff_of_means_is_the_mean_over_mixed_groups_of_the_class_mean_difference():
    h = torch.tensor(
        [
            [1.0, 0.0],  # group 0: correct
            [3.0, 0.0],  # group 0: correct
            [0.0, 1.0],  # group 0: wrong
            [0.0, 0.0],  # group 1: correct
            [1.0, 1.0],  # group 1: wrong
            [3.0, 3.0],  # group 1: wrong
            [5.0, 5.0],  # group 2: correct only (not mixed: left out)
            [7.0, -7.0],  # group 3: wrong only
        ]
    )
    y = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0]).bool()
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])
    # group 0: (2, 0) - (0, 1) = (2, -1); group 1: (0, 0) - (2, 2) = (-2, -2); mean (0, -1.5)
    v, n = cm.diff_of_means(h, y, groups)
    assert n == 2 and torch.equal(v, torch.tensor([0.0, -1.5], dtype=torch.float64))
    unit, n = cm.fit_direction(h, y, groups)
    assert n == 2 and torch.equal(unit, torch.tensor([0.0, -1.0], dtype=torch.float64))
    assert cm.diff_of_means(h[6:], y[6:], groups[6:]) == (None, 0)
    assert torch.equal(cm.mixed_groups(y, groups), torch.tensor([0, 1]))


def _logistic_reference(x, y, l2):
    """The documented objective minimised directly over (w, b) in the full space by L-BFGS (no basis reduction)."""
    n, d = x.shape
    s = math.sqrt(float((x**2).sum(1).mean()) / d)
    z, t = x / s, y.double() * 2 - 1
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        f = nn.functional.softplus(-t * (z @ w + b)).mean() + 0.5 * l2 * (w @ w)
        f.backward()
        return f

    opt.step(closure)
    return w.detach()


@pytest.mark.parametrize("n_per_group,d", [(6, 40), (12, 5)])  # fewer rollouts than dims, and more
def test_logistic_direction_minimises_the_documented_objective(n_per_group, d):
    g = torch.Generator().manual_seed(3)
    groups = torch.arange(6).repeat_interleave(n_per_group)
    y = torch.rand(len(groups), generator=g) < 0.5
    y[::n_per_group], y[1::n_per_group] = True, False  # every group mixed
    h = (
        torch.randn(len(groups), d, generator=g, dtype=torch.float64)
        + 3 * torch.randn(6, d, generator=g)[groups]
    )
    h[:, 0] += 1.5 * y.double()
    h = torch.cat([h, torch.randn(4, d, dtype=torch.float64)])  # a non-mixed group: left out of the fit
    y = torch.cat([y, torch.ones(4, dtype=torch.bool)])
    groups = torch.cat([groups, torch.full((4,), 99)])
    w, n = cm.logistic_direction(h, y, groups, l2=0.05)
    assert n == 6
    keep = groups != 99
    x, gk = h[keep].clone(), groups[keep]
    for u in gk.unique():
        x[gk == u] -= x[gk == u].mean(0)
    ref = _logistic_reference(x, y[keep], 0.05)
    assert cm.cosine(w, ref) > 1 - 1e-8
    s = math.sqrt(float((x**2).sum(1).mean()) / d)
    torch.testing.assert_close(
        w, ref, rtol=1e-5, atol=1e-7 * s
    )  # w is in the scaled units, like the reference
    with pytest.raises(ValueError, match="l2=0"):
        cm.logistic_direction(h, y, groups, l2=0)


def test_group_split_pairwise_accuracy_cosine_and_positions():
    fit, held = cm.group_split(torch.tensor([5, 5, 2, 2, 9, 9, 7]))
    # distinct ids 2, 5, 7, 9: fit = {2, 7}, held-out = {5, 9}
    assert fit.tolist() == [False, False, True, True, False, False, True] and torch.equal(held, ~fit)
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 5.0])
    y = torch.tensor([1, 0, 1, 0, 1, 1]).bool()
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    # group 0: 3 > 1 (1 pair won); group 1: tie (1/2); group 2: no wrong one
    assert cm.pairwise_accuracy(s, y, g) == (0.75, 2)
    assert math.isnan(cm.pairwise_accuracy(s[4:], y[4:], g[4:])[0])
    assert cm.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(2**-0.5, abs=1e-15)
    assert math.isnan(cm.cosine(None, torch.ones(2))) and math.isnan(cm.cosine(torch.zeros(2), torch.ones(2)))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    pos, has = cm.answer_final_positions(5, mask)
    assert pos.tolist() == [7, 5, 0, 8] and has.tolist() == [True, True, False, True]
    pos, has = cm.answer_final_positions(5, mask, offset=1)  # the token before the last
    assert pos.tolist() == [6, 0, 0, 7] and has.tolist() == [True, False, False, True]
    grad = torch.arange(2 * 9 * 1, dtype=torch.float64).reshape(2, 9, 1)  # value = 9 * row + position
    # rows 0/1 of mask: positions 4, 5, 6 (predicting completion columns 0..2) and position 4
    assert cm.response_gradient(grad, 5, mask[:2]).tolist() == [4 + 5 + 6 + 13]
    lp = torch.tensor([[-1.0, -3.0, 5.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = cm.mean_logp(lp, m)
    assert out[0] == -2.0 and math.isnan(out[1])


def test_resolve_layers():
    assert resolve_layers(None, 4) == [2, 4] and resolve_layers(None, 1) == [1]
    assert resolve_layers([-1, 0, 3, 4], 4) == [4, 0, 3] and resolve_layers([-5], 4) == [0]
    with pytest.raises(UserError, match=r"5 is out of range for a model with 4 blocks: expected 0..4"):
        resolve_layers([5], 4)
    with pytest.raises(UserError, match="out of range"):
        resolve_layers([-6], 4)


# ---- the instrument on a synthetic seam --------------------------------------------------------------------------

P, C, D, K = 3, 5, 12, 8  # prompt width, completion width, residual width, rollouts per group


class FakePolicy(nn.Module):
    base_model_prefix = "model"

    def __init__(self, n_blocks=4):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Identity() for _ in range(n_blocks)])
        self.model.embed = nn.Embedding(3, D)

    def get_input_embeddings(self):
        return self.model.embed


def fake_trainer(step=0, policy=None):
    return SimpleNamespace(
        state=SimpleNamespace(global_step=step),
        model=policy if policy is not None else FakePolicy(),
        args=SimpleNamespace(),
        accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")),
        rlx_algo="grpo",
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def make(tmp_path, trainer=None, **kw):
    cfg = OmegaConf.structured(
        CorrectnessProbeConfig(**{"enabled": True, "every": 2, "layers": [2, 4], **kw})
    )
    run = RunContext(cfg=None, run_dir=tmp_path, writer=DiagnosticsWriter(tmp_path))
    inst = registered_instruments()[PREFIX](cfg, run)
    inst.on_train_begin(trainer or fake_trainer())
    return inst


U = torch.nn.functional.normalize(torch.arange(1.0, D + 1), dim=0)
C1 = torch.nn.functional.normalize(
    torch.cos(torch.arange(D * 1.0)), dim=0
)  # loss weight on response positions
C2 = torch.nn.functional.normalize(torch.sin(torch.arange(D * 1.0)), dim=0)  # on every other position


def seam_batch(trainer, seed, n_groups=12, rows=None, sign=1.0, logp_signal=0.3):
    """One micro-batch (rows `rows` of the step's batch): states with +sign * 6 u on correct rollouts at the
    answer-final token and the opposite at the token before (reading an off-by-one position gives AUROC < 0.5);
    loss = sum over response positions of <h, C1> plus sum over the other positions of <h, C2>, so dL/dh is known."""
    g = torch.Generator().manual_seed(seed)
    b = n_groups * K
    groups = torch.arange(n_groups).repeat_interleave(K) + 100 * seed
    y = torch.rand(b, generator=g) < torch.rand(n_groups, generator=g)[torch.arange(b) // K]
    lengths = torch.randint(2, C + 1, (b,), generator=g)
    cmask = (torch.arange(C)[None] < lengths[:, None]).float()
    states = {}
    for layer in (2, 4):
        h = (
            torch.randn(b, P + C, D, generator=g)
            + torch.randn(n_groups, 1, D, generator=g)[torch.arange(b) // K]
        )
        last = P + lengths - 1
        h[torch.arange(b), last] += sign * 6.0 * y[:, None].float() * U
        h[torch.arange(b), last - 1] -= sign * 6.0 * y[:, None].float() * U
        states[layer] = h
    token_logps = torch.zeros(b, P + C - 1)
    token_logps[:, -C:] = (
        -1.0 + logp_signal * y[:, None].float() + 0.5 * torch.randn(b, C, generator=g)
    ) * cmask
    sl = slice(*rows) if rows is not None else slice(None)
    groups, y, lengths, cmask, token_logps = groups[sl], y[sl], lengths[sl], cmask[sl], token_logps[sl]
    b = len(y)
    taps = {f"{PREFIX}/L{layer}": h[sl].clone().requires_grad_(True) for layer, h in states.items()}
    resp = torch.zeros(b, P + C)
    for i in range(b):
        resp[i, P - 1 : P - 1 + int(lengths[i])] = 1
    loss = sum(
        ((t * resp[..., None]) @ C1).sum() + ((t * (1 - resp)[..., None]) @ C2).sum() for t in taps.values()
    )
    inputs = {
        "prompt_ids": torch.zeros(b, P, dtype=torch.long),
        "completion_ids": torch.ones(b, C, dtype=torch.long),
        "completion_mask": cmask,
    }
    mask = torch.zeros(b, P + C - 1)
    mask[:, -C:] = cmask
    offset = 0 if rows is None else rows[0]
    extras = {
        "group_ids": groups,
        "sample_ids": 1000 * seed + offset + torch.arange(b),
        "rewards": y.double(),
        "completion_len": C,
    }
    return LossContext(trainer, "grpo", inputs, loss, token_logps, mask, None, extras=extras, taps=taps)


def run_step(inst, trainer, step, seed, halves=True, **kw):
    """Measured step `step` (1-based) over two micro-batches; returns the metrics it logged."""
    trainer.state.global_step = step - 1
    assert set(inst.taps(trainer.model)) == {f"{PREFIX}/L2", f"{PREFIX}/L4"}
    n = 12 * K
    for rows in ((0, n // 2), (n // 2, n)) if halves else (None,):
        inst.on_loss(seam_batch(trainer, seed, rows=rows, **kw))
    trainer.state.global_step = step
    inst.on_step_end(trainer)
    return dict(inst.last_metrics)


def test_instrument_reads_the_answer_final_token_and_the_response_gradient(tmp_path):
    trainer = fake_trainer()
    inst = make(tmp_path, trainer)
    trainer.state.global_step = 1  # the coming step 2 is measured (every=2), step 3 is not
    assert inst.taps(trainer.model) != {}
    trainer.state.global_step = 2
    assert inst.taps(trainer.model) == {}
    m = run_step(inst, trainer, 1, seed=0)
    for layer in (2, 4):
        assert m[f"{PREFIX}/L{layer}/auroc"] > 0.95  # read at P + len - 1, not at the anti-signal before it
        assert m[f"{PREFIX}/L{layer}/cos_to_first"] == pytest.approx(1.0)
        # g = sum over response positions of C1 (the C2 positions are excluded): cos(v, -g) = -cos(v, C1)
        v = inst.first[layer]
        assert m[f"{PREFIX}/L{layer}/update_cos"] == pytest.approx(-cm.cosine(v, C1.double()), abs=1e-6)
    assert m[f"{PREFIX}/auroc"] == m[f"{PREFIX}/L2/auroc"] and m[f"{PREFIX}/n_fit_groups"] >= 2
    assert 0.5 < m[f"{PREFIX}/auroc_logp"] < m[f"{PREFIX}/auroc"]
    assert m[f"{PREFIX}/gap"] == pytest.approx(m[f"{PREFIX}/auroc"] - m[f"{PREFIX}/auroc_logp"])
    assert trainer._metrics["train"][f"{PREFIX}/auroc"] == [m[f"{PREFIX}/auroc"]]
    # the direction found is +u at the last token; token_offset=1 reads the token before it, where it is -u
    assert all(cm.cosine(inst.first[layer], U) > 0.9 for layer in (2, 4))
    before = make(tmp_path / "before", fake_trainer(), token_offset=1)
    assert run_step(before, before._trainer, 1, seed=0)[f"{PREFIX}/auroc"] > 0.95
    assert all(cm.cosine(before.first[layer], U) < -0.9 for layer in (2, 4))
    # one micro-batch with all rows gives the same step (rows and gradients are summed over micro-batches)
    other = make(tmp_path / "one", fake_trainer())
    m1 = run_step(other, other._trainer, 1, seed=0, halves=False)
    assert m1.keys() == m.keys()
    for k in m:
        assert m1[k] == pytest.approx(m[k], rel=1e-9, abs=1e-12), k


def test_dumps_match_the_metrics_and_recompute(tmp_path):
    trainer = fake_trainer()
    inst = make(tmp_path, trainer)
    m = run_step(inst, trainer, 1, seed=0)
    diag = tmp_path / "diagnostics" / PREFIX
    table = pd.read_parquet(diag / "step_000001.parquet")
    assert list(table.columns) == dumps.CORRECTNESS_PROBE.columns and table["layer"].tolist() == [2, 4]
    for _, r in table.iterrows():
        for k in ("auroc", "gap", "pairwise_acc", "cos_to_first", "update_cos"):
            assert r[k] == pytest.approx(m[f"{PREFIX}/L{r['layer']}/{k}"])
        assert r["auroc_logp"] == m[f"{PREFIX}/auroc_logp"] and r["fit_step"] == 1 and not r["frozen"]
    scores = pd.read_parquet(diag / "scores_step_000001.parquet")
    assert len(scores) == 2 * 12 * K and scores["sample_id"].nunique() == 12 * K
    from safetensors import safe_open

    with safe_open(str(diag / "directions_step_000001.safetensors"), "pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}
        assert fh.metadata()["direction"] == "diff_means"
    for i, layer in enumerate(t["layers"].tolist()):
        held = scores[(scores.layer == layer) & scores.heldout]
        assert auroc(torch.tensor(held.score.values), torch.tensor(held.correct.values)) == pytest.approx(
            m[f"{PREFIX}/L{layer}/auroc"]
        )
        assert auroc(torch.tensor(held.mean_logp.values), torch.tensor(held.correct.values)) == pytest.approx(
            m[f"{PREFIX}/auroc_logp"]
        )
        assert cm.cosine(t["used"][i], -t["grad"][i]) == pytest.approx(
            m[f"{PREFIX}/L{layer}/update_cos"], abs=1e-6
        )
        # the fitted direction is the difference of means of the fit half's rollouts, recomputed from the scores
        torch.testing.assert_close(t["fitted"][i], t["used"][i])
        fit = scores[(scores.layer == layer) & ~scores.heldout]
        assert set(fit.group_id) & set(held.group_id) == set()


def test_freeze_drift_too_few_groups_and_resume(tmp_path):
    trainer = fake_trainer()
    frozen = make(tmp_path / "f", trainer, freeze=True)
    free = make(tmp_path / "n", fake_trainer())
    run_step(frozen, trainer, 1, seed=0)
    run_step(free, free._trainer, 1, seed=0)
    # step 2: the signal flips sign; the free probe refits (still AUROC > 0.95), the frozen one reads it backwards
    mf = run_step(frozen, trainer, 2, seed=1, sign=-1.0)
    mn = run_step(free, free._trainer, 2, seed=1, sign=-1.0)
    assert mn[f"{PREFIX}/auroc"] > 0.95 and mf[f"{PREFIX}/auroc"] < 0.05
    assert (
        mn[f"{PREFIX}/cos_to_first"] < -0.9 and mf[f"{PREFIX}/cos_to_first"] == mn[f"{PREFIX}/cos_to_first"]
    )
    table = pd.read_parquet(tmp_path / "f/diagnostics" / PREFIX / "step_000002.parquet")
    assert table["fit_step"].tolist() == [1, 1] and table["frozen"].all()
    # resume: a fresh instrument with the state continues identically
    state = frozen.state_dict()
    torch.save(state, tmp_path / "s.pt")
    again = make(tmp_path / "r", fake_trainer(), freeze=True)
    again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    a = run_step(frozen, trainer, 4, seed=2)
    b = run_step(again, again._trainer, 4, seed=2)
    assert a == b
    # too few mixed groups in the fit half: NaN direction metrics, none logged, no error
    few = make(tmp_path / "few", fake_trainer(), min_mixed_groups=50)
    m = run_step(few, few._trainer, 1, seed=0)
    assert math.isnan(m[f"{PREFIX}/auroc"]) and math.isnan(m[f"{PREFIX}/update_cos"]) and few.first == {}
    assert f"{PREFIX}/auroc" not in few._trainer._metrics["train"]
    assert f"{PREFIX}/auroc_logp" in few._trainer._metrics["train"]


def test_bad_options_are_user_errors(tmp_path):
    for kw, match in (
        ({"direction": "pca"}, "direction='pca': expected one of diff_means, logistic"),
        ({"l2": 0.0}, "l2=0.0: expected a number > 0"),
        ({"every": 0}, "every=0"),
        ({"min_mixed_groups": 0}, "min_mixed_groups=0"),
        ({"layers": []}, "layers=\\[\\]"),
        ({"token_offset": -1}, "token_offset=-1"),
    ):
        with pytest.raises(UserError, match=match):
            make(tmp_path, **kw)
    with pytest.raises(UserError, match="out of range for a model with 4 blocks"):
        make(tmp_path, layers=[7])
    cfg = OmegaConf.structured(CorrectnessProbeConfig(enabled=True))
    run = RunContext(cfg=SimpleNamespace(algo="dpo"), run_dir=tmp_path)
    with pytest.raises(UserError, match="needs rollouts with rewards: algo grpo\\|rloo\\|reinforce_pp\\|ppo"):
        registered_instruments()[PREFIX](cfg, run)


# ---- update alignment on a real tiny model -------------------------------------------------------------------


def test_update_cos_equals_a_separate_forward_on_a_tiny_model(tmp_path):
    """cos(v, -g) from the seam (taps, one autograd call on the trainer-shaped loss) equals the same quantity from a
    separate forward with output_hidden_states: v = diff of means of hidden_states[l] at the last completion token
    of the fit half, g = sum of d loss / d hidden_states[l] over the response positions."""
    from trl.trainer.utils import add_fused_lm_head

    from rlx.config.schema import EmbeddedModelConfig
    from rlx.embedded import build_model, build_tokenizer
    from rlx.instruments.base import capture_loss_forward

    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    policy = build_model(shape, tok, seed=0)
    g = torch.Generator().manual_seed(0)
    b, p, c, n_groups = 24, 4, 5, 6
    prompt_ids = torch.randint(7, len(tok), (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[::3, 0] = 0  # left padding
    completion_ids = torch.randint(7, len(tok), (b, c), generator=g)
    lengths = torch.randint(1, c + 1, (b,), generator=g)
    cmask = (torch.arange(c)[None] < lengths[:, None]).long()
    groups = torch.arange(b) // (b // n_groups)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0] * n_groups)
    adv = rewards - 0.5
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, cmask], 1)

    def loss_of(lp):  # a GRPO-shaped loss on the completion log-probs
        return -(adv[:, None] * lp * cmask).sum() / cmask.sum()

    # reference: a separate plain forward, without the seam
    out = policy(input_ids=ids, attention_mask=att, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    hs = out.hidden_states
    ref_loss = loss_of(logp[:, -c:])
    layers = [1, 2]  # hidden_states[l] is the tap for l < L (the last entry is post-norm)
    grads = torch.autograd.grad(ref_loss, [hs[layer] for layer in layers])
    pos = p + lengths - 1
    y = rewards >= 1
    fit, held = cm.group_split(groups)
    expect = {}
    for layer, gr in zip(layers, grads):
        h = hs[layer].detach()[torch.arange(b), pos].double()
        v, _ = cm.diff_of_means(h[fit], y[fit], groups[fit])
        gsum = torch.zeros(hs[layer].shape[-1], dtype=torch.float64)
        for i in range(b):
            gsum += gr[i, p - 1 : p - 1 + int(lengths[i])].double().sum(0)
        expect[layer] = (cm.cosine(v, -gsum), auroc(h[held] @ v, y[held]))

    # the seam: the fused-head loss forward with the instrument's taps
    add_fused_lm_head(policy)
    trainer = fake_trainer(policy=policy)
    inst = make(tmp_path, trainer, layers=layers, every=1, min_mixed_groups=1)
    with capture_loss_forward(policy, hidden=False, taps=inst.taps(policy)) as cap:
        lp = policy(input_ids=ids, attention_mask=att, labels=ids, fused_lm_head=True).log_probs
    mask = torch.zeros(b, p + c - 1)
    mask[:, -c:] = cmask
    extras = {"group_ids": groups, "sample_ids": torch.arange(b), "rewards": rewards, "completion_len": c}
    inputs = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "completion_mask": cmask}
    ctx = LossContext(
        trainer, "grpo", inputs, loss_of(lp[:, -c:]), lp, mask, None, extras=extras, taps=cap.taps
    )
    inst.on_loss(ctx)
    trainer.state.global_step = 1
    inst.on_step_end(trainer)
    for layer in layers:
        cos, auc = expect[layer]
        assert abs(cos) > 1e-3  # a real, nonzero alignment
        assert inst.last_metrics[f"{PREFIX}/L{layer}/update_cos"] == pytest.approx(cos, abs=1e-5)
        assert inst.last_metrics[f"{PREFIX}/L{layer}/auroc"] == pytest.approx(auc, abs=1e-9)
    ctx.loss.backward()  # the graph was kept for the trainer's backward


# ---- grpo_tiny -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_tiny_with_the_monitor(run_recipe):
    from analysis.loader import Run
    from analysis.measures import correctness_probe as measure
    from tests.conftest import read_metrics

    run = run_recipe(
        "grpo_tiny",
        "trainer.max_steps=4",
        "trainer.per_device_train_batch_size=64",
        "trainer.num_generations=8",
        "eval.num_prompts=16",
        "eval.before_after=false",
        "trainer.report_to=[]",
        "diagnostics.correctness_probe.enabled=true",
        "diagnostics.correctness_probe.every=2",
        "diagnostics.correctness_probe.layers=[2,-1]",
        "diagnostics.correctness_probe.min_mixed_groups=1",
    )
    rows = read_metrics(run)
    measured = [r for r in rows if f"{PREFIX}/auroc_logp" in r or f"{PREFIX}/accuracy" in r]
    assert [r["step"] for r in measured] == [1, 2, 4]
    table = Run(run).read(dumps.CORRECTNESS_PROBE)
    assert sorted(table["step"].unique()) == [1, 2, 4] and sorted(table["layer"].unique()) == [2, 4]
    scores = Run(run).read(dumps.CORRECTNESS_PROBE_SCORES)
    for r in measured:
        t = table[table.step == r["step"]].set_index("layer")
        assert t["n_rollouts"].iloc[0] == 64
        assert r[f"{PREFIX}/accuracy"] == pytest.approx(t["accuracy"].iloc[0])
        for layer in (2, 4):
            for k in ("auroc", "gap", "update_cos", "cos_to_first"):
                key = f"{PREFIX}/L{layer}/{k}"
                if math.isfinite(t.loc[layer, k]):
                    assert r[key] == pytest.approx(t.loc[layer, k], rel=1e-6)
                else:
                    assert key not in r
            s = scores[(scores.step == r["step"]) & (scores.layer == layer) & scores.heldout]
            if math.isfinite(t.loc[layer, "auroc"]):
                assert auroc(torch.tensor(s.score.values), torch.tensor(s.correct.values)) == pytest.approx(
                    t.loc[layer, "auroc"]
                )
            assert math.isfinite(t.loc[layer, "update_cos"]) and t.loc[layer, "update_norm"] > 0
        assert r[f"{PREFIX}/auroc"] == pytest.approx(r[f"{PREFIX}/L2/auroc"])
    first = table[table.step == 1]
    assert first["cos_to_first"].tolist() == pytest.approx([1.0, 1.0]) and (first["fit_step"] == 1).all()
    df = measure.correctness_probe(Run(run))
    assert len(df) == 6 and set(df.columns) >= {"step", "layer", "auroc", "auroc_logp", "gap", "cos_to_first"}


# ---- analysis ------------------------------------------------------------------------------------------------


def test_reader_report_section_and_metrics_fallback(tmp_path):
    """Dumps written through the declarations feed the reader, best-of-N, drift and the report section; a run with
    only the logged metrics still gives the table."""
    import json
    import re

    from analysis import report
    from analysis.loader import Run, RunSet
    from analysis.measures import correctness_probe as measure
    from analysis.synthetic import make_run

    run_dir = make_run(tmp_path / "run", "grpo", steps=4)
    trainer = fake_trainer()
    inst = registered_instruments()[PREFIX](
        OmegaConf.structured(CorrectnessProbeConfig(enabled=True, every=2, layers=[2, 4])),
        RunContext(cfg=None, run_dir=run_dir, writer=DiagnosticsWriter(run_dir)),
    )
    inst.on_train_begin(trainer)
    logged = {s: run_step(inst, trainer, s, seed=s) for s in (1, 2, 4)}
    run = Run(run_dir)
    df = measure.correctness_probe(run)
    assert df[["step", "layer"]].values.tolist() == [[1, 2], [1, 4], [2, 2], [2, 4], [4, 2], [4, 4]]
    for _, r in df.iterrows():
        assert r["auroc"] == pytest.approx(logged[r["step"]][f"{PREFIX}/L{r['layer']}/auroc"])
    drift = measure.direction_drift(run)
    torch.testing.assert_close(
        torch.tensor(drift["cos_to_first"].values), torch.tensor(df["cos_to_first"].values), atol=1e-6, rtol=0
    )
    bon = measure.best_of_n(run)
    assert (
        len(bon) == 6
        and (bon["probe"] <= bon["oracle"]).all()
        and (bon["probe"] >= 0.9 * bon["oracle"]).all()
    )
    sec = report.correctness_probe_section(RunSet([run]))
    assert sec.title == "Correctness probe (training rollouts)"
    html = "".join(sec.parts)
    assert len(re.findall(r"<img\b", html)) == 1 and "Best of N" in html and "Last measured step" in html
    # metrics only (the monitor's dumps removed): the per-layer metrics become the table
    only = make_run(tmp_path / "metrics_only", "grpo", steps=4)
    rows = [json.loads(line) for line in (only / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.update(logged.get(r["step"], {}))
    (only / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fb = measure.correctness_probe(Run(only))
    assert fb[["step", "layer"]].values.tolist() == df[["step", "layer"]].values.tolist()
    for k in ("auroc", "gap", "update_cos", "auroc_logp", "accuracy"):
        assert fb[k].tolist() == pytest.approx(df[k].tolist()), k


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_straight_one(tmp_path, tiny_model_dir):
    """SIGKILL after step 4 (checkpoint at 3), resume: the frozen first direction comes from the checkpoint, and the
    metrics and every correctness_probe file equal those of an uninterrupted run."""
    from tests.test_resume import assert_same_diagnostics, assert_same_metrics, killed_and_resumed, train

    args = [
        "recipe=grpo_tiny",
        "diagnostics.correctness_probe.enabled=true",
        "diagnostics.correctness_probe.every=2",
        "diagnostics.correctness_probe.freeze=true",
        "diagnostics.correctness_probe.min_mixed_groups=1",
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
    table = pd.read_parquet(run / "diagnostics" / PREFIX / "step_000006.parquet")
    assert table["frozen"].all() and (table["fit_step"] == 1).all()
