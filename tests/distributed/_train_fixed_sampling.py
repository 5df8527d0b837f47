"""`rlx/train.py` with a sampler whose draws do not depend on how the rollout batch is split over ranks.

Test-only entry for the 1-process vs 2-process parity test. HF `generate` samples each token with
`torch.multinomial` from the process's RNG stream, so 16 rollouts generated in one process differ from 2 x 8
generated in two, even with the same seed and prompts. Here, inside GRPO's generation only, the token of
global row g at position t of generation call c is drawn by inverse CDF from the uniform
u = U_{c,t}[g], where U_{c,t} = rand(world * B_local) from a generator seeded with (seed, c, t). Row g is
`process_index * B_local + local_row`, the order in which TRL's sampler shards the generation batch, so a
1-process run and a 2-process run see the same rollouts. Same distribution as multinomial; training code
untouched. Usage: `accelerate launch ... tests/distributed/_train_fixed_sampling.py recipe=... key=value`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from rlx._entry import prepare_process

    prepare_process(__file__)

import torch

_state = {"active": False, "call": 0, "pos": 0}


def _fixed_multinomial(probs, num_samples=1, replacement=False, *, generator=None, out=None):
    if not _state["active"] or num_samples != 1 or probs.dim() != 2:
        return _orig_multinomial(probs, num_samples, replacement, generator=generator)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    b = probs.shape[0]
    g = torch.Generator().manual_seed(1_000_003 * _state["call"] + _state["pos"])
    u = torch.rand(world * b, generator=g, dtype=torch.float64)[rank * b : (rank + 1) * b]
    _state["pos"] += 1
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    tok = torch.searchsorted(cdf, u.to(cdf.device).unsqueeze(1)).clamp_max(probs.shape[1] - 1)
    return tok


_orig_multinomial = torch.multinomial


@contextlib.contextmanager
def _fixed_sampling():
    _state.update(active=True, call=_state["call"] + 1, pos=0)
    try:
        yield
    finally:
        _state["active"] = False


def install() -> None:
    from trl import GRPOTrainer

    torch.multinomial = _fixed_multinomial
    original = GRPOTrainer._generate_single_turn

    def _generate_single_turn(self, *args, **kwargs):
        with _fixed_sampling():
            return original(self, *args, **kwargs)

    GRPOTrainer._generate_single_turn = _generate_single_turn


if __name__ == "__main__":
    install()
    from rlx.train import main

    main()
