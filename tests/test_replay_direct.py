"""Direct replacement: mask rule against a reference, replacement at the RL prefill, thresholds."""

from __future__ import annotations

import pytest
import torch

from rlx.errors import UserError
from rlx.replay import HookSet, inject, prepare_replay
from rlx.replay.hooks import decoder_parts, hidden_from
from rlx.replay.logit_lens import entropy_topk, rms_norm
from rlx.replay.streams import layer_streams
from rlx.replay.tiny import left_padded_batch, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("llama", layers=3, hidden=32, noise=0.3)


def _entropy(model, h):
    p = decoder_parts(model)
    return entropy_topk(rms_norm(p.norm, h.reshape(-1, h.shape[-1])), p.head, 1)[0].reshape(h.shape[:-1])


def test_mask_rule_matches_reference(pair):
    base, rl = pair
    ids, mask = left_padded_batch([5, 9, 7], seed=1)
    state = prepare_replay(rl, base, ids, mask, dict(mode="direct", direct_num_layers=2, rho=0.6))
    _, b_out = layer_streams(base, ids, mask, outputs=range(2))
    _, r_out = layer_streams(rl, ids, mask, outputs=range(2))
    real = mask.bool()
    for layer in range(2):  # code alignment: entropies at layer outputs, replacement at layer inputs
        hb, hr = _entropy(base, b_out[layer]), _entropy(rl, r_out[layer])
        hmax = hb.masked_fill(~real, -1).amax(1, keepdim=True)
        ref = real & (hb <= 0.6 * hmax) & (hb < hr)
        assert torch.equal(state.masks[layer], ref)
    assert state.masks.any() and not state.masks[:, ~real].any()


def test_prefill_inputs_are_replaced_at_masked_positions_only(pair):
    base, rl = pair
    ids, mask = left_padded_batch([6, 9], seed=2)
    state = prepare_replay(rl, base, ids, mask, dict(mode="direct", direct_num_layers=2, rho=1.0))
    own_in, _ = layer_streams(rl, ids, mask, inputs=[0])
    seen = {}
    with inject(rl, state):
        with HookSet() as hooks:  # registered after the replay hooks, so it sees the replaced input
            for i in range(2):
                hooks.pre(
                    rl.model.layers[i], lambda m, a, k, i=i: seen.__setitem__(i, hidden_from(a, k).clone())
                )
            rl(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    for i in range(2):
        m = state.masks[i]
        assert m.any()
        torch.testing.assert_close(seen[i][m], state.base_inputs[i][m])
    m0 = state.masks[0]
    torch.testing.assert_close(seen[0][~m0], own_in[0][~m0])


def test_absolute_thresholds(pair):
    base, rl = pair
    ids, mask = left_padded_batch([6, 9], seed=3)
    cfg = dict(mode="direct", direct_num_layers=2, direct_require_lower=False)
    none = prepare_replay(rl, base, ids, mask, dict(cfg, direct_thresholds=[0.0, 0.0]))
    every = prepare_replay(rl, base, ids, mask, dict(cfg, direct_thresholds=[99.0, 99.0]))
    assert not none.masks.any() and torch.equal(every.masks, mask.bool().expand(2, -1, -1))
    with pytest.raises(UserError, match="direct_thresholds"):
        prepare_replay(rl, base, ids, mask, dict(cfg, direct_thresholds=[1.0]))


def test_entropies_in_fp32_for_a_bf16_model():
    """replay.fp32 upcasts the lens for the mask entropies: for a bf16 norm and head the entropies are within
    fp32 round-off of a float64 reference (a bf16 lens is off by ~1e-2 nats)."""
    from types import SimpleNamespace

    from rlx.replay.direct import _entropies

    g = torch.Generator().manual_seed(0)
    d, v = 16, 40
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter((1 + 0.2 * torch.randn(d, generator=g)).to(torch.bfloat16))
    norm.variance_epsilon = 1e-6
    head = torch.nn.Linear(d, v, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
    h = (3 * torch.randn(2, 5, d, generator=g)).to(torch.bfloat16)
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 3, 0, 4])
    got = _entropies(SimpleNamespace(norm=norm, head=head), {0: h}, rows, cols, True, 7)[0]
    x = h[rows, cols].double()
    z = (
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    ) @ head.weight.double().T
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
