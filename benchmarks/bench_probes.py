"""Probe monitors on / off: whole runs of the tiny recipe on the real path, each monitor at its default cadence
(<= 1.10 each, issue 17).

    python -m benchmarks.bench_probes [--rounds 5] [--steps 30] [--width 256]
    python -m benchmarks.run probes

Arms (benchmarks/harness.py: one fresh process per run, rotated order, whole runs timed, CPU time gated):
  off          `grpo_tiny` through `rlx.train.run_training` (entropy_cov and rollout dumps on, as in every run);
  off~         the same again: the A-vs-A control;
  correctness  `diagnostics.correctness_probe.enabled=true` (direction fit, held-out AUROC, update alignment);
  h_neurons    `diagnostics.h_neurons.enabled=true` (CETT taps on every down_proj, the L1 fit at step 1, refits,
               gradient share);
  hidden_rank  `diagnostics.hidden_rank.enabled=true` (SVDs of every measured rollout's states and prefixes);
  probes       `diagnostics.probes.enabled=true` with one random probe on the middle layer (scored every step).
Budgets, CPU time, medians of per-round ratios: each arm / off <= 1.10 over the whole run; the measured step /
off step ratio (steps 10, 20, ...) is reported beside it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Arm, Bench, Budget, all_steps, bench_main

MAX_RATIO = 1.10
EVERY = 10  # the default cadence of correctness_probe, h_neurons and hidden_rank (probes: every step)


def probe_file(width: int, folder: Path) -> Path:
    """A random unit probe on the middle layer's last completion token, written with rlx's own `save_probe`."""
    import torch

    from rlx.instruments.probes import save_probe

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(width, generator=g)
    path = folder / "bench_probe.safetensors"
    save_probe(path, direction / direction.norm(), bias=0.0, layer=2, position="last", name="bench")
    return path


def make(args=None) -> Bench:
    width = int(getattr(args, "width", None) or 128)
    folder = Path(tempfile.mkdtemp(prefix="rlx_bench_probes_"))
    probe = probe_file(width, folder)

    def measured(step: int) -> bool:
        return step > 1 and step % EVERY == 0

    arms = [
        Arm("correctness", ("diagnostics.correctness_probe.enabled=true",)),
        Arm("h_neurons", ("diagnostics.h_neurons.enabled=true",)),
        Arm("hidden_rank", ("diagnostics.hidden_rank.enabled=true",)),
        Arm("probes", ("diagnostics.probes.enabled=true", f"diagnostics.probes.paths=[{probe}]")),
    ]
    budgets = []
    for arm in arms:
        budgets.append(Budget(f"{arm.name} / off", arm.name, MAX_RATIO))
        if arm.name != "probes":
            budgets.append(
                Budget(
                    f"{arm.name} measured step / off step",
                    arm.name,
                    None,
                    metric="step",
                    arm_steps=measured,
                    base_steps=all_steps,
                    steps_desc=f"{arm.name} steps {EVERY}, {2 * EVERY}, ... / off steps 2..N",
                )
            )
    return Bench(
        name="probes",
        title="probe monitors on / off, whole runs",
        base=Arm("off"),
        arms=arms,
        budgets=budgets,
    )


def main(argv: list[str] | None = None) -> int:
    return bench_main(make, argv, __doc__, "benchmarks.run probes")


if __name__ == "__main__":
    sys.exit(main())
