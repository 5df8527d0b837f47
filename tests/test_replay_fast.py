"""The exact speed-ups of replay preparation against straightforward float64 references and the plain path:
lens entropy with floored exponentials, fused top-k KL and per-row head logits (values and gradients), packed
layouts, rerunning recorded layer calls, and trimming rows after the last position a loss reads."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import rlx.replay.learnable as learnable
import rlx.replay.packing as packing
import rlx.replay.streams as streams
from rlx.replay.learnable import learnable_replay
from rlx.replay.logit_lens import (
    entropy_topk,
    row_logits,
    rows_kl,
    sparse_head_kl,
    sparse_pattern,
    topk_kl,
    topk_kl_fused,
)
from rlx.replay.packing import packed_layout, padded_layout, replay_layout
from rlx.replay.streams import LayerCalls, layer_streams, rerun_streams
from rlx.replay.tiny import left_padded_batch, tiny_pair


@pytest.mark.parametrize("spread", [1.0, 30.0, 400.0], ids=["flat", "peaked", "underflowing"])
@pytest.mark.parametrize("chunk", [1000, 16384])
def test_entropy_topk_matches_float64_reference(spread, chunk):
    """Logits spread over hundreds of nats (most exponentials underflow: the floored path) and flat ones."""
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(16, 3001, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3001, 16, generator=g) * spread / 4)
        head.bias.copy_(torch.randn(3001, generator=g))
    x = torch.randn(7, 16, generator=g)
    ent, ids, vals = entropy_topk(x, head, k=50, chunk=chunk)
    with torch.no_grad():
        z = (x.double() @ head.weight.double().T) + head.bias.double()
    lp = z.log_softmax(-1)
    ref = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(ent.double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        top = head(x).topk(50)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(vals, top.values)
    if spread == 400.0:  # at least one near-delta row: entropy ~0 must stay ~0 (no cancellation)
        assert float(ref.min()) < 1e-6 and float(ent.min()) < 1e-5


def test_entropy_topk_bfloat16_matches_float32_path():
    g = torch.Generator().manual_seed(2)
    head = nn.Linear(16, 500, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(500, 16, generator=g) * 10)
    x = torch.randn(5, 16, generator=g).to(torch.bfloat16)
    ent, ids, vals = entropy_topk(x, head, k=8, chunk=128)
    z = head(x).double()
    lp = z.log_softmax(-1)
    torch.testing.assert_close(ent.double(), -(lp.exp() * lp).sum(-1), rtol=1e-4, atol=1e-4)
    assert vals.dtype == torch.bfloat16 and torch.equal(vals, head(x).topk(8).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_topk_kl_and_row_logits_match_autograd(dtype):
    g = torch.Generator().manual_seed(3)
    n, k, d = 6, 5, 8
    logp = torch.randn(n, k, generator=g, dtype=dtype).log_softmax(-1)
    rows = torch.randn(n, k, d, generator=g, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.rand(n, generator=g, dtype=dtype)

    x1 = x.clone().requires_grad_(True)
    ref = topk_kl(logp, torch.einsum("nd,nkd->nk", x1, rows))
    (g1,) = torch.autograd.grad((ref * w).sum(), x1)
    x2 = x.clone().requires_grad_(True)
    got = topk_kl_fused(row_logits(x2, rows), logp)
    (g2,) = torch.autograd.grad((got * w).sum(), x2)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g2, g1)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda z: topk_kl_fused(z, logp), ((x.detach() @ rows[0].T).requires_grad_(True),)
        )
        assert torch.autograd.gradcheck(lambda v: row_logits(v, rows), (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cache_bytes", [1, 3000, 1 << 20], ids=["block1", "block2", "one_block"])
def test_blocked_rows_kl_matches_autograd(bias, cache_bytes):
    """Blocked KL with the gradient formed in the forward = autograd through gathered logits, at logit scales
    whose softmax underflows (floored exponentials in the gradient)."""
    g = torch.Generator().manual_seed(4)
    n, k, d = 7, 6, 16
    logp = (torch.randn(n, k, generator=g) * 5).log_softmax(-1)
    rows = torch.randn(n, k, d, generator=g) * 20
    b = torch.randn(n, k, generator=g) if bias else None
    x = torch.randn(n, d, generator=g)
    w = torch.rand(n, generator=g)
    p = logp.exp()

    x1 = x.clone().requires_grad_(True)
    z = torch.einsum("nd,nkd->nk", x1, rows) + (b if bias else 0)
    ref = topk_kl(logp, z)
    (g1,) = torch.autograd.grad((ref * w).sum(), x1)
    x2 = x.clone().requires_grad_(True)
    got = rows_kl(x2, rows, b, logp, p, p.sum(-1), cache_bytes=cache_bytes)
    (g2,) = torch.autograd.grad((got * w).sum(), x2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-5)
    x64 = x.double().requires_grad_(True)
    p64 = logp.double().exp()
    assert torch.autograd.gradcheck(
        lambda v: rows_kl(v, rows.double(), None, logp.double(), p64, p64.sum(-1), cache_bytes=cache_bytes),
        (x64,),
    )


@pytest.mark.parametrize("bias", [False, True])
def test_sparse_head_kl_matches_autograd(bias):
    """The head read in place (sampled logits, embedding_bag gradient) = autograd through gathered rows."""
    g = torch.Generator().manual_seed(5)
    m, k, d, v = 9, 6, 16, 300
    w = torch.randn(v, d, generator=g) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(m)]).sort(-1).values
    b = torch.randn(v, generator=g)[ids] if bias else None
    logp = (torch.randn(m, k, generator=g) * 5).log_softmax(-1)
    x = torch.randn(m, d, generator=g)
    wt = torch.rand(m, generator=g)
    x1 = x.clone().requires_grad_(True)
    ref = topk_kl(logp, torch.einsum("nd,nkd->nk", x1, w[ids]) + (b if bias else 0))
    (g1,) = torch.autograd.grad((ref * wt).sum(), x1)
    x2 = x.clone().requires_grad_(True)
    p = logp.exp()
    got = sparse_head_kl(x2, w, sparse_pattern(ids, v, x.dtype), ids, b, logp, p, p.sum(-1))
    (g2,) = torch.autograd.grad((got * wt).sum(), x2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-5)


def test_fast_path_with_the_head_read_in_place_equals_plain_path():
    """A vocabulary large enough that the per-layer union of top-k ids exceeds 16 k: the loss reads the head in
    place for all layers at once; the plain path streams cached (N, k, d) rows layer by layer."""
    base, rl = tiny_pair("qwen2", layers=3, hidden=32, vocab=3000, noise=0.2)
    ids, mask = left_padded_batch([12, 18, 15], vocab=3000, seed=9)
    seen = []
    orig = learnable.LossPlan.__init__

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(len(self.sparse))

    learnable.LossPlan.__init__ = spy
    try:
        fast = learnable_replay(rl, base, ids, mask, mask.bool(), steps=4, lr=0.3, top_k=10)
    finally:
        learnable.LossPlan.__init__ = orig
    assert seen == [3]
    with _plain_path():
        plain = learnable_replay(rl, base, ids, mask, mask.bool(), steps=4, lr=0.3, top_k=10)
    scale = float(plain.offsets.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast.losses, plain.losses, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.offsets, plain.offsets, rtol=1e-4, atol=1e-5 * scale)


def test_packed_layout_places_every_real_token_once():
    _, rl = tiny_pair("qwen2", layers=2, hidden=32)
    ids, mask = left_padded_batch([5, 11, 8, 3], seed=1)
    lay = packed_layout(rl, ids, mask, mask.bool())
    real = mask.bool()
    assert (lay.flat[real] >= 0).all() and (lay.flat[~real] == -1).all()
    assert lay.flat[real].unique().numel() == int(real.sum())
    flat_ids = lay.input_ids.flatten()
    assert torch.equal(flat_ids[lay.flat[real]], ids[real])
    pos = (mask.cumsum(-1) - 1)[real]
    assert torch.equal(lay.position_ids.flatten()[lay.flat[real]], pos)
    assert lay.shape[0] * lay.shape[1] < ids.numel()  # the padding is gone


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_packed_streams_equal_padded_streams(arch):
    _, rl = tiny_pair(arch, layers=3, hidden=32)
    ids, mask = left_padded_batch([5, 11, 8, 3], seed=2)
    real = mask.bool()
    rows, cols = real.nonzero(as_tuple=True)
    pad = padded_layout(rl, ids, mask)
    for width_cost in [(1.0, 0.0), (1.0, 1e9)]:  # one packed row / one row per prompt
        with _costs(width_cost):
            lay = packed_layout(rl, ids, mask, real)
        ins_p, outs_p = layer_streams(rl, ids, mask, inputs=[0, 2], outputs=[1])
        ins_k, outs_k = layer_streams(
            rl, lay.input_ids, None, inputs=[0, 2], outputs=[1], position_ids=lay.position_ids
        )
        for a, b in [(ins_p[0], ins_k[0]), (ins_p[2], ins_k[2]), (outs_p[1], outs_k[1])]:
            torch.testing.assert_close(
                pad.gather(a, rows, cols), lay.gather(b, rows, cols), rtol=1e-5, atol=1e-5
            )


@contextlib.contextmanager
def _costs(value):
    old = packing._costs
    packing._costs = lambda model: value
    try:
        yield
    finally:
        packing._costs = old


@contextlib.contextmanager
def _plain_path():
    """The straightforward path: padded batch, full forward at every step, no row trimming, full last MLP."""
    old = (
        packing.can_pack,
        LayerCalls.ready,
        streams.restrict_mlp,
        learnable.sparse_head_supported,
        learnable.LossPlan.__init__,
    )
    init = old[-1]

    def per_layer(self, *args, **kwargs):  # no layers computed together
        init(self, *args, **kwargs)
        self.others, self.union = self.union + self.others, []

    packing.can_pack = lambda model, inputs: False
    LayerCalls.ready = property(lambda self: False)
    streams.restrict_mlp = lambda hooks, layer, rows: False
    learnable.sparse_head_supported = lambda device, dtype: False  # cached (N, k, d) rows instead
    learnable.LossPlan.__init__ = per_layer
    try:
        yield
    finally:
        (
            packing.can_pack,
            LayerCalls.ready,
            streams.restrict_mlp,
            learnable.sparse_head_supported,
            learnable.LossPlan.__init__,
        ) = old


@pytest.mark.parametrize("align", ["code", "paper"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fast_path_equals_plain_path(arch, align):
    """Packed, trimmed, rerun-recorded optimisation = padded full forwards at every step (losses and offsets)."""
    base, rl = tiny_pair(arch, layers=3, hidden=32, noise=0.2)
    ids, mask = left_padded_batch([5, 11, 8], seed=3)
    elig = mask.bool().clone()
    elig[:, -1] = False  # a non-eligible tail

    def run():
        return learnable_replay(rl, base, ids, mask, elig, steps=4, lr=0.3, align=align, log_final_loss=True)

    fast = run()
    with _plain_path():
        plain = run()
    scale = float(plain.offsets.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast.losses, plain.losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.offsets, plain.offsets, rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(fast.num_selected, plain.num_selected)


def test_positions_after_the_last_read_one_are_trimmed_and_stay_zero():
    """A row whose selected positions all lie before its last token: the tail is not run and its offsets stay
    exactly zero, as the plain path's (zero gradient under causal attention)."""
    base, rl = tiny_pair("qwen2", layers=2, hidden=32, noise=0.2)
    ids, mask = left_padded_batch([9, 6], seed=4)
    elig = mask.bool().clone()
    elig[0, -4:] = False  # row 0: nothing after column -5 can be selected
    seen = []
    orig = packing.packed_layout

    def spy(model, input_ids, attention_mask, keep, pad_id=0):
        seen.append(keep.clone())
        return orig(model, input_ids, attention_mask, keep, pad_id)

    packing.packed_layout = spy
    try:
        fast = learnable_replay(rl, base, ids, mask, elig, steps=3, lr=0.3)
    finally:
        packing.packed_layout = orig
    assert len(seen) == 2 and not seen[1][0, -4:].any()  # base pass keeps all, the loop drops row 0's tail
    with _plain_path():
        plain = learnable_replay(rl, base, ids, mask, elig, steps=3, lr=0.3)
    assert (fast.offsets[0, -4:] == 0).all() and (plain.offsets[0, -4:] == 0).all()
    torch.testing.assert_close(fast.offsets, plain.offsets, rtol=1e-4, atol=1e-6)


