"""Activation Replay preparation cost, in prefill-equivalents per prompt.

One prefill-equivalent = the CPU time (process time, so other jobs on a shared box do not skew it; run with
OMP_NUM_THREADS=1) of the RL model's own prefill of the same batch (what `generate` runs
first: a no-grad forward with a fresh KV cache and logits for the last position only). Replay preparation is
everything done before that prefill: learnable = 1 base forward to layer L-1 + full-vocabulary logit lens at
L layers + `steps` x (RL forward to the deepest loss stream + activation-only backward); direct = 2 forwards
to layer L-1 + lens. The released code costs about 75 (1 + 25 x (full forward + full backward)).

    python -m benchmarks.bench_replay                    # default settings, model shapes below
    python -m benchmarks.bench_replay --quick            # smaller, for CI
    python -m benchmarks.bench_replay --embedded DIR     # also the embedded warm-started model (base = RL + noise)

Shapes: `qwen7b_depth` keeps Qwen2.5-7B's depth (28 layers) and the default L = 16 at a CPU-sized width, so
the early-stop saving is as on the real model; `embedded_shape` is the embedded model's shape (4 layers, so
L is capped at the full depth and early stopping saves one layer in `align=code`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from rlx.replay import prepare_replay
from rlx.replay.hooks import prefill_position_ids
from rlx.replay.tiny import left_padded_batch, tiny_pair

LIMIT = 30.0
"""Acceptance bound: preparation per prompt at default settings, in prefill-equivalents."""

SHAPES = {
    # Qwen2.5-7B ratios at CPU size: 28 layers, MLP 5.3x, head_dim 128, 7 query heads per KV head is not
    # possible at this width (2 heads, 1 KV head), vocabulary / width = 42.
    "qwen7b_depth": dict(
        arch="qwen2",
        layers=28,
        hidden=256,
        vocab=10880,
        intermediate_size=1376,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
    # The embedded model's default shape (rlx/config/schema.py EmbeddedModelConfig) and char vocabulary.
    "embedded_shape": dict(
        arch="qwen2",
        layers=4,
        hidden=128,
        vocab=103,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


@torch.no_grad()
def _prefill(model, ids, mask) -> None:
    from transformers import DynamicCache

    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=prefill_position_ids(model, mask),
        past_key_values=DynamicCache(config=model.config),
        use_cache=True,
        logits_to_keep=1,
    )


def measure(
    base, rl, ids, mask, mode: str = "learnable", repeats: int = 3, **overrides: Any
) -> dict[str, Any]:
    """Median CPU times of prefill and replay preparation on one batch; ratio = prefill-equivalents."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dict(mode=mode, **overrides)
    t_prefill = _time(lambda: _prefill(rl, ids, mask), max(5, 3 * repeats))
    t_prep = _time(lambda: prepare_replay(rl, base, ids, mask, cfg), repeats)
    with FlopCounterMode(display=False) as fc:
        _prefill(rl, ids, mask)
    f_prefill = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        prepare_replay(rl, base, ids, mask, cfg)
    f_prep = fc.get_total_flops()
    return {
        "mode": mode,
        "batch": int(ids.shape[0]),
        "prompt_len": int(ids.shape[1]),
        "prefill_s": t_prefill,
        "prepare_s": t_prep,
        "prefill_equivalents": t_prep / t_prefill,
        "prefill_flops": f_prefill,
        "prepare_flops": f_prep,
        "prefill_equivalents_flops": f_prep / f_prefill,
        **{k: v for k, v in overrides.items()},
    }


def run(quick: bool = False, embedded: str | None = None) -> list[dict[str, Any]]:
    """All measurements as rows (the `python -m benchmarks.run replay` entry)."""
    rows = []
    shapes = {"embedded_shape": SHAPES["embedded_shape"]} if quick else SHAPES
    for name, shape in shapes.items():
        base, rl = tiny_pair(**shape, noise=0.1)
        base.requires_grad_(False), rl.requires_grad_(False)
        ids, mask = left_padded_batch(
            [48, 64, 56, 40] if not quick else [24, 32], vocab=shape["vocab"], seed=0
        )
        for mode in ("learnable", "direct"):
            r = measure(base, rl, ids, mask, mode, repeats=1 if quick else 3)
            rows.append({"model": name, "layers": shape["layers"], "hidden": shape["hidden"], **r})
    if embedded:
        rows += _embedded_rows(embedded, quick)
    return rows


def _embedded_rows(path: str, quick: bool) -> list[dict[str, Any]]:
    import copy

    from rlx.generation import left_pad, prompt_token_ids
    from rlx.models import load_causal_lm, load_tokenizer_for

    tok = load_tokenizer_for(path)
    rl = load_causal_lm(path).eval().requires_grad_(False)
    base = copy.deepcopy(rl)
    prompts = [f"{a}+{b}=" for a, b in [(12, 34), (7, 5), (99, 1), (40, 18)]]
    ids, mask = left_pad(prompt_token_ids(tok, prompts), tok.pad_token_id)
    out = []
    for mode in ("learnable", "direct"):
        r = measure(base, rl, ids, mask, mode, repeats=1 if quick else 3)
        out.append(
            {"model": "embedded", "layers": len(rl.model.layers), "hidden": rl.config.hidden_size, **r}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--embedded", default=None, help="an embedded warm-started model directory")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = run(args.quick, args.embedded)
    print(
        f"{'model':>15} {'L/depth':>8} {'mode':>10} {'B x S':>8} {'prefill ms':>11} {'prepare ms':>11} "
        f"{'prefill-eq (CPU time)':>22} {'prefill-eq (FLOPs)':>19}"
    )
    for r in rows:
        print(
            f"{r['model']:>15} {min(16 if r['mode'] == 'learnable' else 7, r['layers']):>3}/{r['layers']:<4} "
            f"{r['mode']:>10} {r['batch']:>3}x{r['prompt_len']:<4} {1e3 * r['prefill_s']:11.2f} "
            f"{1e3 * r['prepare_s']:11.1f} {r['prefill_equivalents']:22.1f} {r['prefill_equivalents_flops']:19.1f}"
        )
    for r in rows:
        if r["mode"] == "learnable":
            ok = "within" if r["prefill_equivalents_flops"] <= LIMIT else "ABOVE"
            print(
                f"learnable replay, {r['model']}: {r['prefill_equivalents_flops']:.1f} prefill-equivalents in FLOPs, "
                f"{r['prefill_equivalents']:.1f} in CPU time per prompt ({ok} the bound of {LIMIT:.0f}; released ~75)"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    # The bound is stated for the paper's setting (L = 16 of 28 layers); the embedded shape, where L is capped
    # at the full depth, is reported but not gated.
    gated = [r for r in rows if r["mode"] == "learnable" and r["model"] == "qwen7b_depth"]
    return int(any(r["prefill_equivalents_flops"] > LIMIT for r in gated))


if __name__ == "__main__":
    raise SystemExit(main())  # 1 when a gated shape is over the bound
