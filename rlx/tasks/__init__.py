"""Verifiable tasks. `get_task(cfg.task)` returns a `Task` with datasets and a pure reward."""

from __future__ import annotations

from rlx.errors import UserError
from rlx.tasks.arithmetic import ArithmeticTask
from rlx.tasks.base import Task, completion_text
from rlx.tasks.countdown import CountdownTask
from rlx.tasks.gsm8k import GSM8KTask
from rlx.tasks.jsonl import JsonlTask
from rlx.tasks.ultrafeedback import UltraFeedbackTask

TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "gsm8k": GSM8KTask,
    "ultrafeedback": UltraFeedbackTask,
    "jsonl": JsonlTask,
}
EMBEDDED_TASKS = ("arithmetic", "countdown")


def task_class(name: str) -> type[Task]:
    """The Task class of `task.name` (its class attributes, e.g. `verifiable`, without building it)."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}': expected one of {', '.join(TASKS)}.")
    return TASKS[name]


def get_task(cfg) -> Task:
    return task_class(cfg.name)(cfg)


__all__ = ["TASKS", "EMBEDDED_TASKS", "Task", "get_task", "task_class", "completion_text"]
