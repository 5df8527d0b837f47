"""What the build functions of rlx/trainers/* share: the training arguments a trainer receives (rlx's defaults,
the algorithm's, then the recipe's `trainer.*`), PEFT adapters, the reference-model rule and the rollout prompts."""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import OmegaConf

from rlx.config.loader import validate_trainer_args
from rlx.errors import UserError
from rlx.run import RunContext
from rlx.trainers.catalog import trainer_spec

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


def make_trainer_config(cfg, run: RunContext, task: Any = None, **algo_defaults):
    """The registered trainer's config class built from rlx's defaults, the algorithm's defaults for `task`
    (e.g. the completion budget of a trainer that samples), `algo_defaults`, then the recipe's `trainer.*`."""
    spec = trainer_spec(cfg.algo)
    cls = spec.trainer_config_class()
    defaults = {**(spec.trainer_defaults(task) if task is not None else {}), **algo_defaults}
    args = {**defaults, **default_trainer_args(cfg, run)}
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
    """TRL's GRPO (and trainers on its machinery) builds a reference model when beta != 0 and there are no LoRA
    adapters."""
    return float(cfg.trainer.get("beta", 0.0) or 0.0) != 0 and not cfg.model.lora.enabled


def rollout_prompts(cfg, task, tokenizer, policy, args):
    """The training prompts of a trainer that samples, each fitting the policy's context with the completion budget
    (or refused)."""
    from rlx.tasks.data import fit_prompts

    text_cfg = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
    context = getattr(text_cfg, "max_position_embeddings", None)
    return fit_prompts(
        task.train_dataset(), tokenizer, context, args.max_completion_length, cfg.task.overlong_prompts
    )
