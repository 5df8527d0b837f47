"""The Activation Replay finding command: per-position KL against a direct reference; tables and manifest."""

from __future__ import annotations

import torch

from rlx.embedded import build_tokenizer
from rlx.replay.analysis import KLAnalysisConfig, format_table, main, run_analysis
from rlx.replay.tiny import tiny_pair
from rlx.storage import read_manifest


def _pair_and_tokenizer():
    tok = build_tokenizer()
    base, rl = tiny_pair("qwen2", layers=2, hidden=32, vocab=len(tok), noise=0.3)
    return base, rl, tok


def test_kl_table_matches_reference_and_is_registered(tmp_path):
    base, rl, tok = _pair_and_tokenizer()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("12+34=\n7-5=\n99+1=\n")
    cfg = KLAnalysisConfig(prompts=str(prompts), out=str(tmp_path / "out"), batch_size=2)
    positions, table, diag = run_analysis(cfg, loaded=(base, rl, tok))
    # every character of every prompt, at both layers
    assert len(positions) == 2 * (6 + 4 + 5) and set(positions.layer) == {0, 1}
    # reference: prompt 1 ("7-5="), layer 1 output = HF hidden_states[2] is normed already (last layer)
    ids = torch.tensor([tok("7-5=")["input_ids"]])
    hb = base(ids, output_hidden_states=True).hidden_states[2][0]
    hr = rl(ids, output_hidden_states=True).hidden_states[2][0]
    lp, lq = base.lm_head(hb).double().log_softmax(-1), rl.lm_head(hr).double().log_softmax(-1)
    ref_kl = (lp.exp() * (lp - lq)).sum(-1)
    got = positions[(positions.prompt_index == 1) & (positions.layer == 1)].sort_values("position")
    torch.testing.assert_close(
        torch.tensor(got.kl.to_numpy(), dtype=torch.float64), ref_kl, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(got.base_entropy.to_numpy(), dtype=torch.float64),
        -(lp.exp() * lp).sum(-1),
        rtol=1e-4,
        atol=1e-6,
    )
    # bucket table: per-layer means of the position table, plus layer -1 over all layers
    sub = positions[(positions.layer == 0) & (positions.bucket == positions.bucket.min())]
    row = table[(table.layer == 0) & (table.bucket == sub.bucket.iloc[0])].iloc[0]
    assert row.n_positions == len(sub) and abs(row.kl_mean - sub.kl.mean()) < 1e-9
    assert table[table.layer == -1].n_positions.sum() == len(positions)
    files = {f["name"]: f for f in read_manifest(diag.parent)["files"]}
    assert files["replay_kl_buckets"]["instrument"] == "activation_replay"
    assert files["replay_kl_buckets"]["schema_version"] == 1 and "replay_kl_positions" in files
    assert "mean KL" in format_table(table)


def test_analysis_package_reads_the_table(tmp_path):
    from analysis.loader import Run
    from analysis.measures.activation_shift import activation_shift

    base, rl, tok = _pair_and_tokenizer()
    prompts = tmp_path / "p.txt"
    prompts.write_text("1+2=\n30-4=\n")
    run_dir = tmp_path / "run"
    run_analysis(
        KLAnalysisConfig(prompts=str(prompts), out=str(run_dir), bucketing="quantile", num_buckets=2),
        loaded=(base, rl, tok),
    )
    shift = activation_shift(Run(run_dir))
    assert set(shift.layer) == {0, 1} and set(shift.bucket) == {0, 1}
    assert (shift.n_positions > 0).all() and (shift.kl_mean >= 0).all()


def test_cli_reports_missing_models_as_user_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["num_prompts=3"])
    assert e.value.code == 2 and "needs both models" in capsys.readouterr().err