def test_rerun_streams_equal_a_full_forward_and_refuse_unchained_models():
    _, rl = tiny_pair("llama", layers=4, hidden=32)
    ids, mask = left_padded_batch([6, 4], seed=5)
    g = torch.Generator().manual_seed(0)
    off1, off2 = (torch.randn(2, 6, 32, generator=g) for _ in range(2))
    rec = LayerCalls()
    layer_streams(rl, ids, mask, inputs=[0, 3], outputs=[1], offsets=off1, record=rec)
    assert rec.ready and len(rec.calls) == 3
    ins, outs = rerun_streams(rl, rec, inputs=[0, 3], outputs=[1], offsets=off2)
    ref_in, ref_out = layer_streams(rl, ids, mask, inputs=[0, 3], outputs=[1], offsets=off2)
    for i in (0, 3):
        torch.testing.assert_close(ins[i], ref_in[i])
    torch.testing.assert_close(outs[1], ref_out[1])

    # a model that changes the stream between layers (e.g. adds deepstack features) is not rerun
    handle = rl.model.layers[1].register_forward_pre_hook(lambda m, args: (args[0] + 1.0, *args[1:]))
    try:
        rec = LayerCalls()
        layer_streams(rl, ids, mask, inputs=[2], record=rec)
    finally:
        handle.remove()
    assert rec.embeds is not None and not rec.chained and not rec.ready


