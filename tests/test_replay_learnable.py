"""Learnable-token replay: loss against a float64 reference, batch independence, descent, early stop, lens."""

from __future__ import annotations

import copy

import pytest
import torch

import rlx.replay.learnable as learnable_module
from rlx.replay import HookSet, prepare_replay
from rlx.replay.hooks import decoder_parts
from rlx.replay.learnable import learnable_replay
from rlx.replay.logit_lens import entropy_topk, kl_entropies, rms_norm
from rlx.replay.tiny import left_padded_batch, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2", layers=3, hidden=32, noise=0.2)


def _reference_losses(base, rl, ids, mask, eligible, n_layers, rho, k, align):
    """Step-0 per-sample loss from HF hidden_states in float64, written out position by position."""
    b64, r64 = copy.deepcopy(base).double(), copy.deepcopy(rl).double()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    hb = b64(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    hr = r64(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    depth = len(hb) - 1

    def lens(model, h, layer_out):  # HF's last hidden state is already normed (the released code's exception)
        x = h if layer_out == depth else model.model.norm(h)
        return model.lm_head(x)

    out = []
    for i in range(ids.shape[0]):
        e = eligible[i].nonzero().flatten()
        total = 0.0
        for layer in range(n_layers):
            zb = lens(b64, hb[layer + 1][i, e], layer + 1)
            ent = -(zb.log_softmax(-1).exp() * zb.log_softmax(-1)).sum(-1)
            sel = ent <= rho * ent.max()
            r_idx = layer if align == "code" else layer + 1
            zr = lens(r64, hr[r_idx][i, e], r_idx)
            top = zb[sel].topk(k, -1).indices
            logp = zb[sel].gather(-1, top).log_softmax(-1)
            logq = zr[sel].gather(-1, top).log_softmax(-1)
            total += float((logp.exp() * (logp - logq)).sum(-1).mean()) if sel.any() else 0.0
        out.append(total / len(e))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("align", ["code", "paper"])
def test_step0_loss_matches_float64_reference(pair, align):
    base, rl = pair
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    state = learnable_replay(
        rl, base, ids, mask, mask.bool(), steps=0, log_final_loss=True, align=align, top_k=20
    )
    ref = _reference_losses(base, rl, ids, mask, mask.bool(), 3, 0.4, 20, align)
    assert state.num_layers == 3 and state.losses.shape == (1, 3)
    torch.testing.assert_close(state.losses[0].double(), ref, rtol=1e-4, atol=1e-5)


def test_batched_offsets_equal_per_sample_offsets(pair):
    base, rl = pair
    lengths = [4, 12, 7]
    ids, mask = left_padded_batch(lengths, seed=4)
    cfg = dict(mode="learnable", steps=5, lr=1e-3)
    batched = prepare_replay(rl, base, ids, mask, cfg)
    assert batched.offsets.abs().amax() > 1e-4
    for i, n in enumerate(lengths):
        single = prepare_replay(rl, base, ids[i : i + 1, -n:], mask[i : i + 1, -n:], cfg)
        torch.testing.assert_close(batched.offsets[i, -n:], single.offsets[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batched.losses[:, i], single.losses[:, 0], rtol=1e-4, atol=1e-6)
        assert batched.offsets[i, :-n].abs().sum() == 0  # pads never move


def test_loss_decreases_and_offsets_stay_on_eligible_positions(pair):
    base, rl = pair
    ids, mask = left_padded_batch([6, 10], seed=5)
    eligible = mask.bool().clone()
    eligible[:, -2:] = False  # e.g. chat-template tail
    state = learnable_replay(rl, base, ids, mask, eligible, steps=10, lr=1e-3, log_final_loss=True)
    assert state.losses.shape == (11, 2)
    assert (state.losses[-1] < 0.5 * state.losses[0]).all()
    assert (state.offsets[~eligible] == 0).all() and (state.offsets[eligible].abs().sum(-1) > 0).any()
    assert (state.num_selected > 0).all() and (state.num_selected <= eligible.sum(1)).all()


def test_optimisation_forward_stops_after_last_loss_layer():
    base, rl = tiny_pair("llama", layers=4, hidden=32)
    ids, mask = left_padded_batch([6], seed=6)
    calls = {i: 0 for i in range(4)}
    with HookSet() as hooks:
        for i, layer in enumerate(rl.model.layers):
            hooks.post(layer, lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        learnable_replay(rl, base, ids, mask, mask.bool(), num_layers=2, steps=3, lr=1e-3, align="code")
        assert calls == {0: 3, 1: 0, 2: 0, 3: 0}  # code: inputs of layers 0 and 1 need layer 0 only
        calls.update({i: 0 for i in range(4)})
        learnable_replay(rl, base, ids, mask, mask.bool(), num_layers=2, steps=3, lr=1e-3, align="paper")
        assert calls == {0: 3, 1: 3, 2: 0, 3: 0}


def test_num_layers_capped_at_depth_and_bf16_fp32_lens():
    base, rl = tiny_pair("qwen3", layers=2, hidden=32, dtype=torch.bfloat16)
    ids, mask = left_padded_batch([5, 8], seed=7)
    state = prepare_replay(rl, base, ids, mask, dict(mode="learnable", steps=2, lr=1e-3, fp32=True))
    assert state.num_layers == 2 and state.offsets.dtype == torch.bfloat16
    assert torch.isfinite(state.losses).all()


def test_chunked_lens_matches_full_softmax(pair):
    base, rl = pair
    pb, pr = decoder_parts(base), decoder_parts(rl)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 32, generator=g) * 3
    xb, xr = (
        rms_norm(pb.norm, h, fp32=True),
        rms_norm(pr.norm, h + 0.3 * torch.randn(9, 32, generator=g), True),
    )
    torch.testing.assert_close(xb, base.model.norm(h))
    ent, ids, vals = entropy_topk(xb, pb.head, k=5, chunk=13)
    zb = base.lm_head(xb).double()
    lp = zb.log_softmax(-1)
    torch.testing.assert_close(ent.double(), -(lp.exp() * lp).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals.double(), zb.topk(5).values)
    stats = kl_entropies(xb, pb.head, xr, pr.head, chunk=10)
    lq = rl.lm_head(xr).double().log_softmax(-1)
    torch.testing.assert_close(stats["kl"].double(), (lp.exp() * (lp - lq)).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["entropy_q"].double(), -(lq.exp() * lq).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["top1_agree"], lp.argmax(-1) == lq.argmax(-1))


def test_prepare_works_under_inference_mode(pair):
    """Evaluation code may run under torch.inference_mode; the offsets are still optimised."""
    base, rl = pair
    ids, mask = left_padded_batch([4, 7], seed=8)
    ref = prepare_replay(rl, base, ids, mask, dict(mode="learnable", lr=1e-3, steps=3))
    with torch.inference_mode():
        got = prepare_replay(rl, base, ids, mask, dict(mode="learnable", lr=1e-3, steps=3))
    torch.testing.assert_close(got.offsets, ref.offsets)
    assert got.offsets.abs().sum() > 0 and all(p.requires_grad is False for p in rl.parameters())


@pytest.mark.parametrize(
    "max_gathered, sparse",
    [(1 << 30, False), (0, False), (0, True)],
    ids=["cached_rows", "per_step_gather", "head_in_place"],
)
def test_head_row_caching_does_not_change_the_result(pair, monkeypatch, max_gathered, sparse):
    """The (N, U) union matmul (default for a small vocabulary), the cached (N, k, d) rows, the per-step
    gather and the head read in place (sparse, all layers batched) give the same losses and offsets."""
    base, rl = pair
    ids, mask = left_padded_batch([5, 11, 8], seed=3)

    def run():
        return learnable_replay(rl, base, ids, mask, mask.bool(), steps=3, lr=0.5, top_k=20)

    ref = run()
    assert ref.offsets.abs().sum() > 0

    def no_union(targets, rl_parts, top_k, dtype=None):
        for t in targets:
            if t.rows.numel():
                t.cache_head(rl_parts.head, 0, max_gathered, sparse)
                assert t.head_rows is None and t.sparse == sparse
                assert (t.gathered_rows is not None) == (max_gathered > 0 and not sparse)

    monkeypatch.setattr(learnable_module, "cache_rl_head", no_union)
    other = run()
    scale = float(ref.offsets.abs().max())  # float32 sums in another order: compare at the offsets' scale
    torch.testing.assert_close(other.losses, ref.losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(other.offsets, ref.offsets, rtol=1e-4, atol=1e-5 * scale)
