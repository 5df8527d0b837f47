"""The cost of a code change: the same run on two commits, interleaved on the harness (reported, or gated).

    python -m benchmarks.run versions --base REV [--rounds 5] [--steps 30] [--set KEY=VALUE] [--trl] [--limit X]
    python -m benchmarks.bench_versions --base main~3 --set regularizers=[relax]

Arms (benchmarks/harness.py: one fresh process per run, rotated order, whole runs timed, CPU time):
  before   rlx.train.run_training at commit REV, in a git worktree made under runs/bench/trees/<sha> (its own
           rlx and benchmarks; the run checks it imported rlx from there when its harness reports it);
  before~  the same again: the A-vs-A control;
  after    the same config on this working tree (uncommitted edits included);
  trl      (with --trl) plain trl.GRPOTrainer on this tree, so the rlx / TRL ratio of both commits is printed.
Budget: after / before in whole-run CPU time, reported, or gated at --limit. The recipe is grpo_tiny with its
default instruments unless --set adds overrides (every arm gets them; the old commit must accept them).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import REPO, Arm, Bench, Budget, common_args, exit_code, run_bench, settings_from


def worktree(rev: str, root: Path = REPO) -> Path:
    """A detached git worktree of `rev` under runs/bench/trees/ (reused when it exists)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError:
        print(
            f"error: --base {rev!r} is not a commit of {root}: expected a sha, tag, branch or HEAD~N.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    path = root / "runs" / "bench" / "trees" / sha[:12]
    if not (path / "rlx").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=root, check=True)
    return path


def make(tree: Path, with_trl: bool, limit: float | None, rev: str) -> Bench:
    arms = [Arm("after")] + ([Arm("trl", kind="trl")] if with_trl else [])
    budgets = [Budget(f"after / before ({rev})", "after", limit)]
    if with_trl:
        budgets += [
            Budget("before / TRL", "before", None, base="trl"),
            Budget("after / TRL", "after", None, base="trl"),
        ]
    return Bench(
        name="versions",
        title=f"this tree / {rev}, whole runs",
        base=Arm("before", tree=str(tree)),
        arms=arms,
        budgets=budgets,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.run versions", description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--base", required=True, help="the commit to compare with (sha, tag, branch, HEAD~N)")
    ap.add_argument("--trl", action="store_true", help="add a plain TRL arm: rlx / TRL at both commits")
    ap.add_argument("--limit", type=float, default=None, help="gate after / before at this ratio")
    args = ap.parse_args(argv)
    tree = worktree(args.base)
    bench = make(tree, args.trl, args.limit, args.base)
    settings = settings_from(args, bench.recipe)
    settings["workdir"] = args.workdir
    settings["base_tree"] = str(tree)
    try:
        result = run_bench(bench, settings, args.json)
    finally:
        if not args.keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
            shutil.rmtree(tree, ignore_errors=True)
    return exit_code(result["budgets"])


if __name__ == "__main__":
    sys.exit(main())
