"""Per-module mutation score of the last `make mutants` run, read from mutmut's mutants/**/*.py.meta files.

    python scripts/mutation_score.py                 # the table (markdown)
    python scripts/mutation_score.py --survivors     # and every surviving mutant's name
    python scripts/mutation_score.py --json OUT.json # the counts, machine-readable

score = (killed + timeout) / (killed + timeout + survived + no tests): a mutant no selected test reaches counts
as a survivor. Mutants not yet checked (an interrupted run, or one narrowed with MUTANTS=...) are reported
apart and left out of the score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    37: "type check",
}
TIMEOUT_CODES = {-24, 24, 152, 255, 36}


def status(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in TIMEOUT_CODES:
        return "timeout"
    return STATUS.get(code, "suspicious")


def collect(root: Path) -> dict[str, dict[str, list[str]]]:
    """{module path: {status: [mutant names]}} for every mutated file under root/mutants."""
    out: dict[str, dict[str, list[str]]] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        keys = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if not keys:
            continue
        module = str(meta.relative_to(root / "mutants"))[: -len(".meta")]
        by: dict[str, list[str]] = {}
        for name, code in sorted(keys.items()):
            by.setdefault(status(code), []).append(name)
        out[module] = by
    return out


def score(c: Counter) -> float:
    detected = c["killed"] + c["timeout"]
    denom = detected + c["survived"] + c["no tests"]
    return detected / denom if denom else float("nan")


def table(data: dict[str, dict[str, list[str]]]) -> str:
    cols = ["killed", "timeout", "survived", "no tests", "not checked"]
    lines = [
        "| module | mutants | " + " | ".join(cols) + " | score |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    total: Counter = Counter()
    for module, by in data.items():
        c = Counter({k: len(v) for k, v in by.items()})
        total += c
        n = sum(c.values())
        lines.append(f"| {module} | {n} | " + " | ".join(str(c[k]) for k in cols) + f" | {score(c):.1%} |")
    n = sum(total.values())
    lines.append(
        "| **all** | " + f"{n} | " + " | ".join(str(total[k]) for k in cols) + f" | {score(total):.1%} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository root (holds mutants/)")
    ap.add_argument("--survivors", action="store_true", help="also list the surviving mutants")
    ap.add_argument("--json", type=Path, help="write the counts per module to this file")
    args = ap.parse_args(argv)
    data = collect(args.root)
    if not data:
        print(
            f"error: no mutmut results under {args.root / 'mutants'}; run `make mutants` first.",
            file=sys.stderr,
        )
        return 2
    print(table(data))
    if args.survivors:
        for module, by in data.items():
            for name in by.get("survived", []) + by.get("no tests", []):
                print(f"{module}\t{name}")
    if args.json:
        counts = {m: {k: len(v) for k, v in by.items()} for m, by in data.items()}
        args.json.write_text(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
