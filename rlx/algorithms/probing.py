"""Pure helpers the probe monitors share (rlx/instruments/correctness_probe.py, h_neurons.py, hidden_rank.py,
probes.py): which steps they measure, AUROC, reward buckets, and the per-step collection of per-rollout values
over micro-batches and ranks."""

from __future__ import annotations

from typing import Any

import torch


def measured_step(step: int, every: int, rollout_steps: int = 1) -> bool:
    """Whether (1-based) optimizer `step` is measured: step 1 and every `every`-th step (`every` <= 0: step 1 only).

    A trainer that reuses each rollout for `rollout_steps` > 1 optimizer steps (PPO epochs x minibatches, GRPO's
    num_iterations) is measured only at a rollout's first step, where the policy is the one that sampled it: that
    step is measured when (previous rollout start, step] holds a multiple of `every`.
    """
    if step == 1:
        return True
    if every <= 0:
        return False
    k = max(1, int(rollout_steps))
    if k == 1:
        return step % every == 0
    if (step - 1) % k != 0:
        return False
    return step // every > (step - k) // every


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for boolean `labels`: P[s(pos) > s(neg)] + P[tie]/2, the Mann-Whitney U
    over n_pos * n_neg, from average ranks. NaN when a class is empty or a score is not finite."""
    s = scores.detach().double().flatten().cpu()
    y = labels.detach().bool().flatten().cpu()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or not torch.isfinite(s).all():
        return float("nan")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    avg = first.double() + (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def reward_buckets(rewards: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Boolean masks `correct` (reward >= threshold) and `wrong` (reward < threshold); NaN rewards are in neither."""
    r = rewards.detach().float()
    ok = torch.isfinite(r)
    return {"correct": ok & (r >= threshold), "wrong": ok & (r < threshold)}


class StepRows:
    """Per-rollout values of one optimizer step, collected over its micro-batches, then gathered over ranks.

    `add(sample_ids, **columns)` appends the rows of a micro-batch (a row seen again, as when the trainer reuses
    the rollout, is ignored); `gather(accelerator)` returns every rank's rows concatenated in rank order (a
    collective: every rank calls it) as float64 CPU tensors (the ids as int64) and empties the store.
    """

    def __init__(self) -> None:
        self._cols: dict[str, list[torch.Tensor]] = {}
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, sample_ids: torch.Tensor | None, **columns: torch.Tensor) -> None:
        n = len(next(iter(columns.values())))
        ids = (
            sample_ids.detach().long().cpu()
            if sample_ids is not None
            else torch.arange(len(self._seen), len(self._seen) + n)
        )
        new = torch.tensor([int(i) not in self._seen for i in ids.tolist()], dtype=torch.bool)
        if not new.any():
            return
        self._seen.update(int(i) for i in ids[new].tolist())
        self._cols.setdefault("sample_id", []).append(ids[new])
        for k, v in columns.items():
            self._cols.setdefault(k, []).append(v.detach().double().cpu()[new])

    def gather(self, accelerator: Any = None) -> dict[str, torch.Tensor]:
        local = {k: torch.cat(v) for k, v in self._cols.items()}
        self._cols, self._seen = {}, set()
        if accelerator is None or accelerator.num_processes <= 1:
            return local
        import torch.distributed as dist

        parts: list[Any] = [None] * accelerator.num_processes
        dist.all_gather_object(parts, local)
        keys = sorted({k for p in parts for k in p})
        return {k: torch.cat([p[k] for p in parts if k in p]) for k in keys}
