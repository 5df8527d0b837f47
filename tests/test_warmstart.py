"""The embedded model cache: keyed by config and seed, reproducible, atomic, loaded through from_pretrained."""

from __future__ import annotations

import json
import random

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from rlx.config.loader import load_config
from rlx.embedded import ensure_warm_started, load_tokenizer, warmstart_key
from rlx.embedded.warmstart import teacher_rows
from rlx.tasks import get_task

SMALL = [
    "model.embedded.hidden_size=32",
    "model.embedded.num_layers=1",
    "model.embedded.intermediate_size=64",
    "warmstart.steps=3",
    "warmstart.batch_size=8",
    "task.num_train=64",
    "task.num_eval=8",
]


def test_key_depends_on_everything_that_shapes_the_model():
    base = load_config(["recipe=grpo_tiny"])
    assert warmstart_key(base) == warmstart_key(load_config(["recipe=grpo_tiny", "trainer.max_steps=1"]))
    assert warmstart_key(base) == warmstart_key(
        load_config(["recipe=grpo_tiny", "warmstart.cache_dir=/elsewhere"])
    )
    for change in [
        "seed=1",
        "warmstart.steps=10",
        "warmstart.teacher_bug_rate=0",
        "task.max_digits=3",
        "model.embedded.num_layers=2",
    ]:
        assert warmstart_key(base) != warmstart_key(load_config(["recipe=grpo_tiny", change])), change


def test_warm_start_is_cached_reproducible_and_loadable(tmp_path):
    a = load_config(["recipe=grpo_tiny", *SMALL, f"warmstart.cache_dir={tmp_path / 'a'}"])
    b = load_config(["recipe=grpo_tiny", *SMALL, f"warmstart.cache_dir={tmp_path / 'b'}"])
    pa, pb = ensure_warm_started(a, progress=False), ensure_warm_started(b, progress=False)
    wa, wb = load_file(str(pa / "model.safetensors")), load_file(str(pb / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(
        torch.equal(wa[k], wb[k]) for k in wa
    )  # same config+seed, same weights
    stamp = (pa / "model.safetensors").stat().st_mtime_ns
    assert (
        ensure_warm_started(a, progress=False) == pa
        and (pa / "model.safetensors").stat().st_mtime_ns == stamp
    )
    # no temp dirs left behind (the builders' lock files stay: removing one while a builder waits on it is racy)
    assert not [p for p in pa.parent.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    stats = json.loads((pa / "warmstart.json").read_text())
    assert stats["steps"] == 3 and stats["num_parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(pa)
    tok = load_tokenizer(str(pa))
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.padding_side == "left"


def test_teacher_mixes_buggy_targets_at_the_requested_rate():
    task = get_task(load_config(["recipe=grpo_tiny"]).task)
    train = task.train_dataset()
    clean, n_clean = teacher_rows(task, 0.0, random.Random(0))
    assert n_clean == 0 and [s for _, s in clean] == list(train["solution"])
    rows, n_buggy = teacher_rows(task, 0.6, random.Random(0))
    affected = sum(task.buggy_solution(p) is not None for p in train["prompt"])
    # every buggy target is the bug's answer, and about 60% of the affected problems got one
    changed = [(p, s) for (p, s), ref in zip(rows, train["solution"]) if s != ref]
    assert len(changed) == n_buggy and all(task.buggy_solution(p) == s for p, s in changed)
    assert 0.55 < n_buggy / affected < 0.65
    assert teacher_rows(task, 0.6, random.Random(0)) == (rows, n_buggy)  # reproducible
