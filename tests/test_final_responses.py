"""Gradient alignment's D' in the paper's pilot form: `rlx.alignment.final_responses` writes a finished run's greedy
final-model responses on held-out prompts, and `diagnostics.grad_alignment.target=final:<run_dir>` uses them.

References are independent of the code under test: greedy decoding by a token-by-token argmax loop (no
`generate`, no KV cache), and R_T recomputed in float64 from the file's ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from rlx.alignment.final_responses import main as final_main
from rlx.cli import main as rlx_main
from rlx.config.schema import RunConfig
from rlx.errors import UserError
from rlx.instruments.grad_alignment import GradAlignment
from rlx.run import RunContext
from rlx.storage import read_table

N = 12


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@torch.no_grad()
def _greedy_by_argmax(model, prompt_ids: list[int], eos: int, max_new: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt_ids) :]


@torch.no_grad()
def _nll64(model_dir: Path, rows: list[dict]) -> float:
    """Token-mean NLL of the responses (completion_ids after prompt_ids), in float64 with eval-mode dropout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for r in rows:
        p, c = r["prompt_ids"], r["completion_ids"]
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for j, tok in enumerate(c):  # token c[j] is predicted at position len(p) + j - 1
            total -= float(logp[len(p) + j - 1, tok])
        count += len(c)
    return total / count


@pytest.fixture(scope="module")
def pilot(run_recipe) -> Path:
    """A finished 1-step sft_tiny run with its final responses on N held-out prompts."""
    run_dir = run_recipe(
        "sft_tiny", "trainer.max_steps=1", "trainer.per_device_train_batch_size=8", "eval.before_after=false"
    )
    assert final_main([str(run_dir), f"n={N}", "batch_size=5"]) == run_dir / "final_responses.jsonl"
    return run_dir


@pytest.mark.slow
def test_final_responses_file_is_the_final_models_greedy_output(pilot):
    from transformers import AutoModelForCausalLM

    from rlx.config.loader import load_config
    from rlx.models import load_tokenizer_for
    from rlx.tasks import get_task

    rows = [json.loads(line) for line in (pilot / "final_responses.jsonl").read_text().splitlines()]
    assert len(rows) == N and [r["index"] for r in rows] == list(range(N))
    keys = {"index", "prompt", "prompt_ids", "response", "completion_ids", "answer", "reward"}
    assert all(set(r) == keys for r in rows)
    cfg = load_config([f"recipe={pilot / 'config.yaml'}"])
    task = get_task(cfg.task)
    held_out = task.eval_dataset().select(range(N))
    assert [r["prompt"] for r in rows] == held_out["prompt"]
    assert [r["answer"] for r in rows] == held_out["answer"]
    tok = load_tokenizer_for(str(pilot / "final"))
    model = AutoModelForCausalLM.from_pretrained(pilot / "final").eval()
    for r in rows:
        assert r["prompt_ids"] == tok(text=r["prompt"])["input_ids"]  # the ids TRL builds for a plain prompt
        expected = _greedy_by_argmax(model, r["prompt_ids"], tok.eos_token_id, task.max_completion_length)
        assert r["completion_ids"] == expected, r
        assert r["response"] == tok.decode(expected, skip_special_tokens=True)
        assert r["reward"] == task.score(r["response"], r["answer"])
    assert any(r["completion_ids"][-1] == tok.eos_token_id for r in rows)  # EOS kept: R_T scores it


@pytest.mark.slow
def test_target_final_logs_the_nll_of_the_pilot_responses(pilot, run_recipe, tiny_model_dir):
    """A new run (same config and seed) with target=final:<pilot>: the table and summary say final_pilot, R_T at
    step 1 is the float64 token-mean NLL of the file's responses under the starting model, and R_T + delta_R is
    the same NLL under the run's final model."""
    run_dir = run_recipe(
        "sft_tiny_align",
        "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=8",
        "eval.before_after=false",
        f"diagnostics.grad_alignment.target=final:{pilot}",
    )
    df = read_table(run_dir, "grad_alignment")
    assert (df.target == "final_pilot").all() and df.step.unique().tolist() == [1]
    summary = json.loads((run_dir / "diagnostics" / "grad_alignment_summary.json").read_text())
    assert summary["target"] == "final_pilot" and summary["target_option"] == f"final:{pilot}"
    rows = [json.loads(line) for line in (pilot / "final_responses.jsonl").read_text().splitlines()]
    total = df[df.component == "total"].iloc[0]
    update = df[df.component == "update"].iloc[0]
    before = _nll64(tiny_model_dir, rows)
    after = _nll64(run_dir / "final", rows)
    assert abs(total.R_T - before) / before < 1e-5, (total.R_T, before)
    assert abs(total.R_T + update.delta_R - after) / after < 1e-5, (total.R_T + update.delta_R, after)
    assert abs(after - before) > 1e-4  # the step moved R_T, so the second check is not the first again
    # Deterministic CPU training that the instrument does not perturb: the pilot's final model is this run's,
    # so here final_pilot is exactly the paper's D' (the final responses of the run being measured).
    from safetensors.torch import load_file

    mine, theirs = (
        load_file(run_dir / "final/model.safetensors"),
        load_file(pilot / "final/model.safetensors"),
    )
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---- bad input: one line, exit 2 -----------------------------------------------------------------------------


