"""`make demo`: train the default recipe on the embedded tiny model, print the run dir, the held-out greedy
accuracy before and after, and write the analysis report for the run.

    python -m rlx.demo [key=value ...]     # same overrides as rlx/train.py (default recipe: grpo_tiny)
"""

from __future__ import annotations

import json
import sys
import time

from rlx._entry import prepare_process


def main(argv: list[str] | None = None) -> int:
    prepare_process(__file__)
    argv = sys.argv[1:] if argv is None else argv
    from rlx.errors import exit_on_user_error
    from rlx.train import main as train_main

    t0 = time.time()
    run_dir = exit_on_user_error(train_main)(argv)
    if run_dir is None:  # print_config=true
        return 0
    result = json.loads((run_dir / "eval_before_after.json").read_text())
    from analysis.report import write_report

    report = write_report([run_dir], run_dir / "report.html")
    before, after = result["before"]["greedy_accuracy"], result["after"]["greedy_accuracy"]
    print("\n=== rlx demo ===")
    print(f"run dir:  {run_dir}")
    print(
        f"held-out greedy accuracy: base (warm-started) {100 * before:.1f}%  ->  after RL {100 * after:.1f}%  "
        f"({100 * (after - before):+.1f} points on {result['after']['num_prompts']} prompts)"
    )
    print(f"report:   {report}")
    print(f"time:     {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
