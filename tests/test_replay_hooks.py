"""Activation Replay hooks: layer lookup, exception safety, prefill-only injection, zero-offset identity."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rlx.errors import UserError
from rlx.replay import HookSet, count_hooks, decoder_parts, inject, prepare_replay, replay_generate
from rlx.replay.hooks import StopForward
from rlx.replay.tiny import ARCHS, left_padded_batch, tiny_pair

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    return tiny_pair(request.param, layers=3, hidden=32, noise=0.2)


def test_decoder_parts_text_models(pair):
    base, rl = pair
    parts = decoder_parts(rl)
    assert parts.depth == 3 and parts.layers is rl.model.layers
    assert parts.norm is rl.model.norm and parts.head is rl.lm_head
    assert parts.image_token_ids == ()


def _tiny_qwen25_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32),
        image_token_id=120,
        video_token_id=121,
        vision_start_token_id=122,
        vision_end_token_id=123,
    )
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        base.lm_head.weight.mul_(100.0)
    rl = Qwen2_5_VLForConditionalGeneration(cfg).eval().requires_grad_(False)
    rl.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in rl.parameters():
            if p.numel() > 1:
                p.add_(0.1 * p.std() * torch.randn_like(p))
    return base, rl


def test_decoder_parts_qwen25_vl_layout():
    _, model = _tiny_qwen25_vl()
    parts = decoder_parts(model)
    assert parts.layers is model.model.language_model.layers
    assert parts.norm is model.model.language_model.norm and parts.head is model.lm_head
    assert parts.image_token_ids == (120, 121)


def test_qwen25_vl_replay_acts_on_image_pads_only():
    """One image (4x4 patches -> 4 merged pad tokens): offsets live on the pads; zero steps = plain generate."""
    base, rl = _tiny_qwen25_vl()
    ids = torch.tensor([[5, 6, 122, 120, 120, 120, 120, 123, 7, 8, 9]])
    mask = torch.ones_like(ids)
    image = dict(
        pixel_values=torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
    )
    state = prepare_replay(rl, base, ids, mask, dict(mode="learnable", lr=1e-3, steps=2), **image)
    assert state.eligible.tolist() == [[False] * 3 + [True] * 4 + [False] * 4]
    norms = state.offsets.norm(dim=-1)[0]
    assert (norms[3:7] > 0).any() and (norms[:3] == 0).all() and (norms[7:] == 0).all()
    before = count_hooks(rl)
    plain = rl.generate(input_ids=ids, attention_mask=mask, **image, **GREEDY)
    zero = replay_generate(rl, base, ids, mask, dict(mode="learnable", steps=0), model_inputs=image, **GREEDY)
    assert torch.equal(plain, zero) and count_hooks(rl) == before


def test_unknown_layout_is_a_user_error():
    with pytest.raises(UserError, match="cannot find decoder layers"):
        decoder_parts(torch.nn.Linear(2, 2))


def test_hookset_removes_all_hooks_when_forward_raises(pair):
    _, rl = pair
    before = count_hooks(rl)
    with pytest.raises(StopForward):
        with HookSet() as hooks:
            for layer in rl.model.layers:
                hooks.pre(layer, lambda m, a, k: None)

            def boom(m, a, o):
                raise StopForward

            hooks.post(rl.model.layers[1], boom)
            assert hooks.active == 4 and count_hooks(rl) == before + 4
            rl(torch.tensor([[3, 4, 5]]))
    assert count_hooks(rl) == before


def test_no_hook_left_after_generate_raises(pair):
    base, rl = pair
    ids, mask = left_padded_batch([5, 8])
    before = count_hooks(rl)

    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise ValueError("boom inside generate")

    for mode in ("learnable", "direct"):
        with pytest.raises(ValueError, match="boom"):
            replay_generate(
                rl,
                base,
                ids,
                mask,
                dict(mode=mode, steps=2),
                logits_processor=LogitsProcessorList([Boom()]),
                **GREEDY,
            )
        assert count_hooks(rl) == before


@pytest.mark.parametrize("mode", ["learnable", "direct"])
def test_decode_steps_carry_no_hook(pair, mode):
    """The prefill fires each armed hook exactly once; by the first decode step none is left on the model."""
    base, rl = pair
    ids, mask = left_padded_batch([5, 9, 7])
    baseline = count_hooks(rl)
    seen = []

    class Spy(LogitsProcessor):  # runs after every forward, i.e. before each decode step
        def __call__(self, input_ids, scores):
            seen.append(count_hooks(rl))
            return scores

    state = prepare_replay(rl, base, ids, mask, dict(mode=mode, steps=3, rho=1.0, direct_require_lower=False))
    with inject(rl, state) as log:
        assert count_hooks(rl) > baseline
        rl.generate(
            input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([Spy()]), **GREEDY
        )
    assert seen == [baseline] * GREEDY["max_new_tokens"]
    layers = range(state.num_layers) if mode == "direct" else [0]
    assert log.fired == {i: 1 for i in layers} and log.batch_sizes in ([3], [])


@pytest.mark.parametrize("mode", ["learnable", "direct"])
def test_zero_replay_is_token_identical(pair, mode):
    """0 steps (offsets 0) / empty masks: identical to plain generate, left padded, greedy and K samples."""
    base, rl = pair
    ids, mask = left_padded_batch([4, 9, 6], seed=1)
    cfg = dict(mode=mode, steps=0, direct_thresholds=[-1.0] * 3)
    plain = rl.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    replayed = replay_generate(rl, base, ids, mask, cfg, **GREEDY)
    assert torch.equal(plain, replayed)
    sample = dict(GREEDY, do_sample=True, num_return_sequences=3, top_k=0, max_new_tokens=8)
    torch.manual_seed(7)
    plain = rl.generate(input_ids=ids, attention_mask=mask, **sample)
    torch.manual_seed(7)
    replayed = replay_generate(rl, base, ids, mask, cfg, **sample)
    assert plain.shape[0] == 9 and torch.equal(plain, replayed)


def test_num_return_sequences_expands_offsets(pair):
    """K samples of B prompts use the same offsets as B·K repeated prompts (repeat-interleave order)."""
    base, rl = pair
    ids, mask = left_padded_batch([4, 9], seed=2)
    state = prepare_replay(rl, base, ids, mask, dict(mode="learnable", steps=3, lr=1e-3))
    assert state.offsets.abs().sum() > 0
    sample = dict(GREEDY, do_sample=True, top_k=0, max_new_tokens=8)
    torch.manual_seed(3)
    with inject(rl, state):
        expanded = rl.generate(input_ids=ids, attention_mask=mask, num_return_sequences=3, **sample)
    state.offsets = state.offsets.repeat_interleave(3, 0)
    torch.manual_seed(3)
    with inject(rl, state):
        repeated = rl.generate(
            input_ids=ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0), **sample
        )
    assert torch.equal(expanded, repeated)


def test_prefill_length_mismatch_raises_and_cleans_up(pair):
    base, rl = pair
    ids, mask = left_padded_batch([4, 6])
    state = prepare_replay(rl, base, ids, mask, dict(mode="learnable", steps=0))
    before = count_hooks(rl)
    with pytest.raises(RuntimeError, match="sequence length"):
        with inject(rl, state):
            rl.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], **GREEDY)
    assert count_hooks(rl) == before


# ---- unit contracts of the hook helpers (mutation testing, docs/testing.md) --------------------------------


class _ToyLM(torch.nn.Module):
    """model.layers / model.norm / lm_head layout without transformers; config says whether it is a VLM."""

    def __init__(self, n_layers=1, image_token_id=None, rope_index=False):
        super().__init__()
        from types import SimpleNamespace

        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(n_layers)])
        self.model.norm = torch.nn.LayerNorm(2)
        self.lm_head = torch.nn.Linear(2, 3)
        self.config = SimpleNamespace(image_token_id=image_token_id, video_token_id=None)
        if rope_index:
            self.get_rope_index = lambda *a, **k: None

    def get_output_embeddings(self):
        return self.lm_head


class _PeftWrapper(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base


def test_decoder_parts_one_layer_peft_bare_and_empty_layouts():
    from rlx.replay.hooks import decoder_parts

    one = _ToyLM(n_layers=1)
    assert decoder_parts(one).depth == 1 and decoder_parts(one).layers is one.model.layers
    # PEFT: the layers are looked up in get_base_model(); an attribute that is not callable is ignored
    assert decoder_parts(_PeftWrapper(one)).layers is one.model.layers
    odd = _ToyLM(n_layers=2)
    odd.get_base_model = "not callable"
    assert decoder_parts(odd).layers is odd.model.layers

    class Bare(torch.nn.Module):  # a bare decoder: `layers` and `norm` on the model itself
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.norm = torch.nn.LayerNorm(2)
            self.head = torch.nn.Linear(2, 3)

        def get_output_embeddings(self):
            return self.head

    bare = Bare()
    parts = decoder_parts(bare)
    assert parts.layers is bare.layers and parts.norm is bare.norm and parts.head is bare.head
    with pytest.raises(UserError, match="cannot find decoder layers"):
        decoder_parts(_ToyLM(n_layers=0))  # an empty layer list is not a decoder


def test_hidden_and_output_helpers_positional_and_keyword():
    from rlx.replay.hooks import hidden_from, layer_output, with_hidden

    h, h2, extra = torch.zeros(1), torch.ones(1), torch.full((1,), 7.0)
    assert hidden_from((h, extra), {}) is h
    assert hidden_from((), {"hidden_states": h}) is h
    args, kwargs = with_hidden((h, extra), {"k": 1}, h2)
    assert args[0] is h2 and args[1] is extra and len(args) == 2 and kwargs == {"k": 1}
    args, kwargs = with_hidden((), {"hidden_states": h, "k": 1}, h2)
    assert args == () and kwargs["hidden_states"] is h2 and kwargs["k"] == 1
    assert layer_output((h, extra)) is h and layer_output([h, extra]) is h and layer_output(h) is h


class _Cache:
    def __init__(self, n, takes_layer=True):
        self.n, self.takes_layer = n, takes_layer

    def get_seq_length(self, *layer):
        if layer and not self.takes_layer:
            raise TypeError("get_seq_length() takes no layer index")
        return self.n


def test_is_prefill_reads_the_layer_cache():
    from rlx.replay.hooks import is_prefill

    assert is_prefill({}, 0) and is_prefill({"past_key_values": None}, 0)
    assert is_prefill({"past_key_values": _Cache(0)}, 0)
    assert not is_prefill({"past_key_values": _Cache(5)}, 0)
    assert not is_prefill({"past_key_value": _Cache(5)}, 0)  # older transformers: singular keyword
    assert is_prefill({"past_key_value": _Cache(0)}, 0)
    assert is_prefill({"past_key_values": _Cache(0, takes_layer=False)}, 1)
    assert not is_prefill({"past_key_values": _Cache(1, takes_layer=False)}, 1)


def test_hookset_post_with_kwargs_and_unremovable_hooks_raise():
    lin = torch.nn.Linear(2, 2)
    seen = []
    with HookSet() as hooks:
        hooks.post(lin, lambda m, a, k, o: seen.append(sorted(k)), with_kwargs=True)
        lin(input=torch.zeros(1, 2))
    assert seen == [["input"]] and count_hooks(lin) == 0
    hooks = HookSet()
    handle = hooks.pre(lin, lambda m, a, k: None)
    handle.remove = lambda: None  # a hook that cannot be taken off
    with pytest.raises(RuntimeError, match="could not be removed"):
        hooks.remove_all()
    lin._forward_pre_hooks.clear()


def test_prefill_position_ids_text_models_and_vlms():
    from rlx.replay.hooks import prefill_position_ids

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert prefill_position_ids(_ToyLM(), mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert prefill_position_ids(_ToyLM(image_token_id=9), mask) is None  # a VLM: M-RoPE positions of its own
    assert prefill_position_ids(_ToyLM(rope_index=True), mask) is None
    assert prefill_position_ids(_PeftWrapper(_ToyLM(rope_index=True)), mask) is None


def test_decoder_parts_skips_layouts_without_norm_or_head():
    """A layer list whose owner has no `norm`, or a model without an output embedding, is not a decoder layout;
    the lookup goes on to the next path and fails with a UserError when none fits."""
    from rlx.replay.hooks import decoder_parts

    no_norm = _ToyLM()
    del no_norm.model.norm
    with pytest.raises(UserError, match="cannot find decoder layers"):
        decoder_parts(no_norm)

    class NoHead(torch.nn.Module):
        def __init__(self, with_getter):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.norm = torch.nn.LayerNorm(2)
            if with_getter:
                self.get_output_embeddings = lambda: None

    for with_getter in (False, True):
        with pytest.raises(UserError, match="cannot find decoder layers"):
            decoder_parts(NoHead(with_getter))
    # model.language_model.layers without a norm beside it, then model.layers with one: the second is used
    vlm_like = _ToyLM(n_layers=2)
    vlm_like.model.language_model = torch.nn.Module()
    vlm_like.model.language_model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    assert decoder_parts(vlm_like).layers is vlm_like.model.layers
