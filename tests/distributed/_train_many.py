"""Train several runs one after the other in one launch: `_train_many.py RUN_ARGS [--next RUN_ARGS ...]`.

Test-only entry for the ZeRO recipe matrix: a 2-process DeepSpeed launch costs 10-15 s before the first step
(imports, process group, DeepSpeed's init), so runs share one launch. Each RUN_ARGS is what `rlx train` takes
(`recipe=... output_dir=... key=value`); a run that fails stops the launch (the other rank would wait on it).
With RLX_TEST_FSDP_ON_CPU=1, accelerate's FSDP config is honoured on CPU (tests/distributed/_fsdp_on_cpu.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from rlx._entry import prepare_process

    prepare_process(__file__)
    if os.environ.get("RLX_TEST_FSDP_ON_CPU") == "1":  # tests/distributed/_fsdp_on_cpu.py
        from tests.distributed._fsdp_on_cpu import install

        install()


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for a in argv:
        if a == "--next":
            runs.append([])
        else:
            runs[-1].append(a)
    return [r for r in runs if r]


if __name__ == "__main__":
    from accelerate import PartialState

    from rlx.train import main

    for args in split_runs(sys.argv[1:]):
        t0 = time.perf_counter()
        try:
            main(args)
        except SystemExit as e:  # a user error (exit 2) in one run fails the launch with its code
            if e.code:
                print(f"[train_many] {args[0]} exited {e.code}", flush=True)
                raise
        if PartialState().is_main_process:
            print(f"[train_many] {args[0]}: {time.perf_counter() - t0:.1f}s", flush=True)
