"""Benchmark runner: `python -m benchmarks.run NAME [args...]`, or `all`, or `--list`.

The training benchmarks (overhead, relax, alignment, eval, scaling) run on one harness
(benchmarks/harness.py, docs/performance.md): whole runs of the real training path, each in a fresh process,
arms interleaved round by round (so background load hits every arm alike) with an A-vs-A control, gated on CPU
time, results in runs/bench/<name>.json. A benchmark exits 1 when it fails its limit; `all` (what `make
bench` runs) runs every benchmark but `scaling` and exits 1 when any failed.
"""

from __future__ import annotations

import importlib
import os
import sys

BENCHMARKS = {
    "overhead": (
        "benchmarks.bench_overhead",
        "rlx with default instruments / plain TRL GRPOTrainer, whole runs (<= 1.02)",
    ),
    "alignment": (
        "benchmarks.bench_alignment",
        "gradient alignment every 10 steps / off (<= 1.15); logged step <= 3x; step not logged <= 1.03",
    ),
    "relax": ("benchmarks.bench_relax", "ReLaX on / off, whole runs (<= 1.08)"),
    "probes": (
        "benchmarks.bench_probes",
        "each probe monitor at its default cadence / off, whole runs (<= 1.10)",
    ),
    "eval": ("benchmarks.bench_eval", "in-training evaluation eval.every=10 / off (reported)"),
    "storage": (
        "benchmarks.bench_storage",
        "bytes per logged step: alignment (<= 200 KB), ReLaX, activations, rollouts; writes O(1) per step",
    ),
    "replay": (
        "benchmarks.bench_replay",
        "Activation Replay preparation in prefill-equivalents of CPU time (7B depth <= 30, embedded <= 42)",
    ),
    "versions": (
        "benchmarks.bench_versions",
        "this tree / another commit (--base REV), whole runs interleaved (reported; not in `all`)",
    ),
    "scaling": (
        "benchmarks.bench_scaling",
        "overheads at widths 128/256/512 x two completion lengths (reported; hours, not in `all`)",
    ),
}
NOT_IN_ALL = {"scaling", "versions"}
# Benchmarks on the training harness share its options (--rounds, --steps, --width, ...); `all` passes the
# extra arguments to these only, since storage and replay take options of their own.
HARNESS = {"overhead", "alignment", "relax", "probes", "eval", "scaling", "versions"}


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
    names = [n for n in BENCHMARKS if n not in NOT_IN_ALL] if name == "all" else [name]
    status = 0
    for n in names:
        if n not in BENCHMARKS:
            print(f"error: unknown benchmark '{n}'. Available: {', '.join(BENCHMARKS)}.", file=sys.stderr)
            return 2
        args = rest if name != "all" or n in HARNESS else []
        print(f"=== {n}: {BENCHMARKS[n][1]}" + (f" (args: {' '.join(args)})" if args else ""), flush=True)
        result = importlib.import_module(BENCHMARKS[n][0]).main(args)
        status = max(status, result if isinstance(result, int) else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
