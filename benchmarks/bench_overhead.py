"""rlx with its default instruments vs plain TRL: whole runs of the tiny recipe on the real path (<= 1.02).

    python -m benchmarks.bench_overhead [--rounds 5] [--steps 30] [--width 256]
    python -m benchmarks.run overhead

Arms (benchmarks/harness.py: one fresh process per run, rotated order, whole runs timed, CPU time gated):
  trl    plain `trl.GRPOTrainer` built from the same resolved `grpo_tiny` config: the same warm-started
         weights loaded the same way, prompts, reward, GRPOConfig (logging every step to TensorBoard, the
         end-of-run checkpoint) and the save of final/;
  trl~   the same again: the A-vs-A control;
  rlx    `rlx.train.run_training` with the recipe's defaults: the always-on entropy_cov diagnostic, 10%
         rollout dumps, metrics.jsonl, the divergence guard, rlx's checkpoint state and the run-dir lock.
Limit (issue 18): rlx / TRL <= 1.02 in whole-run CPU time (median of per-round ratios).
"""

from __future__ import annotations

import sys

from benchmarks.harness import Arm, Bench, Budget, bench_main

MAX_RATIO = 1.02


def make(args=None) -> Bench:
    return Bench(
        name="overhead",
        title="rlx (default instruments) / plain TRL GRPO, whole runs",
        base=Arm("trl", kind="trl"),
        arms=[Arm("rlx")],
        budgets=[Budget("rlx / TRL", "rlx", MAX_RATIO)],
    )


def main(argv: list[str] | None = None) -> int:
    return bench_main(make, argv, __doc__, "benchmarks.run overhead")


if __name__ == "__main__":
    sys.exit(main())
