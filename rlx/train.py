"""Train: `accelerate launch rlx/train.py recipe=NAME key.sub=value ...` (or `python rlx/train.py ...`).

Writes to the run directory: config.yaml (resolved), metrics.jsonl, tensorboard/, eval_before_after.json,
run_info.json, final/ (the trained policy) and diagnostics/ (instrument outputs with manifest.jsonl).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # must run before anything imports transformers
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlx._entry import prepare_process

    prepare_process(__file__)

import json
import os
from pathlib import Path

from rlx.errors import exit_on_user_error

DEFAULT_RECIPE = "grpo_tiny"


def _greedy_accuracy(trainer, tokenizer, task, cfg) -> dict:
    """On every rank (a collective: the prompts are split over ranks, ZeRO-3 weights gathered)."""
    from rlx.heldout import greedy_accuracy_all_ranks

    return greedy_accuracy_all_ranks(
        trainer,
        tokenizer,
        task,
        num_prompts=cfg.eval.num_prompts,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )


def run_training(cfg) -> Path:
    """Train one resolved config; returns the run directory.

    Everything that can fail on bad input (config values, dependencies, model, data, instruments) is checked
    before the run directory is created or touched; then the directory is locked for the life of the run.
    """
    from accelerate import PartialState
    from transformers import set_seed

    from rlx.run import (
        check_dependencies,
        check_run_dir,
        check_trainer_numbers,
        claim_run_dir,
        decide_run_dir,
        make_run_context,
    )
    from rlx.trainers.build import build_trainer
    from rlx.trainers.common import MetricsJsonlCallback

    check_trainer_numbers(cfg)
    check_dependencies(cfg)
    run_dir = decide_run_dir(cfg)
    resume = check_run_dir(cfg, run_dir)
    state = PartialState()
    run = make_run_context(cfg, run_dir)
    set_seed(cfg.seed)
    made_by_build = not run_dir.exists()
    try:
        built = build_trainer(cfg, run)
        if resume is not None:
            built.trainer.rlx_load_checkpoint_state(resume)
    except BaseException:
        _remove_if_empty(run_dir if made_by_build else None)  # HF's Trainer makes output_dir when it is built
        raise
    trainer, task = built.trainer, built.task
    from rlx.eval_loop import EvalCallback

    if cfg.eval.every > 0 and task.verifiable:
        trainer.add_callback(
            EvalCallback(trainer, built.tokenizer, task, cfg, run, model_dir=built.model_dir)
        )
    with claim_run_dir(cfg, run_dir, resume):
        if state.is_main_process:
            print(f"run dir: {run_dir}", flush=True)
        verifiable = task.verifiable and cfg.eval.before_after
        before = _greedy_accuracy(trainer, built.tokenizer, task, cfg) if verifiable else None
        _train(trainer, resume, cfg)
        final_dir = run_dir / "final"
        _save_final(trainer, built.tokenizer, run_dir)
        after = _greedy_accuracy(trainer, built.tokenizer, task, cfg) if verifiable else None
        if state.is_main_process:
            info = {
                "recipe": cfg.recipe,
                "algo": cfg.algo,
                "base_model": built.model_dir,
                "final_model": str(final_dir),
                "world_size": state.num_processes,
                "global_step": trainer.state.global_step,
                "resumed_from": str(resume) if resume else None,
                "train_summary": next(
                    (
                        cb.summary
                        for cb in trainer.callback_handler.callbacks
                        if isinstance(cb, MetricsJsonlCallback)
                    ),
                    None,
                ),
            }
            eval_cb = next(
                (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EvalCallback)), None
            )
            if eval_cb is not None:  # eval.every: the in-training evaluations' cost, for the overhead ratio
                info["eval_cost"] = eval_cb.cost_summary()
            if verifiable:
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
    return run_dir


def _remove_if_empty(path: Path | None) -> None:
    if path is not None and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _train(trainer, resume: Path | None, cfg) -> None:
    """`trainer.train`, with a diverged run checkpointed (last finite state) and a full disk reported."""
    from rlx.guard import Diverged

    try:
        if resume is not None and _finished_at(resume, trainer.args.max_steps):
            # HF Trainer would run one more step before noticing max_steps is reached; load the weights instead.
            trainer._load_from_checkpoint(str(resume))
            trainer.state = type(trainer.state).load_from_json(str(resume / "trainer_state.json"))
            print(
                f"{resume.name} is the last step (max_steps {trainer.state.max_steps}): nothing left to train"
            )
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Diverged as e:
        if cfg.guard.checkpoint and e.checkpoint:
            trainer.state.global_step = e.step
            trainer._save_checkpoint(trainer.model_wrapped, trial=None)
            e.args = (f"{e.args[0]} Checkpoint written: {trainer.args.output_dir}/checkpoint-{e.step}",)
        raise
    except Exception as e:  # OSError, or safetensors' SafetensorError wrapping one
        if isinstance(e, RuntimeError) and cfg.guard.enabled and cfg.guard.nonfinite:
            from rlx.guard import sampling_diverged

            diverged = sampling_diverged(e, int(trainer.state.global_step), trainer.args.output_dir)
            if diverged is not None:
                raise diverged from None
        _raise_if_disk_full(
            e, Path(trainer.args.output_dir), Path(trainer.args.output_dir), "writing a checkpoint"
        )
        raise


def _save_final(trainer, tokenizer, run_dir: Path) -> None:
    """Write `final/` through a temporary directory renamed into place: it is either complete or absent."""
    import shutil

    from accelerate import PartialState

    state = PartialState()
    tmp, final = run_dir / ".final.tmp", run_dir / "final"
    if state.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    state.wait_for_everyone()
    try:
        trainer.save_model(str(tmp))
        if state.is_main_process:
            tokenizer.save_pretrained(tmp)
    except Exception as e:  # OSError, or safetensors' SafetensorError wrapping one
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, tmp, run_dir, "writing the final model")
        raise
    state.wait_for_everyone()
    if state.is_main_process:
        os.replace(tmp, final)
    state.wait_for_everyone()


def _finished_at(checkpoint: Path, max_steps: int) -> bool:
    """Whether `checkpoint` is at or past the run's last step (`max_steps`, or the epoch-derived one it saved)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    last = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return last > 0 and state["global_step"] >= last


def _raise_if_disk_full(e: BaseException, path: Path, run_dir: Path, what: str) -> None:
    import errno
    import shutil

    from rlx.checkpoint import complete_checkpoints
    from rlx.errors import UserError

    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        m in str(e) for m in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
    )
    if not full:
        return
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    done = complete_checkpoints(run_dir)
    last = (
        f" The last complete checkpoint is {done[-1][1]}: free space and resume with trainer.resume_from_checkpoint=true."
        if done
        else ""
    )
    raise UserError(
        f"no space left on the device while {what} to {path} ({free / 2**20:.1f} MiB free).{last}"
    ) from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from rlx.config.describe import train_help

        print(train_help())
        return None
    from rlx.config.loader import load_config, to_yaml

    cfg = load_config(argv, default_recipe=DEFAULT_RECIPE)
    if (
        cfg.print_config
    ):  # the run config, then the trainer arguments as the TRL trainer gets them; no run dir
        from rlx.config.describe import trainer_args_text

        print(to_yaml(cfg))
        print(trainer_args_text(cfg))
        return None
    return run_training(cfg)


if __name__ == "__main__":
    main()
