"""Turn a resolved RunConfig into a ready TRL trainer (policy, reference, data, rewards, instruments)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from rlx.config.loader import trainer_config_class, validate_trainer_args
from rlx.errors import UserError
from rlx.guard import DivergenceGuard
from rlx.models import load_causal_lm, load_tokenizer_for, resolve_model_dir
from rlx.run import RunContext, build_instruments
from rlx.tasks import EMBEDDED_TASKS, get_task
from rlx.trainers.common import MetricsJsonlCallback

_USER_TB_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")


def default_trainer_args(cfg, run: RunContext) -> dict[str, Any]:
    """CPU-safe defaults set explicitly (TRL defaults to bf16 and gradient checkpointing), then the recipe's."""
    on_gpu = torch.cuda.is_available()
    args = {
        "output_dir": str(run.run_dir),
        "seed": cfg.seed,
        "bf16": False,
        "fp16": False,
        "use_cpu": not on_gpu,
        "activation_checkpointing": False,  # transformers 5.23 name (the old one warns on every run)
        "logging_steps": 1,
        # Checkpoints every 100 steps and at the end (two kept): what `trainer.resume_from_checkpoint` resumes.
        "save_strategy": "steps",
        "save_steps": 100,
        "save_total_limit": 2,
        "report_to": ["tensorboard"],
        "ddp_find_unused_parameters": False,
        # A collective that cannot complete (a rank stuck or gone) fails after this many seconds, with
        # torch's timeout error naming the operation, instead of hanging (HF's default is 1800).
        "ddp_timeout": 900,
        "dataloader_num_workers": 0,
    }
    args.update(validate_trainer_args(cfg.algo, OmegaConf.to_container(cfg.trainer, resolve=True)))
    return args


def make_trainer_config(cfg, run: RunContext, **algo_defaults):
    cls = trainer_config_class(cfg.algo)
    args = {**algo_defaults, **default_trainer_args(cfg, run)}
    # Per run (several runs can share a process); a directory the user exported before launch wins.
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TB_DIR or str(run.run_dir / "tensorboard")
    try:
        config = cls(**args)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid trainer settings for algo={cfg.algo}: {e}") from None
    apply_collective_timeout(config.ddp_timeout)
    return config


def apply_collective_timeout(seconds: int) -> None:
    """Make `trainer.ddp_timeout` the timeout of every collective on the default process group.

    The group exists before the trainer config does (rlx decides the run dir on rank 0 and broadcasts it), so
    HF's own use of `ddp_timeout` at group creation never applies; a collective that one rank never joins
    would then wait for torch's default (30 min on gloo, 10 min on NCCL) or, with some backends, forever.
    """
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=int(seconds)))


def peft_config(cfg):
    if not cfg.model.lora.enabled:
        return None
    from peft import LoraConfig

    lc = cfg.model.lora
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        task_type="CAUSAL_LM",
    )


def grpo_needs_reference(cfg) -> bool:
    """TRL's GRPO (and rlx's PPO on it) builds a reference model when beta != 0 and there are no LoRA adapters."""
    return float(cfg.trainer.get("beta", 0.0) or 0.0) != 0 and not cfg.model.lora.enabled


@dataclass
class Built:
    trainer: Any
    model_dir: str
    tokenizer: Any
    task: Any


