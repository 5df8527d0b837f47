"""How each instrument's cost grows with the model: overhead at widths 128 / 256 / 512 and two completion
lengths, on the harness (reported, not gated).

    python -m benchmarks.run scaling [--widths 128 256 512] [--lengths 8 32] [--rounds 5] [--steps 10]
    python -m benchmarks.bench_scaling --widths 128 --lengths 8 --rounds 2 --steps 4    # a quick look

For every (width, length) one harness benchmark (benchmarks/harness.py: one fresh process per run, rotated
order, whole runs timed, CPU time, A-vs-A control) runs the arms
  off     grpo_tiny through rlx.train.run_training (entropy_cov, rollout dumps);   off~  its control;
  trl     plain trl.GRPOTrainer on the same inputs;
  relax   regularizers=[relax];
  align   diagnostics.grad_alignment.enabled=true, every `--every` steps (default 5, so short runs log);
on the embedded model at that width (MLP 4x width, 4 layers, 4 heads) warm-started for `--warmstart-steps`
(default 100, the same for every width so the models are comparable; the default tiny model's 2000 steps would
take hours at width 512), with completions forced to exactly `length` tokens (min = max new tokens) and a
hash-of-the-completion 0/1 reward (`benchmarks.harness.coin_reward`) so every group keeps reward variance. Not
part of `make bench` / `benchmarks.run all` (hours on a 2-core machine at the defaults). Writes
runs/bench/scaling.json and one file per point under runs/bench/scaling/, and prints a Markdown table for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.harness import (
    DEFAULT_ROUNDS,
    REPO,
    Arm,
    Bench,
    Budget,
    length_overrides,
    run_bench,
    width_overrides,
)


def make(every: int) -> Bench:
    return Bench(
        name="scaling",
        title="instrument overheads",
        base=Arm("off"),
        arms=[
            Arm("trl", kind="trl"),
            Arm("relax", ("regularizers=[relax]",)),
            Arm(
                "align",
                ("diagnostics.grad_alignment.enabled=true", f"diagnostics.grad_alignment.every={every}"),
            ),
        ],
        budgets=[
            Budget("rlx / TRL", "off", None, base="trl"),
            Budget("relax / off", "relax", None),
            Budget(f"align every {every} / off", "align", None),
        ],
    )


def table(points: list[dict]) -> str:
    head = (
        "| width | completion tokens | off: run CPU s (median) | rlx / TRL | ReLaX / off | alignment / off | "
        "control (noise floor) |\n|---|---|---|---|---|---|---|"
    )
    rows = []
    for p in points:
        b = {x["label"].split(" ")[0]: x for x in p["budgets"]}

        def cell(x):
            return f"{x['ratio']:.3f} [{x['min']:.3f}, {x['max']:.3f}]"

        rows.append(
            f"| {p['width']} | {p['length']} | {p['arms']['off']['cpu']['median']:.1f} | {cell(b['rlx'])} | "
            f"{cell(b['relax'])} | {cell(b['align'])} | ±{100 * b['relax']['noise_floor']:.1f}% |"
        )
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.run scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=5, help="alignment logs every N steps (default 5)")
    ap.add_argument("--warmstart-steps", type=int, default=100)
    ap.add_argument("--json", default=None, help="default runs/bench/scaling.json")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    points = []
    for width in args.widths:
        for length in args.lengths:
            settings = {
                "rounds": args.rounds,
                "steps": args.steps,
                "overrides": [
                    *width_overrides(width),
                    *length_overrides(length),
                    f"warmstart.steps={args.warmstart_steps}",
                ],
                "keep": args.keep,
                "width": width,
                "length": length,
            }
            bench = make(args.every)
            bench.title = f"instrument overheads at width {width}, {length} completion tokens"
            res = run_bench(
                bench, settings, str(REPO / "runs" / "bench" / "scaling" / f"w{width}_L{length}.json")
            )
            points.append(
                {"width": width, "length": length, **{k: res[k] for k in ("arms", "budgets", "settings")}}
            )
    md = table(points)
    print("\n" + md)
    out = Path(args.json) if args.json else REPO / "runs" / "bench" / "scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"points": points, "markdown": md}, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
