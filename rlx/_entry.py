"""Process set-up shared by the entry scripts (no telemetry, script dir off sys.path).

Hub access is left to the user's environment (HF conventions): rlx never sets HF_HUB_OFFLINE. It only turns off
TRL's and the hub's telemetry ping unless HF_HUB_DISABLE_TELEMETRY is already set, so that a run on the embedded
model opens no connection at all.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


def prepare_process(script: str) -> None:
    for k, v in {
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(k, v)
    # TRL 1.16 reads `model.is_gradient_checkpointing` around every generation, an alias transformers 5.23
    # deprecates; no rlx setting avoids it. Only that message is hidden.
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    # `python rlx/train.py` puts rlx/ first on sys.path, where e.g. rlx/evaluate.py would shadow HF `evaluate`.
    here = str(Path(script).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
