"""Rollout dumps (`diagnostics.rollouts`): what the policy generated, with its rewards and advantages.

Every GRPO/PPO completion gets a `sample_id` when it is generated: `(round << 32) | global_index`, where
`round` counts generation rounds over the run (restored on resume) and `global_index` is the completion's
position in the generation batch gathered over ranks (`rank * n_local + i`). The id travels with the
completion through TRL's shuffle and split, so the instruments that see it in a micro-batch (ReLaX's
per-trajectory rows) record it too, and their rows join back to the text here.

Kept: `diagnostics.rollouts.fraction` of the completions (1 = all), chosen by a hash of the sample id, so the
choice does not depend on the world size; every `diagnostics.rollouts.every`-th round. One parquet shard per
rank and round, `diagnostics/rollouts/round_NNNNNN.rank{r}.parquet`, written when the round is generated
(nothing is buffered, so a kill loses nothing; a resume puts the directory back as it was at the checkpoint).
Columns and dtypes: `rlx.dumps.ROLLOUTS`.
"""

from __future__ import annotations

from typing import Any

import torch

from rlx.algorithms.stats import masked_mean


def sample_ids(round_: int, rank: int, n: int, device: Any = None) -> torch.Tensor:
    start = rank * n
    return (torch.arange(start, start + n, device=device, dtype=torch.long) + (int(round_) << 32)).long()


def kept(ids: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Bool mask: a deterministic `fraction` of the ids (multiplicative hash, independent of the world size)."""
    if fraction >= 1.0:
        return torch.ones_like(ids, dtype=torch.bool)
    h = (ids.cpu() * 2654435761 + int(seed) * 40503) % 1_000_003
    return (h < int(fraction * 1_000_003)).to(ids.device)


def _masked_mean(x: torch.Tensor | None, mask: torch.Tensor) -> list[float] | None:
    if x is None:
        return None
    if x.dim() == 1:
        return x.float().tolist()
    return masked_mean(x, mask.to(x.dtype), -1).float().tolist()


def rollout_rows(
    batch: dict[str, Any],
    tokenizer: Any,
    rewards_per_func: torch.Tensor | None,
    reward_names: list[str],
    reward_weights: torch.Tensor | None,
    *,
    round_: int,
    step: int,
    rank: int,
    keep: torch.Tensor,
) -> list[dict[str, Any]]:
    """The rows of this rank's completions selected by `keep` (columns: `rlx.dumps.ROLLOUTS`)."""
    idx = keep.nonzero(as_tuple=True)[0].cpu()
    if not len(idx):
        return []
    cmask = batch["completion_mask"]
    pick = lambda t: None if t is None else t.detach()[idx.to(t.device)].cpu()  # noqa: E731
    pmask, pids, cids, cm = (
        pick(batch["prompt_mask"]),
        pick(batch["prompt_ids"]),
        pick(batch["completion_ids"]),
        pick(cmask),
    )
    prompts = tokenizer.batch_decode([p[m.bool()] for p, m in zip(pids, pmask)], skip_special_tokens=True)
    completions = tokenizer.batch_decode([c[m.bool()] for c, m in zip(cids, cm)], skip_special_tokens=True)
    adv = _masked_mean(pick(batch["advantages"]), cm)
    old = _masked_mean(pick(batch.get("old_per_token_logps")), cm)
    ref = _masked_mean(pick(batch.get("ref_per_token_logps")), cm)
    rows = []
    for j, i in enumerate(idx.tolist()):
        row = {
            "sample_id": int(batch["rlx_sample_ids"][i]),
            "round": int(round_),
            "step": int(step),
            "rank": int(rank),
            "group_id": int(batch["rlx_group_ids"][i]),
            "prompt": prompts[j],
            "completion": completions[j],
            "completion_length": int(cm[j].sum()),
            "advantage": adv[j],
            "old_logp_mean": None if old is None else old[j],
            "ref_logp_mean": None if ref is None else ref[j],
        }
        if rewards_per_func is not None:
            r = rewards_per_func[i].float().cpu()
            w = reward_weights.float().cpu() if reward_weights is not None else torch.ones_like(r)
            row["reward"] = float("nan") if torch.isnan(r).all() else float((r * w).nansum())
            for name, v in zip(reward_names, r.tolist()):
                row[f"reward/{name}"] = v
        rows.append(row)
    return rows
