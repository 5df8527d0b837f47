"""Bytes each instrument writes per logged step, through the real training path (`rlx.train.run_training`).

    python -m benchmarks.bench_storage            # grpo_tiny, 50 steps, every instrument on
    python -m benchmarks.bench_storage --quick    # 12 steps (CI)
    python -m benchmarks.run storage              # through the benchmark runner

One run of the tiny recipe with gradient alignment (every `--every` steps), ReLaX, activations (every
`--activations-every` steps) and rollouts (the default 10% of completions) writes its run directory exactly as
`rlx/train.py` does. Every write goes through `DiagnosticsWriter.register`, which the benchmark wraps to
count, per instrument, the bytes of the file written and the bytes the manifest grew by (a manifest that is
rewritten whole counts its whole size, as it did before manifest version 2). Reported per instrument:

    logged     steps the instrument recorded (alignment: logged steps; relax: recorded steps; activations:
               saves; rollouts: generation rounds)
    stored     bytes on disk at the end / logged step
    written    bytes written (files + manifest) / logged step; `growth` = written per logged step in the second
               half of the run / in the first half (1 when writes are O(1) per step; rewriting a growing file
               makes it grow with the run)

Limits: alignment written per logged step <= 200 KB; growth <= 1.5 for alignment, activations and rollouts
(ReLaX buffers its rows and flushes every `flush_every` steps, so its writes are not spread evenly over a run).
ReLaX is also broken down by file kind per recorded step (trajectory rows, spectrum summaries, full spectra
every `full_spectra_every` steps, dictionary and fits).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

MAX_ALIGNMENT_BYTES = 200_000
MAX_GROWTH = 1.5
INSTRUMENTS = ("grad_alignment", "relax", "activations", "rollouts")
_NUM = re.compile(r"(?:step|round)_?(\d+)")


class WriteLog:
    """Wraps DiagnosticsWriter.register: one record per write (instrument, path, file bytes, manifest bytes)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def install(self):
        from rlx import storage as m

        original = m.DiagnosticsWriter.register
        log = self

        def register(writer, name, path, fmt, schema_version, instrument, description, **extra):
            man = [writer.dir / n for n in ("manifest.jsonl", "manifest.json") if (writer.dir / n).exists()]
            before = {p: (p.stat().st_ino, p.stat().st_size) for p in man}
            out = original(writer, name, path, fmt, schema_version, instrument, description, **extra)
            grown = 0
            for p in (writer.dir / "manifest.jsonl", writer.dir / "manifest.json"):
                if not p.exists():
                    continue
                ino, size = p.stat().st_ino, p.stat().st_size
                if p not in before:
                    grown += size
                elif ino != before[p][0]:  # replaced: the whole manifest was rewritten
                    grown += size
                else:
                    grown += size - before[p][1]
            log.records.append(
                {
                    "instrument": instrument,
                    "path": str(Path(path).relative_to(writer.dir)),
                    "bytes": Path(path).stat().st_size,
                    "manifest_bytes": grown,
                }
            )
            return out

        m.DiagnosticsWriter.register = register
        return original


def _logged_steps(instrument: str, run_dir: Path, paths: list[str]) -> int:
    if instrument == "relax":  # one shard holds many steps: count the recorded steps in the rows
        import pandas as pd

        steps: set[int] = set()
        for p in sorted({p for p in paths if "trajectories" in p}):
            steps |= set(pd.read_parquet(run_dir / "diagnostics" / p)["step"].tolist())
        return len(steps)
    nums = {int(m.group(1)) for p in paths for m in [_NUM.search(Path(p).name)] if m}
    return len(nums)


def _relax_kind(path: str) -> str:
    name = Path(path).name
    for kind in ("trajectories", "spectra_summary", "spectra", "dictionary_fit", "dictionary"):
        if name.startswith(kind):
            return kind
    return "other"


