"""Train: `accelerate launch rlx/train.py recipe=NAME key.sub=value ...` (or `python rlx/train.py ...`).

Writes to the run directory: config.yaml (resolved), metrics.jsonl, tensorboard/, eval_before_after.json,
run_info.json, final/ (the trained policy) and diagnostics/ (instrument outputs with manifest.json).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # must run before anything imports transformers
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlx._entry import prepare_process

    prepare_process(__file__)

import json
from pathlib import Path

from rlx.errors import exit_on_user_error

DEFAULT_RECIPE = "grpo_tiny"


def _greedy_accuracy(model, tokenizer, task, cfg) -> dict:
    from rlx.evaluation import evaluate_policy

    summary, _ = evaluate_policy(
        model,
        tokenizer,
        task,
        num_prompts=cfg.eval.num_prompts,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        greedy_only=True,
    )
    return summary


def run_training(cfg) -> Path:
    """Train one resolved config; returns the run directory."""
    from accelerate import PartialState
    from transformers import set_seed

    from rlx.run import decide_run_dir, make_run_context
    from rlx.trainers.build import build_trainer

    run_dir = decide_run_dir(cfg)
    state = PartialState()
    run = make_run_context(cfg, run_dir)
    set_seed(cfg.seed)
    built = build_trainer(cfg, run)
    trainer, task = built.trainer, built.task
    verifiable = cfg.task.name != "ultrafeedback" and cfg.eval.before_after
    policy = trainer.accelerator.unwrap_model(trainer.model)
    before = (
        _greedy_accuracy(policy, built.tokenizer, task, cfg) if verifiable and state.is_main_process else None
    )
    trainer.train()
    final_dir = run_dir / "final"
    trainer.save_model(str(final_dir))
    if state.is_main_process:
        built.tokenizer.save_pretrained(final_dir)
        info = {
            "recipe": cfg.recipe,
            "algo": cfg.algo,
            "base_model": built.model_dir,
            "final_model": str(final_dir),
            "world_size": state.num_processes,
            "global_step": trainer.state.global_step,
        }
        if verifiable:
            policy = trainer.accelerator.unwrap_model(trainer.model)
            after = _greedy_accuracy(policy, built.tokenizer, task, cfg)
            result = {
                "before": before,
                "after": after,
                "delta_points": 100 * (after["greedy_accuracy"] - before["greedy_accuracy"]),
            }
            (run_dir / "eval_before_after.json").write_text(json.dumps(result, indent=1))
            info["greedy_accuracy_before"] = before["greedy_accuracy"]
            info["greedy_accuracy_after"] = after["greedy_accuracy"]
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=1))
        print(f"\nrun dir: {run_dir}")
        if verifiable:
            print(
                f"held-out greedy accuracy: before {100 * before['greedy_accuracy']:.1f}%  "
                f"after {100 * after['greedy_accuracy']:.1f}%  ({result['delta_points']:+.1f} points, "
                f"{before['num_prompts']} prompts)"
            )
    state.wait_for_everyone()
    return run_dir


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from rlx.cli import train_help

        print(train_help())
        return None
    from rlx.config.loader import load_config, to_yaml

    cfg = load_config(argv, default_recipe=DEFAULT_RECIPE)
    if cfg.print_config:  # the run config, then the trainer arguments as the TRL trainer gets them; no run dir
        from rlx.cli import trainer_args_text

        print(to_yaml(cfg))
        print(trainer_args_text(cfg))
        return None
    return run_training(cfg)


if __name__ == "__main__":
    main()