def test_final_responses_refuses_a_run_without_final(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("algo: sft\n")
    for call in (lambda: final_main([str(run_dir)]), lambda: rlx_main(["final-responses", str(run_dir)])):
        with pytest.raises(SystemExit) as e:
            call()
        assert e.value.code == 2
        _one_line_error(capsys, f"{run_dir} has no final/ model")
    assert not (run_dir / "final_responses.jsonl").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "no run directory given"),
        (["{d}", "n=x"], "n=x: expected an integer"),
        (["{d}", "k=3"], "unknown argument 'k=3'"),
        (["{d}", "{d}"], "two run directories given"),
        (["{d}/missing"], "is not a directory"),
    ],
)
def test_final_responses_bad_arguments(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        final_main([a.format(d=tmp_path) for a in argv])
    assert e.value.code == 2
    _one_line_error(capsys, needle)


def _instrument(tmp_path: Path, target: str, **cfg_over) -> GradAlignment:
    cfg = OmegaConf.structured(RunConfig)
    cfg.algo, cfg.output_dir = "grpo", str(tmp_path / "new")
    for k, v in cfg_over.items():
        OmegaConf.update(cfg, k, v)
    cfg.diagnostics.grad_alignment.enabled = True
    cfg.diagnostics.grad_alignment.target = target
    return GradAlignment(cfg.diagnostics.grad_alignment, RunContext(cfg=cfg, run_dir=tmp_path / "new"))


def _fake_pilot(tmp_path: Path, responses: bool = True, **cfg_over) -> Path:
    d = tmp_path / "pilot"
    (d / "final").mkdir(parents=True)
    cfg = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    for k, v in cfg_over.items():
        section, key = k.split(".") if "." in k else (None, k)
        (cfg[section] if section else cfg)[key] = v
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if responses:
        rows = [
            {"prompt_ids": [3, 4, 5], "completion_ids": [6, 7, 2]},
            {"prompt_ids": [4], "completion_ids": [8]},
        ]
        (d / "final_responses.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def test_target_final_checks_the_pilot_before_training(tmp_path, capsys):
    with pytest.raises(UserError, match="has no config.yaml"):
        _instrument(tmp_path, f"final:{tmp_path / 'nowhere'}")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("algo: sft\n")
    with pytest.raises(UserError, match="has no final/ model"):
        _instrument(tmp_path, f"final:{unfinished}")
    d = _fake_pilot(tmp_path, responses=False)
    with pytest.raises(
        UserError, match=r"final_responses\.jsonl not found.*python -m rlx\.alignment\.final_responses"
    ):
        _instrument(tmp_path, f"final:{d}")
    with pytest.raises(UserError, match="task.name=countdown, this run task.name=arithmetic"):
        _instrument(tmp_path / "x", f"final:{_fake_pilot(tmp_path / 'x', **{'task.name': 'countdown'})}")
    with pytest.raises(UserError, match="model.name_or_path"):
        _instrument(tmp_path / "y", f"final:{_fake_pilot(tmp_path / 'y', **{'model.name_or_path': 'gpt2'})}")
    # another seed is allowed (several seeds may share a pilot) and reported
    _instrument(tmp_path / "z", f"final:{_fake_pilot(tmp_path / 'z', seed=3)}")
    assert "that run used seed=3, this run seed=0" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"responses:.*not found"):
        _instrument(tmp_path, f"responses:{tmp_path / 'none.jsonl'}")
    with pytest.raises(UserError, match="final:<run dir>"):
        _instrument(tmp_path, "final_responses")


def test_target_final_batch_is_the_files_ids_labelled_final_pilot(tmp_path):
    from rlx.alignment.target import batch_from_final

    d = _fake_pilot(tmp_path)
    b = batch_from_final(SimpleNamespace(pad_token_id=0), str(d), size=256)
    assert b.name == "final_pilot"
    assert b.input_ids.tolist() == [[3, 4, 5, 6, 7, 2], [4, 8, 0, 0, 0, 0]]
    # loss_mask[:, j] = 1 where token j+1 is a response token
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert b.n_tokens == 4
    assert batch_from_final(SimpleNamespace(pad_token_id=0), str(d), size=1).input_ids.shape == (1, 6)


def test_auto_target_is_heldout_chosen_for_every_algorithm(tmp_path):
    inst = _instrument(tmp_path, "auto")
    for algo in ("grpo", "ppo", "dpo", "sft"):
        inst.algo = algo
        assert inst._target_name() == "heldout_chosen"
