"""Cost of the ReLaX regularizer on the tiny recipe: step-time ratio grpo_relax_tiny / grpo_tiny.

    python -m benchmarks.bench_relax            # 3 rounds x 21 optimizer steps per arm
    python -m benchmarks.bench_relax --quick    # 1 round x 11 steps per arm
    python -m benchmarks.run relax              # through the benchmark runner

Arms, built and trained in this one process, interleaved round by round (off, ref, relax, off, ...) so that
load from other processes hits them alike:
  off    grpo_tiny (trainer.beta = 0, the always-on entropy_cov diagnostic only);
  ref    grpo_tiny + trainer.beta = 1e-9: TRL's reference forward alone (what the adaptive KL needs);
  relax  grpo_relax_tiny (ReLaX on; it sets trainer.beta = 1e-9).
A step is timed from `on_step_begin` to the end of `on_step_end` (generation, reference pass, loss with the
ReLaX terms, backward, optimizer, dumps). Step 1 of every arm (warm-up, and the one-off dictionary fit) is
excluded and reported separately. Limit (issue 5): relax / off <= 1.08 (median over rounds of the mean ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

MAX_RATIO = 1.08
ARMS = {
    "off": ["recipe=grpo_tiny"],
    "ref": ["recipe=grpo_tiny", "trainer.beta=1e-9"],
    "relax": ["recipe=grpo_relax_tiny"],
}


def _arm(overrides: list[str], steps: int, workdir: str) -> list[float]:
    from accelerate import PartialState
    from transformers import TrainerCallback, set_seed

    from rlx.config.loader import load_config
    from rlx.run import decide_run_dir, make_run_context
    from rlx.trainers.build import build_trainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    PartialState()
    cfg = load_config(
        [
            *overrides,
            f"trainer.max_steps={steps}",
            "trainer.logging_steps=1",
            "trainer.report_to=[]",
            "eval.before_after=false",
            f"output_dir={workdir}",
        ]
    )
    run = make_run_context(cfg, decide_run_dir(cfg))
    set_seed(cfg.seed)
    trainer = build_trainer(cfg, run).trainer
    timer = StepTimer()
    trainer.add_callback(timer)  # added last: its on_step_end runs after the instruments'
    trainer.train()
    return timer.times


def run(quick: bool = False) -> dict[str, Any]:
    rounds, steps = (1, 11) if quick else (3, 21)
    times: dict[str, list[list[float]]] = {k: [] for k in ARMS}
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            for name, overrides in ARMS.items():
                times[name].append(_arm(overrides, steps, f"{d}/{name}{r}"))
    mean = {k: [statistics.fmean(t[1:]) for t in v] for k, v in times.items()}
    ratio = statistics.median(on / off for on, off in zip(mean["relax"], mean["off"]))
    ratio_ref = statistics.median(on / ref for on, ref in zip(mean["relax"], mean["ref"]))
    return {
        "recipe": "grpo_relax_tiny vs grpo_tiny",
        "rounds": rounds,
        "steps_per_arm": steps,
        "mean_step_s": {k: statistics.median(v) for k, v in mean.items()},
        "first_step_s": {k: statistics.median(t[0] for t in v) for k, v in times.items()},
        "ratio_relax_over_off": ratio,
        "ratio_relax_over_ref": ratio_ref,
        "ratio_ref_over_off": statistics.median(a / b for a, b in zip(mean["ref"], mean["off"])),
        "max_ratio": MAX_RATIO,
        "pass": ratio <= MAX_RATIO,
    }


def report(res: dict[str, Any]) -> str:
    ms = res["mean_step_s"]
    return "\n".join(
        [
            f"relax benchmark ({res['recipe']}, {res['rounds']} round(s) x {res['steps_per_arm']} steps per arm)",
            "  mean step (s, steps 2..N): " + "  ".join(f"{k} {v:.4f}" for k, v in ms.items()),
            "  first step (s):            " + "  ".join(f"{k} {v:.4f}" for k, v in res["first_step_s"].items()),
            f"  ratio relax/off   {res['ratio_relax_over_off']:.3f}  (limit {res['max_ratio']}: "
            f"{'PASS' if res['pass'] else 'FAIL'})",
            f"  ratio relax/ref   {res['ratio_relax_over_ref']:.3f}  (ReLaX terms alone, same reference pass)",
            f"  ratio ref/off     {res['ratio_ref_over_off']:.3f}  (TRL reference forward alone)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(quick=a.quick)
    print(json.dumps(res, indent=1) if a.json else report(res))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
