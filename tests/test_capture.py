"""`capture_loss_forward` (rlx/instruments/base.py): what it records, and that it raises rather than hand the
instruments nothing when the block ran no capturable loss forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlx.instruments.base import capture_loss_forward


class Backbone(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return SimpleNamespace(last_hidden_state=self.proj(x))


class ToyPolicy(nn.Module):
    """A policy shaped like an HF causal LM with TRL's fused head: `model` is the backbone; a forward called with
    `fused_lm_head=True` returns per-token `log_probs` (B, S-1) instead of logits."""

    base_model_prefix = "model"

    def __init__(self, skip_backbone: bool = False, no_log_probs: bool = False):
        super().__init__()
        self.model = Backbone()
        self.head = nn.Linear(4, 3)
        self.skip_backbone, self.no_log_probs = skip_backbone, no_log_probs

    def forward(self, x, fused_lm_head: bool = False, rlx_capture: bool = False):
        h = x if self.skip_backbone else self.model(x).last_hidden_state
        logits = self.head(h)
        if not (fused_lm_head or rlx_capture) or self.no_log_probs:
            return SimpleNamespace(logits=logits)
        lp = torch.log_softmax(logits, -1)[:, :-1, 0]
        return SimpleNamespace(log_probs=lp, entropy=-lp, label_mask=torch.ones_like(lp, dtype=torch.bool))


def no_hooks(policy: ToyPolicy) -> bool:
    mods = (policy, policy.model)
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in mods)


def test_records_log_probs_and_hidden_of_the_loss_forward_only():
    policy, x = ToyPolicy(), torch.randn(2, 5, 4)
    with capture_loss_forward(policy) as cap:
        policy(x)  # a plain forward (generation, logits) is not recorded
        out = policy(x, fused_lm_head=True)
    assert torch.equal(cap.token_logps, out.log_probs) and cap.token_logps.shape == (2, 4)
    assert cap.hidden.shape == (2, 5, 4) and cap.label_mask.dtype == torch.float32
    assert no_hooks(policy)
    # TRL chunks a loss forward over sub-batches: the pieces are concatenated back
    with capture_loss_forward(policy, hidden=False) as cap:
        policy(x[:1], fused_lm_head=True)
        policy(x[1:], rlx_capture=True)
    assert cap.token_logps.shape == (2, 4) and cap.hidden is None


@pytest.mark.parametrize("body", ["nothing", "plain_forward"])
def test_raises_when_no_loss_forward_ran(body):
    policy = ToyPolicy()
    with pytest.raises(
        RuntimeError, match=r"saw no loss forward of ToyPolicy: expected .*fused_lm_head=True"
    ):
        with capture_loss_forward(policy):
            if body == "plain_forward":
                policy(torch.randn(1, 3, 4))
    assert no_hooks(policy)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"no_log_probs": True}, r"saw 1 loss forward\(s\) of ToyPolicy but none returned log_probs"),
        ({"skip_backbone": True}, r"no hidden states: the backbone Backbone of ToyPolicy did not run"),
    ],
)
def test_raises_when_the_loss_forward_lacks_log_probs_or_hidden_states(kw, match):
    policy = ToyPolicy(**kw)
    with pytest.raises(RuntimeError, match=match):
        with capture_loss_forward(policy, hidden=True):
            policy(torch.randn(1, 3, 4), fused_lm_head=True)
    assert no_hooks(policy)


def test_hidden_states_not_asked_for_are_not_required():
    policy = ToyPolicy(skip_backbone=True)
    with capture_loss_forward(policy, hidden=False) as cap:
        policy(torch.randn(1, 3, 4), fused_lm_head=True)
    assert cap.token_logps.shape == (1, 2) and cap.hidden is None


def test_an_error_in_the_block_propagates_unchanged():
    policy = ToyPolicy()
    with pytest.raises(ValueError, match="from the loss"):
        with capture_loss_forward(policy):
            raise ValueError("from the loss")
    assert no_hooks(policy)


def test_a_real_causal_lm_with_trls_fused_head():
    from trl.trainer.utils import add_fused_lm_head

    from rlx.config.schema import EmbeddedModelConfig
    from rlx.embedded import build_model, build_tokenizer

    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    policy = build_model(shape, tok, seed=0)
    add_fused_lm_head(policy)
    ids = torch.randint(7, len(tok), (2, 6))
    with capture_loss_forward(policy) as cap:
        policy(input_ids=ids, labels=ids, fused_lm_head=True)
    assert cap.token_logps.shape[0] == 2 and cap.hidden.shape == (2, 6, 16)
    with pytest.raises(RuntimeError, match="saw no loss forward"):
        with capture_loss_forward(policy):
            policy(input_ids=ids)  # logits only: not TRL's loss path


def test_a_no_grad_reference_pass_through_the_policy_is_left_out():
    """TRL's DPO with a PEFT policy and no reference model runs the reference forward through the policy itself
    (adapters off, no grad) inside the loss: only the forward with grad is the policy's. Without any forward
    with grad (evaluation), the forwards are kept."""
    policy, x = ToyPolicy(), torch.randn(2, 5, 4)
    with capture_loss_forward(policy) as cap:
        out = policy(x, fused_lm_head=True)
        with torch.no_grad():
            policy(x + 1.0, fused_lm_head=True)  # the reference pass
    assert torch.equal(cap.token_logps, out.log_probs) and cap.token_logps.requires_grad
    assert cap.hidden.shape == (2, 5, 4) and cap.hidden.requires_grad
    assert cap.entropy.shape == (2, 4) and cap.label_mask.shape == (2, 4)
    with torch.no_grad(), capture_loss_forward(policy) as cap:
        out = policy(x, fused_lm_head=True)
    assert torch.equal(cap.token_logps, out.log_probs) and cap.hidden.shape == (2, 5, 4)


def test_taps_record_block_outputs_and_mlp_inputs_of_the_loss_forward_only():
    """`taps`: a block's output equals HF's hidden_states[l] (the residual stream after block l; 0 = embeddings),
    a `down_proj` input is the MLP's z; both only from the loss forward, hooks removed after."""
    from trl.trainer.utils import add_fused_lm_head

    from rlx.config.schema import EmbeddedModelConfig
    from rlx.embedded import build_model, build_tokenizer
    from rlx.instruments.base import Tap, decoder_layers, residual_tap

    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    policy = build_model(shape, tok, seed=0)
    ids = torch.randint(7, len(tok), (2, 6))
    with torch.no_grad():
        ref = policy(input_ids=ids, output_hidden_states=True).hidden_states
    add_fused_lm_head(policy)
    hooks_before = {id(m): len(m._forward_hooks) for m in policy.modules()}
    down = decoder_layers(policy)[1].mlp.down_proj
    z = {}
    handle = down.register_forward_hook(lambda m, a, o: z.update(z=a[0].detach()))
    taps = {f"l{i}": residual_tap(policy, i) for i in range(3)} | {"z": Tap(down, "input")}
    with capture_loss_forward(policy, taps=taps) as cap:
        policy(input_ids=ids)  # a plain forward first: not recorded
        z.clear()
        policy(input_ids=ids, labels=ids, fused_lm_head=True)
    handle.remove()
    for i in range(
        2
    ):  # embeddings and block 1 output; block 2 (the last) is pre-norm, HF's last entry post-norm
        torch.testing.assert_close(cap.taps[f"l{i}"], ref[i])
    assert cap.taps["l2"].shape == (2, 6, 16) and not torch.allclose(cap.taps["l2"], ref[2])
    torch.testing.assert_close(cap.taps["z"], z["z"])
    assert cap.taps["z"].shape == (2, 6, 32) and cap.taps["l1"].requires_grad
    assert {id(m): len(m._forward_hooks) for m in policy.modules()} == hooks_before
    with pytest.raises(ValueError, match="out of range: the model has 2 blocks"):
        residual_tap(policy, 3)
    with pytest.raises(RuntimeError, match=r"recorded nothing for tap\(s\) \['x'\]"):
        with capture_loss_forward(policy, hidden=False, taps={"x": Tap(nn.Linear(2, 2))}):
            policy(input_ids=ids, labels=ids, fused_lm_head=True)
