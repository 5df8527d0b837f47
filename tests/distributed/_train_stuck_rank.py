"""`rlx/train.py` with the after-training eval run by rank 0 alone on the partitioned policy (a ZeRO-3 bug rlx had).

Test-only entry for the bounded-collective test: rank 0's forward all-gathers parameters that rank 1 never
contributes, so the collective cannot complete; with `trainer.ddp_timeout=S` the launch must fail within about
S seconds, naming the timed-out operation, instead of hanging. Usage: `accelerate launch ... this.py key=value`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from rlx._entry import prepare_process

    prepare_process(__file__)


def install() -> None:
    import torch
    from accelerate import PartialState

    import rlx.train

    calls = []

    def greedy_accuracy(trainer, tokenizer, task, cfg):
        calls.append(1)
        if len(calls) == 2 and PartialState().is_main_process:  # after training, rank 0 only
            print("[stuck_rank] rank 0 runs a forward alone", flush=True)
            policy = trainer.accelerator.unwrap_model(trainer.model)
            with torch.no_grad():
                policy(input_ids=torch.ones(1, 4, dtype=torch.long))
        return {"num_prompts": 0, "greedy_accuracy": 0.0, "greedy_mean_reward": 0.0}

    rlx.train._greedy_accuracy = greedy_accuracy


if __name__ == "__main__":
    install()
    from rlx.train import main

    main()
