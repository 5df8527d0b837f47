"""Gradient alignment every 10 steps / off: whole runs of the tiny recipe on the real path (<= 1.15), a logged
step (<= 3x) and a step that does not log (= off).

    python -m benchmarks.bench_alignment [--rounds 5] [--steps 30] [--every 10] [--width 256]
    python -m benchmarks.run alignment

Arms (benchmarks/harness.py: one fresh process per run, rotated order, whole runs timed, CPU time gated):
  off     `grpo_tiny` through `rlx.train.run_training`;
  off~    the same again: the A-vs-A control;
  align   `diagnostics.grad_alignment.enabled=true diagnostics.grad_alignment.every=N`: logs at step 1 and
          every N-th step (D' built at step 1, rows written per logged step, manifest, on_train_end).
Budgets (issue 18), all in CPU time, medians of per-round ratios:
  align / off, whole runs                              <= 1.15 (moonshot 1.05)
  logged step / off step (steps N, 2N, ...; not 1)     <= 3
  step that does not log / off step (steps 2..N, not logged) <= 1.03 (issue: "= alignment off")
A step is timed from one `on_step_begin` to the next, so the writes after a logged step count in that step.
"""

from __future__ import annotations

import sys

from benchmarks.harness import Arm, Bench, Budget, all_steps, bench_main

MAX_RATIO = 1.15
MOONSHOT = 1.05
MAX_LOGGED = 3.0
MAX_NOT_LOGGED = 1.03


def make(args=None) -> Bench:
    every = int(getattr(args, "every", None) or 10)

    def logged(step: int) -> bool:
        return step > 1 and step % every == 0

    def not_logged(step: int) -> bool:
        return step > 1 and step % every != 0

    return Bench(
        name="alignment",
        title=f"gradient alignment every {every} steps / off, whole runs",
        base=Arm("off"),
        arms=[
            Arm(
                "align",
                ("diagnostics.grad_alignment.enabled=true", f"diagnostics.grad_alignment.every={every}"),
            )
        ],
        budgets=[
            Budget(f"align every {every} / off", "align", MAX_RATIO, moonshot=MOONSHOT),
            Budget(
                "logged step / off step",
                "align",
                MAX_LOGGED,
                metric="step",
                arm_steps=logged,
                base_steps=all_steps,
                steps_desc=f"align steps {every}, {2 * every}, ... / off steps 2..N",
            ),
            Budget(
                "not-logged step / off step",
                "align",
                MAX_NOT_LOGGED,
                metric="step",
                arm_steps=not_logged,
                base_steps=all_steps,
                steps_desc="align steps 2..N not logged / off steps 2..N",
            ),
        ],
    )


def _args(ap) -> None:
    ap.add_argument(
        "--every", type=int, default=10, help="log every N steps in the alignment arm (default 10)"
    )


def main(argv: list[str] | None = None) -> int:
    return bench_main(make, argv, __doc__, "benchmarks.run alignment", _args)


if __name__ == "__main__":
    sys.exit(main())
