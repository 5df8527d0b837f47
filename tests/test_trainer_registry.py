"""The trainer registry (rlx/trainers/registry.py, catalog.py): a registered trainer's facts are what the loader, the
build step and the instruments use, an unknown algorithm is an error rather than a silent default, and no module of
rlx/ tests an algorithm's name outside that trainer's own module."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
import _alignment_harness as harness  # noqa: E402

from rlx.config.loader import load_config  # noqa: E402
from rlx.config.schema import RunConfig  # noqa: E402
from rlx.errors import UserError  # noqa: E402
from rlx.instruments.base import LossContext  # noqa: E402
from rlx.storage import read_table  # noqa: E402
from rlx.trainers import registry  # noqa: E402
from rlx.trainers.catalog import spec_of, trainer_names, trainer_spec  # noqa: E402
from rlx.trainers.registry import TrainerSpec, register_trainer  # noqa: E402

RLX = Path(__file__).resolve().parents[1] / "rlx"


@pytest.fixture
def register():
    """register(**changes) -> a spec like GRPO's with `changes`, registered for the test only."""
    saved = dict(registry._REGISTRY)

    def _register(**changes) -> TrainerSpec:
        return register_trainer(dataclasses.replace(trainer_spec("grpo"), **changes))

    yield _register
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def G(df: pd.DataFrame, step: int, comp: str) -> float:
    return float(df[(df.step == step) & (df.component == comp)]["G"].iloc[0])


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# ---- no algorithm names outside their own module ---------------------------------------------------------------