def build_trainer(cfg, run: RunContext) -> Built:
    from rlx.trainers.dpo import RLXDPOTrainer
    from rlx.trainers.grpo import RLXGRPOTrainer, preloaded_reference
    from rlx.trainers.sft import RLXSFTTrainer

    if cfg.model.name_or_path == "embedded" and cfg.task.name not in EMBEDDED_TASKS:
        raise UserError(
            f"the embedded model is warm-started on generated tasks ({', '.join(EMBEDDED_TASKS)}), not "
            f"'{cfg.task.name}'. Set model.name_or_path to a real model for task={cfg.task.name}."
        )
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer_for(model_dir)
    task = get_task(cfg.task)
    instruments = build_instruments(cfg, run)
    callbacks = [MetricsJsonlCallback(run.run_dir / "metrics.jsonl")]
    common = dict(
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config(cfg),
        instruments=instruments,
        run=run,
        guard=DivergenceGuard(cfg.guard, len(tokenizer)) if cfg.guard.enabled else None,
    )

    if cfg.algo == "grpo":
        # rlx loads the policy and TRL's reference itself (same `model.*` settings for both, full weights
        # also under ZeRO-3); TRL, given a path, would apply none of model.dtype / attn_implementation / ...
        policy = load_causal_lm(model_dir, cfg)
        ref = load_causal_lm(model_dir, cfg) if grpo_needs_reference(cfg) else None
        args = make_trainer_config(cfg, run, max_completion_length=task.max_completion_length)
        with preloaded_reference(ref):
            trainer = RLXGRPOTrainer(
                model=policy,
                reward_funcs=task.reward_funcs,
                args=args,
                train_dataset=rollout_prompts(cfg, task, tokenizer, policy, args),
                **common,
            )
    elif cfg.algo == "dpo":
        args = make_trainer_config(cfg, run)
        policy = load_causal_lm(model_dir, cfg)
        train_ds, eval_ds = preference_datasets(cfg, task, policy, tokenizer)
        ref = None if cfg.model.lora.enabled else load_causal_lm(model_dir, cfg)  # explicit: ZeRO-3 safe
        trainer = RLXDPOTrainer(
            model=policy, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds, **common
        )
        if cfg.task.name != "ultrafeedback" and cfg.diagnostics.rollouts.enabled:  # pairs rlx sampled
            from rlx.trainers.dpo import PreferencePairsDump

            trainer.add_callback(PreferencePairsDump({"train": train_ds, "eval": eval_ds}, run))
    elif cfg.algo == "sft":
        args = make_trainer_config(cfg, run)
        train = task.train_dataset()
        sft_ds = train.map(
            lambda r: {"prompt": r["prompt"], "completion": r["solution"]}, remove_columns=train.column_names
        )
        trainer = RLXSFTTrainer(
            model=load_causal_lm(model_dir, cfg), args=args, train_dataset=sft_ds, **common
        )
    elif cfg.algo == "ppo":
        from rlx.trainers.ppo import build_ppo_trainer

        trainer = build_ppo_trainer(cfg, run, model_dir=model_dir, task=task, common=common)
    else:  # pragma: no cover - the loader validates algo
        raise UserError(f"unknown algo {cfg.algo}")
    return Built(trainer=trainer, model_dir=model_dir, tokenizer=tokenizer, task=task)


def rollout_prompts(cfg, task, tokenizer, policy, args):
    """The GRPO/PPO training prompts, each fitting the policy's context with the completion budget (or refused)."""
    from rlx.tasks.data import fit_prompts

    text_cfg = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
    context = getattr(text_cfg, "max_position_embeddings", None)
    return fit_prompts(
        task.train_dataset(), tokenizer, context, args.max_completion_length, cfg.task.overlong_prompts
    )


def preference_datasets(cfg, task, policy, tokenizer):
    """Train/held-out preference pairs: real preference data for ultrafeedback-like tasks, else built from the task."""
    if cfg.task.name == "ultrafeedback":
        return task.train_dataset(), task.eval_dataset()
    from accelerate import PartialState

    from rlx.preference import build_preference_pairs

    state = PartialState()
    with state.main_process_first():  # sampling is deterministic per seed; rank 0 first only for tidy logs
        train = build_preference_pairs(
            policy, tokenizer, task, cfg.preference, "train", cfg.seed, state.is_main_process
        )
        heldout_cfg = OmegaConf.merge(cfg.preference, {"num_pairs": min(64, cfg.task.num_eval)})
        heldout = build_preference_pairs(policy, tokenizer, task, heldout_cfg, "eval", cfg.seed + 1, False)
    return train, heldout
