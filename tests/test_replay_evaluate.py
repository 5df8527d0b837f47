"""Activation Replay through rlx/evaluate.py: replay=learnable|direct base_model=PATH, identical decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlx.config.schema import EmbeddedModelConfig
from rlx.embedded import build_model, build_tokenizer


def _save_embedded(path: Path, seed: int, noise: float = 0.0) -> Path:
    """A tiny embedded-format model dir (model + char tokenizer + warmstart.json marker)."""
    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    model = build_model(shape, tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # tied: peaked logit-lens distributions, like a trained model
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(noise * float(p.std()) * torch.randn(p.shape, generator=g) if p.numel() > 1 else 0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "warmstart.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay_eval")
    return _save_embedded(root / "base", 0), _save_embedded(root / "rl", 1, noise=0.2)


def _evaluate(base: Path, rl: Path, out: Path, *extra: str) -> dict:
    from rlx.evaluate import main

    args = [
        f"model={rl}",
        "task=arithmetic",
        f"output={out}",
        "eval.num_prompts=6",
        "eval.num_samples=4",
        "eval.ks=[1,4]",
        "eval.batch_size=4",
        f"base_model={base}",
        *extra,
    ]
    main(args)
    mode = next((a.split("=")[1] for a in extra if a.startswith("replay=")), "off")
    suffix = "" if mode == "off" else f".replay-{mode}"
    return json.loads((out / f"eval{suffix}.json").read_text()), [
        json.loads(line) for line in (out / f"samples{suffix}.jsonl").read_text().splitlines()
    ]


def test_zero_step_replay_matches_plain_evaluation(pair_dirs, tmp_path):
    base, rl = pair_dirs
    plain, plain_samples = _evaluate(base, rl, tmp_path, "replay=off")
    zero, zero_samples = _evaluate(base, rl, tmp_path, "replay=learnable", "replay.steps=0")
    assert zero["replay"] == "learnable" and plain["replay"] == "off"
    # 6 prompts prepared twice (greedy, then sampled), 2 batches of <= 4 each time, every prefill injected
    assert zero["replay_prompts"] == 12 and zero["replay_prefills_injected"] == 4
    assert zero["replay_base_model"] == str(base) and "replay_prompts" not in plain
    for key in ("greedy_accuracy", "pass@1", "pass@4", "sample_mean_reward"):
        assert zero[key] == plain[key]
    assert [s["greedy"] for s in zero_samples] == [s["greedy"] for s in plain_samples]
    assert [s["completions"] for s in zero_samples] == [s["completions"] for s in plain_samples]


def test_generate_fn_prepares_per_batch_and_records_stats(pair_dirs):
    from rlx.config.loader import load_config
    from rlx.generation import generate_texts
    from rlx.models import load_causal_lm, load_tokenizer_for
    from rlx.replay import make_generate_fn

    base, rl = pair_dirs
    cfg = load_config(
        [
            f"model.name_or_path={rl}",
            "replay.mode=learnable",
            f"replay.base_model={base}",
            "replay.steps=3",
            "replay.lr=0.01",
        ]
    )
    tok, model = load_tokenizer_for(str(rl)), load_causal_lm(str(rl), cfg)
    fn = make_generate_fn(model, tok, cfg)
    assert fn.base_model == str(base)
    generate_texts(model, tok, ["12+3=", "7-45=", "1+1="], max_new_tokens=3, batch_size=2, generate_fn=fn)
    s = fn.stats.summary()
    assert fn.stats.calls == 2 and s["replay_prompts"] == 3 and s["replay_prefills_injected"] == 2
    assert 0 < s["replay_selected_fraction"] <= 1 and s["replay_loss_first"] > 0
    cfg.replay.mode = "off"
    assert make_generate_fn(model, tok, cfg) is None


@pytest.mark.parametrize("lr, rises", [(1e8, True), (1e-4, False)])
def test_a_rising_replay_loss_prints_one_warning(pair_dirs, capsys, lr, rises):
    """An lr too large for the embedding scale overshoots: the per-prompt loss rises, and the user is told once."""
    from rlx.config.loader import load_config
    from rlx.generation import generate_texts
    from rlx.models import load_causal_lm, load_tokenizer_for
    from rlx.replay import make_generate_fn

    base, rl = pair_dirs
    cfg = load_config(
        [
            f"model.name_or_path={rl}",
            "replay.mode=learnable",
            f"replay.base_model={base}",
            "replay.steps=4",
            f"replay.lr={lr}",
        ]
    )
    tok, model = load_tokenizer_for(str(rl)), load_causal_lm(str(rl), cfg)
    fn = make_generate_fn(model, tok, cfg)
    prompts = ["12+3=", "7-45=", "1+1=", "30+4="]
    generate_texts(model, tok, prompts, max_new_tokens=3, batch_size=2, generate_fn=fn)
    err = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: Activation Replay")
    ]
    if rises:
        assert fn.stats.loss_rose > 0 and fn.stats.summary()["replay_loss_rose_prompts"] == fn.stats.loss_rose
        assert len(err) == 1, err  # once per evaluation, however many batches rise
        assert f"replay.lr={lr}" in err[0] and "the replay loss rose during preparation" in err[0]
    else:
        assert fn.stats.loss_rose == 0 and err == []
