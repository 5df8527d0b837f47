"""The cost of in-training evaluation: `eval.every=N` / `eval.every=0`, whole runs of the tiny recipe.

    python -m benchmarks.bench_eval [--rounds 5] [--steps 30] [--every 10]
    python -m benchmarks.run eval

Arms (benchmarks/harness.py: one fresh process per run, rotated order, whole runs timed):
  off     `grpo_tiny` through `rlx.train.run_training` (eval.every=0);
  off~    the same again: the A-vs-A control;
  eval    `eval.every=N` with the default eval settings (the whole held-out split, 200 prompts on the
          arithmetic task, greedy + 16 samples for pass@k), evaluated at step 0, every N steps and at the end,
          results logged and written to diagnostics/eval/.
Reported, not gated: the evaluation is work the user asks for (its size is eval.num_prompts x
eval.num_samples), not overhead of the training path. The ratio tells how much a run with that evaluation
schedule costs; the run's own `eval_cost.cpu_fraction` (run_info.json) is printed beside it.
"""

from __future__ import annotations

import sys

from benchmarks.harness import Arm, Bench, Budget, bench_main


def make(args=None) -> Bench:
    every = int(getattr(args, "every", None) or 10)
    return Bench(
        name="eval",
        title=f"in-training evaluation eval.every={every} / off, whole runs",
        base=Arm("off"),
        arms=[Arm("eval", (f"eval.every={every}",))],
        budgets=[Budget(f"eval.every={every} / off", "eval", None)],
    )


def _args(ap) -> None:
    ap.add_argument(
        "--every", type=int, default=10, help="evaluate every N steps in the eval arm (default 10)"
    )


def main(argv: list[str] | None = None) -> int:
    return bench_main(make, argv, __doc__, "benchmarks.run eval", _args)


if __name__ == "__main__":
    sys.exit(main())
