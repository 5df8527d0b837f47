"""Rollout dumps (`diagnostics.rollouts`, rlx/instruments/rollouts.py): what the policy generated.

- `rollout_samples`: every dumped completion (sample_id, round, step, group_id, prompt, completion, reward,
  reward/<fn>, advantage, ...);
- `best_worst_groups`: per round, the completions of the prompt group with the highest and the lowest mean
  reward, for a browsable sample table;
- `preference_pairs`: the DPO pairs rlx sampled and verified.
"""

from __future__ import annotations

import pandas as pd

from analysis.loader import Run
from rlx import dumps

INSTRUMENT = dumps.ROLLOUTS.instrument
SHOWN = [
    "round",
    "step",
    "group",
    "group_id",
    "prompt",
    "completion",
    "reward",
    "advantage",
    "completion_length",
]


def rollout_samples(run: Run) -> pd.DataFrame | None:
    """Every dumped completion (`rlx.dumps.ROLLOUTS`, all rounds and ranks); None when none was dumped."""
    df = run.read(dumps.ROLLOUTS)
    if df is None:
        return None
    return df.sort_values(["round", "group_id", "sample_id"], ignore_index=True)


def best_worst_groups(samples: pd.DataFrame, rounds: list[int] | None = None) -> pd.DataFrame:
    """For each round (or `rounds`), the rows of its best and worst prompt group by mean reward (`group` column)."""
    out = []
    for rnd, g in samples.groupby("round"):
        if rounds is not None and rnd not in rounds:
            continue
        means = g.groupby("group_id")["reward"].mean().dropna()
        if means.empty:
            continue
        best, worst = means.idxmax(), means.idxmin()
        for label, gid in (("best", best), ("worst", worst)):
            out.append(g[g["group_id"] == gid].assign(group=label))
            if best == worst:
                break
    if not out:
        return pd.DataFrame(columns=SHOWN)
    df = pd.concat(out, ignore_index=True)
    return df[[c for c in SHOWN if c in df.columns]]


def preference_pairs(run: Run) -> pd.DataFrame | None:
    """The DPO pairs (`rlx.dumps.PREFERENCE_PAIRS`); None when the run wrote none."""
    files = run.find_dump(dumps.PREFERENCE_PAIRS)
    return files[0].load() if files else None