def test_replay_layout_keeps_vlm_and_extra_inputs_padded():
    _, rl = tiny_pair("qwen2", layers=2, hidden=32)
    ids, mask = left_padded_batch([5, 3], seed=6)
    assert replay_layout(rl, ids, mask).packed
    assert not replay_layout(rl, ids, mask, model_inputs={"pixel_values": torch.zeros(1)}).packed


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_naive_benchmark_arm_computes_the_same_offsets(arch):
    """benchmarks/bench_replay.py's naive arm (the paper's procedure: one prompt at a time, full forwards with
    all hidden states, full-vocabulary lens) and rlx's prepare_replay give the same losses and offsets, so the
    benchmark compares the cost of one computation done two ways."""
    from benchmarks.bench_replay import naive_replay
    from rlx.replay import prepare_replay

    base, rl = tiny_pair(arch, layers=3, hidden=32, noise=0.2)
    ids, mask = left_padded_batch([5, 11, 8], seed=7)
    offsets, losses = naive_replay(rl, base, ids, mask, steps=4, lr=0.3, top_k=10)
    state = prepare_replay(rl, base, ids, mask, dict(mode="learnable", steps=4, lr=0.3, top_k=10))
    torch.testing.assert_close(state.losses, losses, rtol=1e-5, atol=1e-7)
    scale = float(offsets.abs().max())
    assert scale > 0
    torch.testing.assert_close(state.offsets, offsets, rtol=1e-4, atol=1e-5 * scale)


