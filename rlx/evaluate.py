"""Evaluate a policy on a task's held-out split: greedy accuracy and unbiased pass@k.

    python rlx/evaluate.py run_dir=runs/grpo_tiny/2026...          # the run's final policy and task
    python rlx/evaluate.py model=PATH task=arithmetic               # any HF-format model dir
    python rlx/evaluate.py run_dir=DIR output=DIR eval.num_samples=32 eval.ks=[1,8,32]
    python rlx/evaluate.py run_dir=DIR replay=learnable replay.align=paper replay.lr=0.001  # Activation Replay
    python rlx/evaluate.py run_dir=DIR harness=relax eval.num_samples=64  # ReLaX's pass@k decoding (T 0.6, top-p 0.95)

Writes eval.json (summary) and samples.jsonl (prompt, answer, greedy, completions, rewards) into the run
dir, or into `output=DIR`. Any other key=value overrides the run's config (e.g. eval.temperature=0.7).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlx._entry import prepare_process

    prepare_process(__file__)

import json
from pathlib import Path
from typing import Any

from rlx.errors import UserError, exit_on_user_error

# `harness=NAME`: decoding settings of a published evaluation, applied before the other overrides.
# relax: the ReLaX authors' pass@k harness (temperature 0.6, top-p 0.95, up to 1024 samples per prompt,
# unbiased estimator); lower eval.num_samples on CPU, the ks follow it (powers of 2 up to it).
HARNESSES = {"relax": {"eval.temperature": 0.6, "eval.top_p": 0.95, "eval.num_samples": 1024}}

SHORTHANDS = {
    "model": "model.name_or_path",
    "task": "task.name",
    "replay": "replay.mode",
    "base_model": "replay.base_model",
}


def evaluate(
    model, tokenizer, task, cfg, generate_fn=None, progress: bool = True
) -> tuple[dict[str, Any], list[dict]]:
    """Greedy accuracy and pass@k of `model` on `task` with the settings in `cfg.eval`."""
    from rlx.heldout import evaluate_policy

    e = cfg.eval
    if e.num_samples and max(e.ks) > e.num_samples:
        raise UserError(f"eval.ks={list(e.ks)} needs eval.num_samples >= {max(e.ks)}, got {e.num_samples}.")
    return evaluate_policy(
        model,
        tokenizer,
        task,
        num_prompts=e.num_prompts,
        num_samples=e.num_samples,
        ks=tuple(e.ks),
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        seed=cfg.seed,
        progress=progress,
        generate_fn=generate_fn,
    )


def resolve(argv: list[str]):
    """Config and model path from `run_dir=` (the run's saved config) or `model=` + overrides."""
    from rlx.config.loader import load_config

    run_dir, output, rest = None, None, []
    for a in argv:
        k, _, v = a.partition("=")
        if k == "harness":
            if v not in HARNESSES:
                raise UserError(f"harness={v}: expected one of {', '.join(HARNESSES)}.")
            preset = dict(HARNESSES[v])
            given = {x.partition("=")[0]: x.partition("=")[2] for x in argv}
            n = int(given.get("eval.num_samples", preset["eval.num_samples"]))
            preset["eval.ks"] = "[" + ",".join(str(2**i) for i in range(n.bit_length()) if 2**i <= n) + "]"
            rest = [f"{key}={val}" for key, val in preset.items() if key not in given] + rest
        elif k == "run_dir":
            run_dir = Path(v)
        elif k == "output":
            output = Path(v)
        else:
            rest.append(f"{SHORTHANDS.get(k, k)}={v}" if k in SHORTHANDS else a)
    if run_dir is not None:
        if not (run_dir / "config.yaml").exists():
            raise UserError(
                f"run_dir={run_dir} has no config.yaml: expected a directory written by rlx/train.py."
            )
        cfg = load_config([f"recipe={run_dir / 'config.yaml'}", *rest])
        model_path = str(run_dir / "final")
        if not Path(model_path).exists():
            raise UserError(f"{run_dir} has no final/ model (did training finish?). Pass model=PATH instead.")
        if any(a.startswith("model.name_or_path=") for a in rest):
            model_path = cfg.model.name_or_path
        out = output or run_dir
    else:
        cfg = load_config(rest)
        if cfg.model.name_or_path == "embedded":
            from rlx.models import resolve_model_dir

            model_path = resolve_model_dir(cfg)
        else:
            model_path = cfg.model.name_or_path
        if output is None:
            raise UserError("without run_dir=, give output=DIR for eval.json and samples.jsonl.")
        out = output
    return cfg, model_path, out


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    from rlx.models import load_causal_lm, load_tokenizer_for
    from rlx.tasks import get_task

    cfg, model_path, out = resolve(sys.argv[1:] if argv is None else argv)
    if str(cfg.replay.mode).lower() in ("false", "none", ""):  # YAML 1.1 reads `replay=off` as a boolean
        cfg.replay.mode = "off"
    tokenizer = load_tokenizer_for(model_path)
    model = load_causal_lm(model_path, cfg)
    task = get_task(cfg.task)
    generate_fn = None
    if cfg.replay.mode != "off":
        from rlx.replay import make_generate_fn  # Activation Replay (rlx/replay)

        generate_fn = make_generate_fn(model, tokenizer, cfg)
    summary, samples = evaluate(model, tokenizer, task, cfg, generate_fn=generate_fn)
    summary.update(model=model_path, task=cfg.task.name, replay=cfg.replay.mode)
    if generate_fn is not None:  # what replay did: base model, loss at the first/last step, selected fraction
        summary.update(replay_base_model=generate_fn.base_model, **generate_fn.stats.summary())
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if cfg.replay.mode == "off" else f".replay-{cfg.replay.mode}"
    (out / f"eval{suffix}.json").write_text(json.dumps(summary, indent=1))
    with open(out / f"samples{suffix}.jsonl", "w") as fh:
        for s in samples:
            fh.write(json.dumps(s) + "\n")
    ks = " ".join(f"pass@{k}={summary[f'pass@{k}']:.3f}" for k in summary.get("ks", []))
    print(
        f"{model_path} on {task.name} ({summary['num_prompts']} prompts): greedy {summary['greedy_accuracy']:.3f} {ks}"
    )
    print(f"wrote {out / f'eval{suffix}.json'}")
    return out


if __name__ == "__main__":
    main()