def _algorithm_name_tests(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison with, dict key of, or subscript by a string literal that is an algorithm."""

    def literals(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [v for e in node.elts for v in literals(e)]
        return []

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found = [v for e in (node.left, *node.comparators) for v in literals(e)]
        elif isinstance(node, ast.Dict):
            found = [v for k in node.keys if k is not None for v in literals(k)]
        elif isinstance(node, ast.Subscript):
            found = literals(node.slice)
        else:
            continue
        hits += [(node.lineno, v) for v in found if v in names]
    return hits


def test_no_module_tests_an_algorithm_name_outside_its_trainer_module():
    names = set(trainer_names())
    own = {n: RLX.parent / (trainer_spec(n).build.split(":")[0].replace(".", "/") + ".py") for n in names}
    offenders = []
    for path in sorted(RLX.rglob("*.py")):
        allowed = {n for n, p in own.items() if p == path}
        for line, name in _algorithm_name_tests(ast.parse(path.read_text()), names - allowed):
            offenders.append(f"{path.relative_to(RLX.parent)}:{line} tests algo {name!r}")
    assert not offenders, "read the trainer's spec (rlx/trainers/catalog.py) instead:\n" + "\n".join(
        offenders
    )


def test_the_name_scan_finds_what_it_should():
    src = 'a == "grpo"\nb in ("dpo", "x")\nT = {"ppo": 1}\nd["sft"]\nc = "grpo"\nf("ppo")\nL = ("grpo", "bnpo")\n'
    assert _algorithm_name_tests(ast.parse(src), {"grpo", "dpo", "ppo", "sft"}) == [
        (1, "grpo"),
        (2, "dpo"),
        (3, "ppo"),
        (4, "sft"),
    ]


# ---- an unknown algorithm is an error ----------------------------------------------------------------------------


def test_unknown_algorithm_is_an_error_everywhere(tmp_path):
    with pytest.raises(UserError, match="unknown algo 'reinforce': expected one of grpo, dpo, sft, ppo"):
        trainer_spec("reinforce")
    with pytest.raises(UserError, match="unknown algo 'reinforce'"):
        spec_of(SimpleNamespace(rlx_algo="reinforce"))
    with pytest.raises(UserError, match="unknown algo 'reinforce'"):  # the seam: no instrument sees a default
        LossContext(trainer=None, algo="reinforce", inputs={}, loss=torch.zeros(()), token_logps=None, mask=None,
                    hidden=None)  # fmt: skip
    with pytest.raises(UserError, match="unknown algo 'reinforce'"):  # alignment reads its facts at set-up
        harness.run(tmp_path, "reinforce", steps=1)


def test_registering_a_taken_name_is_an_error(register):
    with pytest.raises(ValueError, match="registered twice"):
        register(name="grpo")


# ---- a registered trainer's facts are used -----------------------------------------------------------------------


def test_loader_validates_against_the_registered_config_class(register):
    register(name="test_dummy", config_class="rlx.trainers.ppo_config:PPOConfig")
    cfg = load_config(["recipe=grpo_tiny", "algo=test_dummy", "trainer.vf_coef=0.25"])
    assert cfg.algo == "test_dummy"
    with pytest.raises(UserError, match="unknown config key 'trainer.vf_coef' for algo=grpo"):
        load_config(["recipe=grpo_tiny", "trainer.vf_coef=0.25"])
    with pytest.raises(UserError, match=r"expected one of grpo, dpo, sft, ppo, (\w+, )*test_dummy\."):
        load_config(["recipe=grpo_tiny", "algo=nope"])


def test_trainer_defaults_and_eval_dataset_come_from_the_spec(register, tmp_path):
    from trl import GRPOConfig

    from rlx.run import check_trainer_numbers
    from rlx.tasks import get_task
    from rlx.trainers.construction import make_trainer_config

    register(name="test_quiet", samples_completions=False, hf_eval_dataset=True)
    run = SimpleNamespace(run_dir=tmp_path)
    trl_default = GRPOConfig.__dataclass_fields__["max_completion_length"].default
    for algo, budget in (
        ("grpo", 5),
        ("test_quiet", trl_default),
    ):  # the task's budget (arithmetic: 5) / TRL's
        cfg = load_config(["recipe=grpo_tiny", f"algo={algo}"])
        assert make_trainer_config(cfg, run, get_task(cfg.task)).max_completion_length == budget
    cfg = load_config(["recipe=grpo_tiny", "algo=test_quiet", "trainer.eval_strategy=steps"])
    check_trainer_numbers(cfg)  # the spec passes an eval dataset: allowed
    cfg.algo = "grpo"
    with pytest.raises(UserError, match="which rlx passes only to dpo, test_quiet"):
        check_trainer_numbers(cfg)


def test_build_dispatches_to_the_registered_build_function(register, tmp_path, monkeypatch):
    import rlx.trainers.build as build_mod
    from rlx.run import make_run_context

    register(name="test_built", build=f"{__name__}:fake_build", default_instruments=())
    monkeypatch.setattr(build_mod, "resolve_model_dir", lambda cfg: "/models/x")
    monkeypatch.setattr(build_mod, "load_tokenizer_for", lambda d: list(range(40)))  # a 40-token vocabulary
    cfg = load_config(["recipe=grpo_tiny", "algo=test_built", f"output_dir={tmp_path}"])
    built = build_mod.build_trainer(cfg, make_run_context(cfg, tmp_path))
    trainer = built.trainer
    assert trainer.model_dir == "/models/x" and trainer.task is built.task
    assert trainer.common["processing_class"] == list(range(40))
    assert not trainer.common["instruments"]  # GRPO's entropy_cov is GRPO's default, not this trainer's


def fake_build(cfg, run, model_dir, task, common):
    return SimpleNamespace(model_dir=model_dir, task=task, common=common)


def test_default_instruments_come_from_the_spec(register, tmp_path):
    from rlx.run import RunContext, build_instruments

    register(name="test_cov", default_instruments=("entropy_cov",))
    register(name="test_plain", default_instruments=())
    register(name="test_bad", default_instruments=("relax",))  # a regularizer is not a default diagnostic
    cfg = OmegaConf.structured(RunConfig)
    for algo, names in (("test_cov", ["entropy_cov"]), ("test_plain", [])):
        cfg.algo = algo
        assert [i.name for i in build_instruments(cfg, RunContext(cfg=cfg, run_dir=tmp_path))] == names
    cfg.algo = "test_bad"
    with pytest.raises(ValueError, match="name no diagnostic instrument"):
        build_instruments(cfg, RunContext(cfg=cfg, run_dir=tmp_path))


def test_alignment_uses_the_registered_temperature_tertiles_and_row_path(register, tmp_path):
    """The same GRPO-like loss through the alignment instrument under specs that differ in one fact each."""
    run = lambda name, algo, **kw: harness.run(tmp_path / name, algo, steps=2, ga=1, kl=False, **kw)  # noqa: E731
    register(name="test_same")
    register(name="test_hot", temperature=lambda trainer: 2.0)
    register(name="test_tokens", tertile_level="token")
    register(name="test_norow", row_fast_path=False)
    act = {"variant": "activation"}
    run("grpo", "grpo", **act)
    run("same", "test_same", **act)
    run("hot", "test_hot", **act)
    run("tokens", "test_tokens", **act)
    ref, same, hot, tok = (
        read_table(tmp_path / n, "grad_alignment") for n in ("grpo", "same", "hot", "tokens")
    )
    for s in (1, 2):
        for c in ("total", "pos", "neg", "top", "mid", "bot"):
            assert rel(G(same, s, c), G(ref, s, c)) < 1e-9, (
                s,
                c,
            )  # GRPO's facts under another name: same rows
        # temperature 2 divides the head's logits by 2 in the activation-space head gradient: G changes
        assert rel(G(hot, s, "total"), G(ref, s, "total")) > 1e-3
        # token tertiles: the components are the same, the reweighting split is not
        assert rel(G(tok, s, "pos"), G(ref, s, "pos")) < 1e-9
        assert any(rel(G(tok, s, c), G(ref, s, c)) > 1e-6 for c in ("top", "mid", "bot"))
    fast, _, _ = run("fast", "grpo")
    slow, _, _ = run("slow", "test_norow")
    assert fast.rowcap is not None and slow.rowcap is None


def test_alignment_logs_only_the_on_policy_step_of_each_rollout(register, tmp_path):
    register(name="test_reuse", steps_per_rollout=lambda args: 2)
    inst, _, _ = harness.run(tmp_path, "test_reuse", steps=4, ga=1, kl=False)
    assert sorted(read_table(tmp_path, "grad_alignment").step.unique()) == [1, 3]
    assert inst.spec.name == "test_reuse" and inst._rollout_steps == 2


def test_kl_coefficient_comes_from_the_spec(register):
    """KL-Cov takes the KL term out of w_t only when the spec says the loss has one."""
    from rlx.instruments.covariance import KLCov

    register(name="test_nokl", kl_coef=registry.no_kl_term)
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(2, 4, generator=g) - 1).requires_grad_(True)
    ref = lp.detach() + 0.1
    beta, adv = 0.5, torch.tensor([1.0, -1.0])
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    loss = (-adv[:, None] * lp + beta * k3).mean()
    trainer = SimpleNamespace(beta=beta, epsilon_low=0.2, epsilon_high=0.2)
    extras = {"advantages": adv, "ref_logps": ref, "completion_len": 4}
    kw = dict(trainer=trainer, inputs={}, loss=loss, token_logps=lp, mask=torch.ones(2, 4), hidden=None)
    with_kl = KLCov._policy_gradient_weights(LossContext(algo="grpo", extras=extras, **kw))
    without = KLCov._policy_gradient_weights(LossContext(algo="test_nokl", extras=extras, **kw))
    torch.testing.assert_close(with_kl, (-adv[:, None] / 8).expand(2, 4))  # the surrogate's w_t alone
    torch.testing.assert_close(without, with_kl + beta * (1 - torch.exp(ref - lp.detach())) / 8)