def test_last_layer_mlp_runs_at_read_positions_only():
    base, rl = tiny_pair("qwen2", layers=3, hidden=32, noise=0.2)
    ids, mask = left_padded_batch([7, 9], seed=8)
    rows_seen = []
    handle = rl.model.layers[1].mlp.up_proj.register_forward_pre_hook(
        lambda m, a: rows_seen.append(a[0].shape)
    )
    try:
        state = learnable_replay(rl, base, ids, mask, mask.bool(), steps=2, lr=0.3)  # code: layers 0, 1 run
    finally:
        handle.remove()
    n_last = int(state.num_selected[-1].sum())
    assert rows_seen == [torch.Size([1, n_last, 32])] * 2 and n_last < int(mask.sum())


def test_small_vocabulary_layers_are_computed_together():
    base, rl = tiny_pair("qwen2", layers=3, hidden=32, noise=0.2)
    ids, mask = left_padded_batch([7, 9], seed=10)
    from rlx.replay.hooks import decoder_parts

    targets = learnable.base_targets(base, ids, mask, mask.bool(), 3, top_k=20)
    learnable.cache_rl_head(targets, decoder_parts(rl), 20)
    plan = learnable.LossPlan(targets, decoder_parts(rl), 2)
    assert len(plan.union) == 3 and not plan.others and not plan.sparse


def test_bench_replay_gates_cpu_time_at_both_shapes(monkeypatch, capsys):
    """bench_replay exits 1 when a gated shape's learnable CPU-time prefill-equivalents exceed its limit (FLOPs
    and the naive and direct arms are reported, not gated)."""
    import benchmarks.bench_replay as bench

    def row(model, mode, cpu, flops=10.0):
        return {
            "model": model,
            "mode": mode,
            "layers": 4,
            "hidden": 8,
            "batch": 4,
            "prompt_len": 64,
            "prefill_s": 0.01,
            "prepare_s": 0.01 * cpu,
            "prefill_equivalents": cpu,
            "prefill_equivalents_min": cpu,
            "prefill_equivalents_max": cpu,
            "prefill_equivalents_flops": flops,
        }

    ok = [
        row("qwen7b_depth", "learnable", 29.0),
        row("qwen7b_depth", "naive", 120.0),
        row("embedded_shape", "learnable", 41.0, flops=100.0),
        row("embedded_shape", "direct", 2.0),
    ]
    assert bench.gate(ok) == []
    over = [row("qwen7b_depth", "learnable", 30.5), row("embedded_shape", "learnable", 42.5)]
    assert len(bench.gate(over)) == 2
    for rows, code in [(ok, 0), (over, 1)]:
        monkeypatch.setattr(bench, "run", lambda *a, rows=rows, **k: rows)
        assert bench.main([]) == code
    assert "FAIL" in capsys.readouterr().out
