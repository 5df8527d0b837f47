"""grpo_relax_tiny end to end: logged relax/* metrics, the lazy reference KL, dumps readable by analysis."""

from __future__ import annotations

import math

import pytest

from tests.conftest import read_metrics


@pytest.mark.slow
def test_grpo_relax_tiny_logs_and_dumps(run_recipe):
    # xi tiny: every positive trajectory with a transition is over the cap, so the adaptive KL (and its
    # reference pass on those rows only) runs from step 1.
    run_dir = run_recipe(
        "grpo_relax_tiny",
        "trainer.max_steps=4",
        "trainer.report_to=[]",
        "eval.before_after=false",
        "regularizers.relax.xi=1e-6",
        "regularizers.relax.flush_every=2",
    )
    rows = [r for r in read_metrics(run_dir) if "relax/dsd_mean" in r]
    assert len(rows) == 4
    for r in rows:
        for k in ("relax/dsd_mean", "relax/masked_frac", "relax/loss", "relax/kl", "entropy_cov/cov"):
            assert math.isfinite(r[k]), (k, r)
        assert r["relax/xi"] == pytest.approx(1e-6)
        assert r["relax/masked_frac"] > 0
        assert r["relax/loss"] < 0  # z = a * DSD still enters the value where it is detached (above xi)
    assert rows[0]["relax/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the 1st update
    assert rows[-1]["relax/kl"] > 0

    from analysis.loader import Run
    from analysis.measures import relax as relax_tables

    run = Run(run_dir)
    dsd = relax_tables.dsd_over_steps(run)
    assert sorted(dsd[dsd.subset == "all"].step) == [1, 2, 3, 4]
    mean1 = float(dsd[(dsd.subset == "all") & (dsd.step == 1)]["mean"].iloc[0])
    assert mean1 == pytest.approx(rows[0]["relax/dsd_mean"], rel=1e-4)
    spec = relax_tables.spectra(run)
    assert set(spec["index"]) == set(range(50))
    masked = relax_tables.masked_fraction(run)
    assert masked["masked_fraction"].iloc[0] == pytest.approx(rows[0]["relax/masked_frac"], rel=1e-6)
