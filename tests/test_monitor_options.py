"""The probe monitors' switches take effect in a real grpo_tiny run: what is turned off is not computed, logged or
written, and the options that reshape a fit or a bucket show in what the run wrote."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.conftest import read_metrics


@pytest.mark.slow
def test_monitor_switches_change_what_the_run_writes(run_recipe, tmp_path):
    from rlx.instruments.probes import save_probe

    probe = save_probe(tmp_path / "p.safetensors", torch.ones(128), layer=2, position="last", name="ones")
    run = run_recipe(
        "grpo_tiny",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=64",
        "trainer.report_to=[]",
        "eval.before_after=false",
        "diagnostics.correctness_probe.enabled=true",
        "diagnostics.correctness_probe.every=1",
        "diagnostics.correctness_probe.min_mixed_groups=1",
        "diagnostics.correctness_probe.update_alignment=false",
        "diagnostics.correctness_probe.save_scores=false",
        "diagnostics.correctness_probe.save_directions=false",
        "diagnostics.h_neurons.enabled=true",
        "diagnostics.h_neurons.consistent_only=false",
        "diagnostics.h_neurons.min_per_class=2",
        "diagnostics.h_neurons.split_half=false",
        "diagnostics.h_neurons.max_features=64",
        "diagnostics.hidden_rank.enabled=true",
        "diagnostics.hidden_rank.every=1",
        "diagnostics.hidden_rank.save_rows=false",
        "diagnostics.probes.enabled=true",
        f"diagnostics.probes.paths=[{probe}]",
        "diagnostics.probes.save_rows=false",
        "diagnostics.probes.threshold=2.0",  # no reward reaches 2: every rollout is in the wrong bucket
    )
    diag = run / "diagnostics"
    rows = {r["step"]: r for r in read_metrics(run) if "step" in r and "loss" in r}
    first = rows[1]
    # correctness_probe: no update alignment, no per-rollout scores, no directions; the step table still written
    assert "correctness_probe/auroc_logp" in first
    assert not any(k.endswith("update_cos") for r in rows.values() for k in r)
    assert not list(diag.glob("correctness_probe/scores_*")) and not list(
        diag.glob("correctness_probe/directions_*")
    )
    assert list(diag.glob("correctness_probe/step_*.parquet"))
    # h_neurons: one full fit on the 64 highest-variance features, no half fits, no split Jaccard
    fits = pd.read_parquet(diag / "h_neurons" / "fits_step000001.parquet")
    assert fits["fit"].tolist() == ["full"] and int(fits["n_features"].iloc[0]) == 64
    assert "h_neurons/split_jaccard" not in first and "h_neurons/mass_wrong" in first
    # hidden_rank: metrics, no rows
    assert "hidden_rank/erank" in first and not (diag / "hidden_rank").exists()
    # probes: threshold 2 puts every rollout in the wrong bucket; no rows written
    assert "probes/ones/mean_wrong" in first and "probes/ones/mean_correct" not in first
    assert first["probes/ones/mean_wrong"] == pytest.approx(first["probes/ones/mean"])
    assert not (diag / "probes").exists()
