"""`collect_activations` on an untrained embedded model: value identities, determinism, RNG isolation."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rlx.config.schema import RunConfig
from rlx.instruments.activations import collect_activations


@pytest.fixture(scope="module")
def setup():
    from rlx.embedded.model import build_model
    from rlx.embedded.tokenizer import build_tokenizer
    from rlx.tasks import get_task

    cfg = OmegaConf.structured(RunConfig)
    tok = build_tokenizer()
    model = build_model(cfg.model.embedded, tok, 0)
    task = get_task(cfg.task)
    ds = task.eval_dataset()
    probes = [(i, ds[i]["prompt"], ds[i]["answer"]) for i in range(6)]
    return model, tok, task, probes


def _collect(setup, seed=3):
    model, tok, task, probes = setup
    return collect_activations(
        model,
        tok,
        probes,
        score=task.score,
        samples_per_prompt=3,
        max_new_tokens=task.max_completion_length,
        seed=seed,
    )


def test_values_and_identities(setup):
    model, tok, task, probes = setup
    t = _collect(setup)
    n, layers = 6 * 3, model.config.num_hidden_layers
    assert t["last"].shape == (n, layers + 1, model.config.hidden_size) and t["last"].dtype == torch.float16
    assert t["prompt_id"].tolist() == [i for i in range(6) for _ in range(3)]
    assert int(t["completion_len"].sum()) == len(t["token_logp"]) == len(t["token_sample"])
    per_sample = torch.zeros(n).index_add_(0, t["token_sample"], t["token_logp"]) / t["completion_len"]
    torch.testing.assert_close(per_sample, t["mean_logp"], rtol=1e-5, atol=1e-6)
    assert (t["token_entropy"] >= 0).all() and (
        t["token_entropy"] <= torch.log(torch.tensor(float(len(tok)))) + 1e-4
    ).all()
    assert (t["token_logp"] <= 0).all()
    assert set(t["reward"].tolist()) <= {0.0, 1.0}
    # mean pooling over a single-token completion is its last-token state
    one = (t["completion_len"] == 1).nonzero().flatten()
    if len(one):
        torch.testing.assert_close(t["mean"][one], t["last"][one])


def test_token_logps_match_an_unpadded_forward(setup):
    """Left padding and position ids in the batched re-encode give the log-probs of a plain forward."""
    from rlx.generation import prompt_token_ids

    model, tok, task, probes = setup
    t = _collect(setup)
    for i in (0, 7, 17):
        ids = t["token_id"][t["token_sample"] == i]
        prompt = prompt_token_ids(tok, [probes[int(t["prompt_id"][i])][1]])[0]
        seq = torch.tensor([prompt + ids.tolist()])
        with torch.no_grad():
            out = model(input_ids=seq, output_hidden_states=True)
        logits = out.logits[0, len(prompt) - 1 : -1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
        torch.testing.assert_close(t["token_logp"][t["token_sample"] == i], ref, rtol=1e-4, atol=1e-4)
        last = torch.stack([h[0, -1] for h in out.hidden_states])  # (L+1, d) at the last completion token
        mean = torch.stack([h[0, len(prompt) :].mean(0) for h in out.hidden_states])
        torch.testing.assert_close(t["last"][i].float(), last, rtol=2e-3, atol=2e-3)  # stored as float16
        torch.testing.assert_close(t["mean"][i].float(), mean, rtol=2e-3, atol=2e-3)


def test_deterministic_and_training_rng_untouched(setup):
    torch.manual_seed(123)
    a = _collect(setup)
    after = torch.rand(4)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.testing.assert_close(after, expected)  # sampling ran under a forked RNG
    b = _collect(setup)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = _collect(setup, seed=4)
    assert not torch.equal(a["token_logp"], c["token_logp"]) or not torch.equal(
        a["completion_len"], c["completion_len"]
    )
