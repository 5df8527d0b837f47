"""ReLaX on / off: whole runs of the tiny recipe on the real path (<= 1.08, moonshot 1.03).

    python -m benchmarks.bench_relax [--rounds 5] [--steps 30] [--width 256]
    python -m benchmarks.run relax

Arms (benchmarks/harness.py: one fresh process per run, rotated order, whole runs timed, CPU time gated):
  off     `grpo_tiny` through `rlx.train.run_training` (entropy_cov and rollout dumps on, as in every run);
  off~    the same again: the A-vs-A control;
  relax   `grpo_tiny regularizers=[relax]` (= recipe grpo_relax_tiny): the dictionary fit at step 1, DSD of
          every trajectory, L_xp, the adaptive KL's reference pass, per-step metrics, the buffered diagnostics
          flushed every `flush_every` steps and at the end of the run.
Whole runs are timed, so step 1 (dictionary fit), every flush and `on_train_end` count. The per-step ratio of
steps after the first is printed beside it (not gated). Limit (issue 18): relax / off <= 1.08 in whole-run CPU
time (median of per-round ratios); moonshot 1.03.
"""

from __future__ import annotations

import sys

from benchmarks.harness import Arm, Bench, Budget, bench_main

MAX_RATIO = 1.08
MOONSHOT = 1.03


def make(args=None) -> Bench:
    return Bench(
        name="relax",
        title="ReLaX on / off, whole runs",
        base=Arm("off"),
        arms=[Arm("relax", ("regularizers=[relax]",))],
        budgets=[
            Budget("relax / off", "relax", MAX_RATIO, moonshot=MOONSHOT),
            Budget("relax / off, steps 2..N", "relax", None, metric="step", steps_desc="steps 2..N"),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    return bench_main(make, argv, __doc__, "benchmarks.run relax")


if __name__ == "__main__":
    sys.exit(main())
