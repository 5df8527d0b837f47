"""`RolloutMonitor`: the base of the probe monitors (correctness_probe, h_neurons, hidden_rank, probes).

They read the rollouts GRPO-family and PPO trainers sample, with their rewards, at *measured* steps: step 1 and every
`cfg.every` optimizer steps, and, when the trainer reuses each rollout for several optimizer steps, only a rollout's
first step (where the policy is the one that sampled it: `rlx.algorithms.probing.measured_step`). This class holds
that cadence and the one check every monitor makes; each monitor's own work stays in its module.
"""

from __future__ import annotations

from typing import Any

from rlx.algorithms.probing import measured_step
from rlx.errors import UserError
from rlx.instruments.base import Instrument
from rlx.trainers.catalog import trainer_spec


def require_rollouts(monitor: str, run: Any) -> None:
    """UserError unless the run's algorithm samples rollouts with rewards (GRPO family, PPO)."""
    algo = getattr(getattr(run, "cfg", None), "algo", None)
    if algo and not trainer_spec(str(algo)).samples_completions:
        raise UserError(
            f"diagnostics.{monitor} needs rollouts with rewards: algo grpo|rloo|reinforce_pp|ppo, not {algo}. "
            f"Set diagnostics.{monitor}.enabled=false for this run."
        )


class RolloutMonitor(Instrument):
    """A measuring instrument over rollouts with rewards; refuses other algorithms when it is built."""

    changes_loss = False

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        require_rollouts(self.name, run)
        self._trainer: Any = None
        self._rollout_steps = 1
        """Optimizer steps per rollout (the trainer spec's `steps_per_rollout`)."""

    def bind(self, trainer: Any) -> None:
        """Remember `trainer` and how many optimizer steps it takes from each rollout (idempotent)."""
        if self._trainer is trainer:
            return
        self._trainer = trainer
        algo = getattr(trainer, "rlx_algo", "") or getattr(getattr(self.run, "cfg", None), "algo", "") or ""
        args = getattr(trainer, "args", None)
        self._rollout_steps = trainer_spec(algo).steps_per_rollout(args) if algo and args is not None else 1

    def measured(self, step: int, every: int | None = None) -> bool:
        """Whether 1-based optimizer `step` is measured at cadence `every` (default `cfg.every`)."""
        return measured_step(step, int(self.cfg.every if every is None else every), self._rollout_steps)

    def measuring(self) -> bool:
        """Whether the step now running (`global_step + 1` of the bound trainer) is measured."""
        t = self._trainer
        return t is not None and self.measured(int(t.state.global_step) + 1)
