"""The one metrics channel (rlx.instruments.base.log_metrics): what reaches TRL's `_metrics`, per reduction."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlx.instruments import log_metrics


class FakeAccelerator:
    """`reduce(sum)` as if `world` ranks held the given tensor and the `others` (one tensor per other rank)."""

    def __init__(self, others=()):
        self.others = [torch.tensor(o) for o in others]
        self.num_processes = 1 + len(self.others)
        self.device = torch.device("cpu")
        self.reduced = 0

    def reduce(self, x, reduction):
        assert reduction == "sum"
        self.reduced += 1
        # the first call reduces the zero-filled values, the second the finite flags
        first = self.reduced % 2 == 1
        out = x.clone()
        for o in self.others:
            fin = torch.isfinite(o)
            out = out + (torch.where(fin, o, torch.zeros_like(o)) if first else fin.float())
        return out


def trainer(training=True, others=()):
    return SimpleNamespace(
        model=SimpleNamespace(training=training),
        accelerator=FakeAccelerator(others),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def test_mean_on_one_process_goes_through_float32():
    t = trainer()
    log_metrics(t, {"b/x": 0.1, "a/y": torch.tensor(2.0)})
    assert t._metrics["train"] == {"a/y": [2.0], "b/x": [float(torch.tensor(0.1, dtype=torch.float32))]}
    assert list(t._metrics["train"]) == ["a/y", "b/x"]  # sorted: every rank reduces the same order
    assert t.accelerator.reduced == 0


def test_mean_over_ranks_leaves_out_non_finite_values():
    t = trainer(others=[[3.0, float("nan"), float("nan")]])
    log_metrics(t, {"m": 1.0, "n": 4.0, "o": float("nan")})
    got = t._metrics["train"]
    assert got["m"] == [2.0] and got["n"] == [4.0]
    assert len(got["o"]) == 1 and got["o"][0] != got["o"][0]
    assert t.accelerator.reduced == 2  # one collective for the values, one for the counts, for all metrics


def test_none_keeps_the_values_and_runs_no_collective():
    t = trainer(training=False, others=[[0.0]])
    log_metrics(t, {"kl": torch.tensor(0.25, dtype=torch.float64), "c": 0.1}, reduce="none")
    assert t._metrics["eval"] == {"kl": [0.25], "c": [0.1]}  # exact: no float32 round trip
    assert t.accelerator.reduced == 0


def test_mode_and_empty_and_unknown_reduction():
    t = trainer(training=False)
    log_metrics(t, {"g": 1.0}, reduce="none", mode="train")
    assert t._metrics["train"]["g"] == [1.0] and not t._metrics["eval"]
    log_metrics(t, {})
    assert not t._metrics["eval"]
    with pytest.raises(ValueError, match="reduce='sum'"):
        log_metrics(t, {"g": 1.0}, reduce="sum")
