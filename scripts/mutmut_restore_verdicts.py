"""Restore mutmut verdicts that a change of the test selection reset although they cannot have changed.

mutmut 3 resets every cached verdict when `pytest_add_cli_args_test_selection` (or `pytest_add_cli_args`) in
pyproject.toml changes, and then re-collects which tests reach which function. A verdict depends only on the
mutant (its function's source) and on the tests mutmut runs for it (the tests that reach the function), so
for every function whose source hash and associated test set are both unchanged the old verdict still holds.

    cp -r mutants /tmp/mutants.before      # (only *.py.meta and mutmut-stats.json are needed)
    # edit the selection, then let mutmut re-collect the stats (this runs one mutant):
    nice -n 19 .venv/bin/mutmut run --max-children 1 <one mutant name>
    python scripts/mutmut_restore_verdicts.py /tmp/mutants.before mutants

Everything else stays "not checked" for the next `make mutants`. docs/testing.md, "Changing the selection".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def restore(old_root: Path, new_root: Path) -> tuple[int, int]:
    old_tests = json.loads((old_root / "mutmut-stats.json").read_text())["tests_by_mangled_function_name"]
    new_tests = json.loads((new_root / "mutmut-stats.json").read_text())["tests_by_mangled_function_name"]
    restored = left = 0
    for meta_old in sorted(old_root.rglob("*.py.meta")):
        meta_new = new_root / meta_old.relative_to(old_root)
        if not meta_new.exists():
            continue
        old, new = json.loads(meta_old.read_text()), json.loads(meta_new.read_text())
        for key, code in new["exit_code_by_key"].items():
            if code is not None:
                continue
            old_code = old["exit_code_by_key"].get(key)
            mangled = key.split("__mutmut_")[0]
            func = mangled.rsplit(".", 1)[1]
            same_source = old.get("hash_by_function_name", {}).get(func) == new.get(
                "hash_by_function_name", {}
            ).get(func)
            same_tests = sorted(old_tests.get(mangled, [])) == sorted(new_tests.get(mangled, []))
            if old_code is not None and same_source and same_tests:
                new["exit_code_by_key"][key] = old_code
                restored += 1
            else:
                left += 1
        meta_new.write_text(json.dumps(new, indent=4))
    return restored, left


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    restored, left = restore(Path(argv[0]), Path(argv[1]))
    print(f"restored {restored} verdicts; {left} mutants left not checked")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
