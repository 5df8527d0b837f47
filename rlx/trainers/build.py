"""Turn a resolved RunConfig into a ready TRL trainer: model dir, tokenizer, task, instruments, then the registered
trainer's build function (rlx/trainers/catalog.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlx.errors import UserError
from rlx.guard import DivergenceGuard
from rlx.models import load_tokenizer_for, resolve_model_dir
from rlx.run import RunContext, build_instruments
from rlx.tasks import EMBEDDED_TASKS, get_task
from rlx.trainers.catalog import trainer_spec
from rlx.trainers.common import MetricsJsonlCallback
from rlx.trainers.construction import (  # noqa: F401  (the others: re-exported for benchmarks/harness.py)
    default_trainer_args,
    grpo_needs_reference,
    make_trainer_config,
    peft_config,
    rollout_prompts,
)


@dataclass
class Built:
    trainer: Any
    model_dir: str
    tokenizer: Any
    task: Any


def build_trainer(cfg, run: RunContext) -> Built:
    spec = trainer_spec(cfg.algo)
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
    trainer = spec.build_trainer(cfg, run, model_dir=model_dir, task=task, common=common)
    return Built(trainer=trainer, model_dir=model_dir, tokenizer=tokenizer, task=task)