def measure(steps: int, every: int, activations_every: int, workdir: str, extra: list[str]) -> dict[str, Any]:
    from rlx.config.loader import load_config
    from rlx.train import run_training

    log = WriteLog()
    original = log.install()
    try:
        cfg = load_config(
            [
                "recipe=grpo_tiny",
                "regularizers=[relax]",
                "diagnostics.grad_alignment.enabled=true",
                f"diagnostics.grad_alignment.every={every}",
                "diagnostics.activations.enabled=true",
                f"diagnostics.activations.every={activations_every}",
                f"trainer.max_steps={steps}",
                "trainer.save_steps=100000",
                "trainer.report_to=[]",
                "eval.before_after=false",
                f"output_dir={workdir}/run",
                *extra,
            ]
        )
        run_dir = run_training(cfg)
    finally:
        from rlx import storage as m

        m.DiagnosticsWriter.register = original
    diag = run_dir / "diagnostics"
    out: dict[str, Any] = {}
    for inst in INSTRUMENTS:
        recs = [r for r in log.records if r["instrument"] == inst]
        paths = sorted({r["path"] for r in recs})
        n = _logged_steps(inst, run_dir, paths)
        stored = sum((diag / p).stat().st_size for p in paths if (diag / p).exists())
        written = sum(r["bytes"] + r["manifest_bytes"] for r in recs)
        row: dict[str, Any] = {
            "logged_steps": n,
            "files": len(paths),
            "writes": len(recs),
            "stored_bytes": stored,
            "written_bytes": written,
            "manifest_bytes": sum(r["manifest_bytes"] for r in recs),
            "stored_per_logged_step": stored / n if n else None,
            "written_per_logged_step": written / n if n else None,
        }
        half = len(recs) // 2
        if inst != "relax" and half >= 2:
            first = [r["bytes"] + r["manifest_bytes"] for r in recs[1:half]]  # the first write may set up
            second = [r["bytes"] + r["manifest_bytes"] for r in recs[half:]]
            row["growth"] = (sum(second) / len(second)) / (sum(first) / len(first))
        if inst == "relax" and n:
            kinds: dict[str, int] = defaultdict(int)
            for p in paths:
                if (diag / p).exists():
                    kinds[_relax_kind(p)] += (diag / p).stat().st_size
            row["stored_per_recorded_step_by_kind"] = {k: v / n for k, v in sorted(kinds.items())}
            full_every = int(getattr(cfg.regularizers.relax, "full_spectra_every", 1))  # 1: rlx before v2
            full_steps = sum(
                1 for s in range(1, steps + 1) if full_every > 0 and (s == 1 or s % full_every == 0)
            )
            row["full_spectra_steps"] = full_steps
            if full_steps and "spectra" in kinds:  # what a step with full spectra costs, and the steady state
                per_full = kinds["spectra"] / full_steps
                row["full_spectra_bytes_per_full_step"] = per_full
                row["steady_state_per_step"] = (
                    sum(kinds.get(k, 0) for k in ("trajectories", "spectra_summary")) / n
                    + per_full / full_every
                )
        out[inst] = row
    return {"run_dir": str(run_dir), "instruments": out}


def run(
    quick: bool = False, every: int = 2, activations_every: int = 5, extra: list[str] | None = None
) -> dict:
    steps = 12 if quick else 50
    with tempfile.TemporaryDirectory() as d:
        res = measure(steps, every, activations_every, d, extra or [])
    ga = res["instruments"]["grad_alignment"]
    checks = {
        "alignment_written_per_logged_step": (ga["written_per_logged_step"] or 0) <= MAX_ALIGNMENT_BYTES,
        **{
            f"{k}_growth": res["instruments"][k].get("growth", 1.0) <= MAX_GROWTH
            for k in INSTRUMENTS
            if k != "relax"
        },
    }
    return {
        "recipe": "grpo_tiny",
        "steps": steps,
        "alignment_every": every,
        "activations_every": activations_every,
        **res,
        "limits": {"alignment_written_per_logged_step": MAX_ALIGNMENT_BYTES, "growth": MAX_GROWTH},
        "checks": checks,
        "pass": all(checks.values()),
    }


def _table(res: dict) -> str:
    head = f"{'instrument':<15}{'logged':>7}{'files':>7}{'stored/step':>13}{'written/step':>14}{'manifest':>10}{'growth':>8}"
    lines = [head, "-" * len(head)]
    for k, r in res["instruments"].items():
        kb = lambda x: "-" if x is None else f"{x / 1000:.1f} KB"  # noqa: E731
        n = r["logged_steps"] or 1
        growth = f"{r['growth']:.2f}" if "growth" in r else "-"
        lines.append(
            f"{k:<15}{r['logged_steps']:>7}{r['files']:>7}{kb(r['stored_per_logged_step']):>13}"
            f"{kb(r['written_per_logged_step']):>14}{r['manifest_bytes'] / n:>8.0f} B{growth:>8}"
        )
    rx = res["instruments"]["relax"]
    if "stored_per_recorded_step_by_kind" in rx:
        parts = ", ".join(f"{k} {v / 1000:.1f} KB" for k, v in rx["stored_per_recorded_step_by_kind"].items())
        lines.append(f"relax per recorded step: {parts}")
        if "steady_state_per_step" in rx:
            lines.append(
                f"relax full spectra: {rx['full_spectra_bytes_per_full_step'] / 1000:.1f} KB at each of "
                f"{rx['full_spectra_steps']} full steps; steady state {rx['steady_state_per_step'] / 1000:.1f} KB/step"
            )
    lines.append(
        f"limits: alignment written <= {MAX_ALIGNMENT_BYTES / 1000:.0f} KB per logged step; growth <= {MAX_GROWTH}"
    )
    lines.append(
        "PASS" if res["pass"] else "FAIL: " + ", ".join(k for k, ok in res["checks"].items() if not ok)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    for k, v in {"HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}.items():
        os.environ.setdefault(k, v)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 steps instead of 50")
    ap.add_argument("--every", type=int, default=2, help="gradient alignment: log every N steps")
    ap.add_argument("--activations-every", type=int, default=5, help="activations: save every N steps")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument(
        "overrides", nargs="*", help="extra config overrides, e.g. regularizers.relax.full_spectra_every=1"
    )
    args = ap.parse_args(argv)
    res = run(args.quick, args.every, args.activations_every, args.overrides)
    print(_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
