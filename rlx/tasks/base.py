"""Task interface: prompts with references, a pure reward, train and held-out splits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset


def completion_text(completion: Any) -> str:
    """TRL passes strings for standard prompts and [{'role': 'assistant', 'content': ...}] for conversational ones."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


class Task:
    """A verifiable task. Datasets have columns `prompt`, `answer` and `solution` (a verified reference completion)."""

    name: str = ""
    max_completion_length: int = 16
    """Default completion budget in tokens."""
    verifiable: bool = True
    """Completions can be scored against reference answers (`score`): reward functions, held-out accuracy, pass@k."""
    preference_pairs: bool = False
    """The datasets are preference pairs (`prompt`, `chosen`, `rejected`) that DPO trains on as they are, rather
    than prompts with answers from which rlx samples and verifies pairs."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def eval_dataset(self) -> Dataset:
        raise NotImplementedError

    def score(self, completion: str, answer: str) -> float:
        """Reward of one completion text against the reference answer."""
        raise NotImplementedError

    def buggy_solution(self, prompt: str) -> str | None:
        """The answer a systematically buggy solver gives for `prompt`, or None when this task defines no bug.

        The warm start mixes these into its targets (`warmstart.teacher_bug_rate`) so the base policy carries a
        structural flaw that RL can find and fix. None also when the bug happens to give the right answer.
        """
        return None

    def is_correct(self, completion: str, answer: str) -> bool:
        return self.score(completion, answer) >= 1.0

    @property
    def reward_funcs(self) -> list[Callable[..., list[float]]]:
        """Reward functions in TRL's calling convention: `task.reward` plug-ins if set, else the task's own."""
        specs = list(getattr(self.cfg, "reward", None) or [])
        if specs:
            if getattr(self, "_plugins", None) is None:
                from rlx.tasks.rewards import plugin_rewards

                self._plugins = plugin_rewards(specs)
            return self._plugins

        def correctness(prompts, completions, answer, **kwargs) -> list[float]:
            return [self.score(completion_text(c), a) for c, a in zip(completions, answer)]

        correctness.__name__ = f"{self.name}_reward"
        return [correctness]
