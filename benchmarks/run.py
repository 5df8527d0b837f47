"""Benchmark runner: `python -m benchmarks.run NAME [args...]`, or `all`, or `--list`.

Each benchmark times configurations side by side in one process (interleaved rounds, so background load
hits every arm alike) and prints ratios against its limit. Results are also written as JSON when the
benchmark supports `--json PATH`.
"""

from __future__ import annotations

import importlib
import os
import sys

BENCHMARKS = {
    "grpo_step": (
        "benchmarks.bench_grpo_step",
        "rlx GRPO step vs plain TRL GRPOTrainer step, instruments off (<= 1.02)",
    ),
    "alignment": (
        "benchmarks.bench_alignment",
        "gradient alignment every 10 steps vs off (<= 1.15); logged step <= 3x",
    ),
    "relax": ("benchmarks.bench_relax", "ReLaX on / off on the tiny recipe (<= 1.08)"),
    "storage": (
        "benchmarks.bench_storage",
        "bytes per logged step: alignment (<= 200 KB), ReLaX, activations, rollouts; writes O(1) per step",
    ),
    "replay": (
        "benchmarks.bench_replay",
        "Activation Replay preparation per prompt in prefill-equivalents (<= 30)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        # One intra-op thread unless told otherwise: on a small or shared box OpenMP spin-waiting makes
        # interleaved arms swing by several x and the ratios meaningless. Set before torch is imported.
        "OMP_NUM_THREADS": "1",
    }.items():
        os.environ.setdefault(k, v)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: python -m benchmarks.run NAME [args...] | all\n")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<10} {what}")
        return 0
    name, rest = argv[0], argv[1:]
    names = list(BENCHMARKS) if name == "all" else [name]
    status = 0
    for n in names:
        if n not in BENCHMARKS:
            print(f"error: unknown benchmark '{n}'. Available: {', '.join(BENCHMARKS)}.", file=sys.stderr)
            return 2
        print(f"=== {n}: {BENCHMARKS[n][1]}", flush=True)
        result = importlib.import_module(BENCHMARKS[n][0]).main(rest)
        status = max(status, result if isinstance(result, int) else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
