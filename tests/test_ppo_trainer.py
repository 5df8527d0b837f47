"""RLXPPOTrainer end to end on a tiny random model: rollout/loss consistency, the instrument seam, metrics,
checkpoints, and a 2-process DDP run of `recipe=ppo_tiny` through rlx/train.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlx.algorithms.ppo import explained_variance
from rlx.algorithms.stats import kl_estimate, masked_mean, masked_whiten
from rlx.config.schema import EmbeddedModelConfig, TaskConfig
from rlx.instruments.base import Instrument, InstrumentSet, LossTerm

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.1


class Recorder(Instrument):
    """Diagnostic instrument that keeps what the seam hands it."""

    name = "ppo_test_recorder"

    def __init__(self):
        super().__init__(None, None)
        self.seen = []

    def on_loss(self, ctx):
        w = ctx.token_weights()[:, -ctx.completion_len :]
        self.seen.append(
            {
                "c": ctx.completion_len,
                "logps": ctx.completion_logps.detach().clone(),
                "mask": ctx.completion_mask.clone(),
                "w": w.clone(),
                "training": ctx.trainer.model.training,
                "ga": ctx.trainer.current_gradient_accumulation_steps,
                **{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in ctx.extras.items()},
            }
        )
        return LossTerm(metrics={"ppo_test/seen": 1.0})


@pytest.fixture(scope="module")
def tiny_random_model_dir(tmp_path_factory):
    from rlx.embedded import build_model, build_tokenizer

    d = tmp_path_factory.mktemp("ppo_tiny_random")
    tok = build_tokenizer()
    shape = EmbeddedModelConfig(
        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64
    )
    build_model(shape, tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "warmstart.json").write_text(
        json.dumps({"steps": 0})
    )  # marks an embedded dir (char-level tokenizer)
    return d


@pytest.fixture(scope="module")
def trained(tiny_random_model_dir, tmp_path_factory):
    """One rollout of 16 completions, 2 PPO epochs x 2 minibatches = 4 optimizer steps, recorded at the seam."""
    from transformers import AutoModelForCausalLM

    from rlx.embedded import load_tokenizer
    from rlx.tasks import get_task
    from rlx.trainers.ppo import RLXPPOTrainer, build_value_model
    from rlx.trainers.ppo_config import PPOConfig

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ppo_out")
    task = get_task(OmegaConf.structured(TaskConfig(num_train=64, num_eval=8)))
    tok = load_tokenizer(str(tiny_random_model_dir))
    policy = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)

    def digits(prompts, completions, **kw):  # dense shaping so advantages are not all zero on a random model
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    args = PPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=4,
        learning_rate=1e-3,
        ppo_epochs=2,
        num_minibatches=2,
        beta=BETA,
        kl_estimator="k1",
        gamma=1.0,
        lam=0.95,
        value_learning_rate=1e-2,
    )
    rec = Recorder()
    trainer = RLXPPOTrainer(
        model=policy,
        reward_funcs=[*task.reward_funcs, digits],
        args=args,
        train_dataset=task.train_dataset(),
        processing_class=tok,
        value_model=build_value_model(policy, args),
        instruments=InstrumentSet([rec]),
    )
    trainer.train()
    return trainer, rec, out


@pytest.mark.slow
def test_schedule_and_seam_extras(trained):
    trainer, rec, _ = trained
    assert len(rec.seen) == 4  # 2 epochs x 2 minibatches of one rollout
    for s in rec.seen:
        b, c = s["logps"].shape
        assert b == 8 and c == s["c"]
        for k in ("advantages", "old_logps", "ref_logps", "values", "returns"):
            assert s[k].shape == (b, c), k
        assert s["completion_len"] == c
    # The same rollout is reused: epoch 1 sees the same completions as epoch 0.
    olds = sorted(float(s["old_logps"].sum()) for s in rec.seen)
    assert olds[0] == pytest.approx(olds[1]) and olds[2] == pytest.approx(olds[3])


@pytest.mark.slow
def test_rollout_advantages_are_whitened_gae(trained):
    _, rec, _ = trained
    first = rec.seen[:2]  # the two minibatches of epoch 0 = the whole rollout
    cat = lambda k: torch.cat([s[k] for s in first])  # noqa: E731
    mask, adv, ret, val = cat("mask"), cat("advantages"), cat("returns"), cat("values")
    # GAE's raw advantage is R - V; the loss uses it whitened over the mask of the whole rollout.
    torch.testing.assert_close(adv * mask, masked_whiten(ret - val, mask), atol=1e-5, rtol=1e-4)
    assert abs(masked_mean(adv, mask).item()) < 1e-5
    # gamma = 1 and a terminal value of 0: R at the last token = task score - beta * KL_T, with the
    # arithmetic reward in {0, 1} and the digit-fraction reward in [0, 1].
    last = mask.sum(1).long() - 1
    rows = torch.arange(mask.shape[0])
    kl_last = kl_estimate(cat("old_logps"), cat("ref_logps"), "k1")[rows, last]
    score = ret[rows, last] + BETA * kl_last
    assert ((score > -1e-5) & (score < 2 + 1e-5)).all()


@pytest.mark.slow
def test_explained_variance_metric_is_the_rollouts(trained):
    """value/explained_variance is `explained_variance` of the rollout's critic values and returns (one process:
    the variances over all ranks are this rollout's, up to the one-pass sums the trainer reduces)."""
    trainer, rec, _ = trained
    first = rec.seen[:2]  # epoch 0 = the whole rollout
    cat = lambda k: torch.cat([s[k] for s in first])  # noqa: E731
    ev = explained_variance(cat("values"), cat("returns"), cat("mask"))
    logged = [
        h["value/explained_variance"] for h in trainer.state.log_history if "value/explained_variance" in h
    ]
    assert logged[0] == pytest.approx(float(ev), rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_first_minibatch_is_on_policy_and_token_weights(trained):
    _, rec, _ = trained
    s = rec.seen[0]
    m = s["mask"]
    # rho = 1 on the first minibatch of the first epoch.
    torch.testing.assert_close(s["logps"] * m, s["old_logps"] * m, atol=1e-5, rtol=0)
    # Nothing is clipped there, so w_t = dL/dl_t = -A_t rho_t / (N_tokens * GA) for the token-mean loss.
    expected = -s["advantages"] * m / (m.sum() * s["ga"])
    torch.testing.assert_close(s["w"] * m, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_metrics_logged(trained):
    trainer, _, _ = trained
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 4
    keys = set().union(*hist)
    for k in (
        "reward",
        "kl",
        "kl_coef",
        "entropy",
        "clip_ratio/policy",
        "clip_ratio/value",
        "loss/value",
        "loss/policy",
        "value/explained_variance",
        "advantages/mean_raw",
        "advantages/std_raw",
        "returns/mean",
        "approx_kl",
        "grad_norm",
        "grad_norm/policy",
        "grad_norm/value",
        "ppo_test/seen",
    ):
        assert k in keys, k
    assert hist[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert hist[0]["clip_ratio/policy"] == 0.0
    assert hist[0]["kl_coef"] == pytest.approx(BETA)
    assert hist[0]["advantages/std_raw"] > 0
    # later minibatches are off-policy after the first update
    assert max(h["approx_kl"] for h in hist[1:]) > 0


@pytest.mark.slow
def test_checkpoint_has_no_critic(trained, tmp_path):
    import safetensors.torch

    trainer, _, _ = trained
    trainer.save_model(str(tmp_path))
    policy_keys = safetensors.torch.load_file(tmp_path / "model.safetensors").keys()
    assert not any("rlx_critic" in k for k in policy_keys)
    critic = safetensors.torch.load_file(tmp_path / "critic" / "model.safetensors")
    assert "v_head.weight" in critic and any(k.startswith("backbone.") for k in critic)
    # the critic is still attached after saving, and the saved head is the trained one (not the zero init)
    head = trainer.critic_of(trainer.model).v_head.weight.detach().cpu()
    torch.testing.assert_close(critic["v_head.weight"], head)
    assert head.abs().sum() > 0


def test_ppo_config_schedule_and_validation():
    from rlx.config.loader import validate_trainer_args
    from rlx.errors import UserError
    from rlx.trainers.ppo_config import PPOConfig

    kw = dict(
        output_dir="/tmp/rlx_ppo_cfg",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
    )
    c = PPOConfig(**kw, ppo_epochs=3, num_minibatches=2, gradient_accumulation_steps=2)
    assert (c.num_iterations, c.steps_per_generation, c.generation_batch_size) == (3, 4, 32)
    with pytest.raises(ValueError):
        PPOConfig(**kw, kl_estimator="k4")
    with pytest.raises(ValueError):
        PPOConfig(**kw, dual_clip=0.5)
    with pytest.raises(UserError, match="trainer.vf_coef"):
        validate_trainer_args("ppo", {"vf_coeff": 0.1})
    assert validate_trainer_args("ppo", {"vf_coef": 1, "gamma": 0.99})["vf_coef"] == 1.0


@pytest.mark.slow
@pytest.mark.distributed
def test_ppo_tiny_ddp_two_processes(tiny_random_model_dir, tmp_path):
    """`recipe=ppo_tiny` under 2-process DDP over gloo (accelerate --multi_gpu; `--cpu` would run 1 process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(ROOT / "rlx" / "train.py"), "recipe=ppo_tiny", f"model.name_or_path={tiny_random_model_dir}",
        f"output_dir={tmp_path}", "trainer.max_steps=3", "trainer.per_device_train_batch_size=8",
        "trainer.num_generations=4", "trainer.max_completion_length=6", "trainer.report_to=[]",
        "task.num_train=64", "task.num_eval=8", "eval.before_after=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for k in ("reward", "kl", "value/explained_variance", "clip_ratio/value", "approx_kl", "grad_norm"):
        assert any(k in r for r in steps), k
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "final" / "critic" / "model.safetensors").exists()


@pytest.mark.slow
def test_ppo_qwen3_gsm8k_recipe_loads_and_steps(tmp_path):
    """The GPU recipe, loaded as written, with a tiny local Qwen3 directory and GSM8K-shaped local jsonl files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlx.embedded import build_tokenizer
    from rlx.train import main

    model_dir = tmp_path / "qwen3_tiny"
    tok = build_tokenizer()
    qcfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, head_dim=16, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    Qwen3ForCausalLM(qcfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for split, n in (("train", 8), ("test", 4)):
        rows = [
            {
                "question": f"Tom has {i} apples and buys 2. How many?",
                "answer": f"{i}+2={i + 2}\n#### {i + 2}",
            }
            for i in range(n)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run_dir = main(
        [
            "recipe=ppo_qwen3_gsm8k", f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}",
            "model.dtype=float32", f"task.dataset={tmp_path / 'train.jsonl'}",
            f"task.eval_dataset={tmp_path / 'test.jsonl'}", "task.max_eval_samples=4", "eval.max_new_tokens=8",
            "trainer.bf16=false", "trainer.gradient_checkpointing=false", "trainer.max_completion_length=8",
            "trainer.max_steps=1", "trainer.per_device_train_batch_size=4", "trainer.gradient_accumulation_steps=1",
            "trainer.num_generations=2", "trainer.save_strategy='no'", "trainer.warmup_steps=0",
            "trainer.use_vllm=false",
        ]
    )  # fmt: skip
    cfg = (run_dir / "config.yaml").read_text()
    assert "algo: ppo" in cfg and "Qwen" not in cfg.split("name_or_path:")[1].split("\n")[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 1 and steps[0]["kl_coef"] == pytest.approx(0.01)
    assert json.loads((run_dir / "run_info.json").read_text())["algo"] == "ppo"
    assert (run_dir / "final" / "critic" / "model.safetensors").exists()


def _bare_ppo_trainer(model_dir, out, **over):
    """An RLXPPOTrainer on the tiny random model, not trained (for the clipping tests)."""
    from transformers import AutoModelForCausalLM

    from rlx.embedded import load_tokenizer
    from rlx.tasks import get_task
    from rlx.trainers.ppo import RLXPPOTrainer, build_value_model
    from rlx.trainers.ppo_config import PPOConfig

    task = get_task(OmegaConf.structured(TaskConfig(num_train=16, num_eval=4)))
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    args = PPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        max_steps=1, max_grad_norm=1.0, **over,
    )  # fmt: skip
    return RLXPPOTrainer(
        model=policy,
        reward_funcs=task.reward_funcs,
        args=args,
        train_dataset=task.train_dataset(),
        processing_class=load_tokenizer(str(model_dir)),
        value_model=build_value_model(policy, args),
    )


@pytest.mark.parametrize("policy_scale", [0.5, 4.0])  # policy gradient norm below / above max_grad_norm = 1
def test_separate_clipping_ignores_the_critic_norm(tiny_random_model_dir, tmp_path, policy_scale):
    """With a critic gradient of norm 1e3, `separate` gives the policy the update it would get with the critic
    absent (its own gradient clipped alone); `joint` shrinks it by the critic's norm. Asserted on the actual
    SGD parameter deltas after the trainer's clipping."""
    deltas, logged = {}, {}
    for mode in ("separate", "joint"):
        tr = _bare_ppo_trainer(tiny_random_model_dir, tmp_path / mode, grad_clip=mode)
        critic_ids = {id(p) for p in tr.critic_of(tr.model).parameters()}
        params = list(tr.model.parameters())
        pol = [p for p in params if id(p) not in critic_ids]
        val = [p for p in params if id(p) in critic_ids]
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        n_pi0 = torch.nn.utils.get_total_norm([p.grad for p in pol])
        n_v0 = torch.nn.utils.get_total_norm([p.grad for p in val])
        for p in pol:
            p.grad.mul_(policy_scale / n_pi0)  # ||g_pi|| = policy_scale
        for p in val:
            p.grad.mul_(1e3 / n_v0)  # ||g_V|| = 1000
        expected_pi = [p.grad.clone() * min(1.0, 1.0 / policy_scale) for p in pol]  # clipped alone
        before = [p.detach().clone() for p in pol]
        total = tr._clip_grad_norm(tr.model)
        assert float(total) == pytest.approx(math.hypot(policy_scale, 1e3), rel=1e-5)
        torch.optim.SGD(params, lr=0.1).step()
        deltas[mode] = [p.detach() - b for p, b in zip(pol, before)]
        logged[mode] = {k: tr._metrics["train"][k][-1] for k in ("grad_norm/policy", "grad_norm/value")}
        n_v_after = float(torch.nn.utils.get_total_norm([p.grad for p in val]))
        if mode == "separate":
            for d, e in zip(deltas[mode], expected_pi):
                torch.testing.assert_close(d, -0.1 * e, rtol=1e-4, atol=1e-7)  # fp32 p_new - p_old
            assert n_v_after == pytest.approx(1.0, rel=1e-5)  # the critic clipped to max_grad_norm alone
    for mode in ("separate", "joint"):
        assert logged[mode]["grad_norm/policy"] == pytest.approx(policy_scale, rel=1e-5)
        assert logged[mode]["grad_norm/value"] == pytest.approx(1e3, rel=1e-5)
    norm = {m: float(torch.nn.utils.get_total_norm(deltas[m])) for m in deltas}
    # joint: the policy step is scaled by max_grad_norm / ||(g_pi, g_V)|| ~ 1e-3 instead of min(1, 1/||g_pi||)
    assert norm["separate"] == pytest.approx(0.1 * min(policy_scale, 1.0), rel=1e-5)
    assert norm["joint"] == pytest.approx(0.1 * policy_scale / math.hypot(policy_scale, 1e3), rel=1e-4)


def test_vllm_importance_sampling_ratio_reweights_the_policy_loss(tiny_random_model_dir, tmp_path):
    """Rollouts from vLLM carry TRL's `importance_sampling_ratio`: PPO's per-token policy loss is multiplied by it."""
    tr = _bare_ppo_trainer(tiny_random_model_dir, tmp_path, vf_coef=0.0)
    g = torch.Generator().manual_seed(0)
    B, P, C = 4, 3, 5
    inputs = {
        "prompt_ids": torch.randint(3, 20, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, 20, (B, C), generator=g),
        "completion_mask": torch.ones(B, C, dtype=torch.long),
        "ppo_mask": torch.ones(B, C),
        "advantages": torch.randn(B, C, generator=g),
        "old_values": torch.zeros(B, C),
        "returns": torch.zeros(B, C),
    }
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        inputs["old_per_token_logps"], _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, att, C)
    plain = tr._ppo_loss(tr.model, inputs).item()
    ratio = torch.rand(B, C, generator=g) + 0.5
    weighted = tr._ppo_loss(tr.model, {**inputs, "importance_sampling_ratio": ratio}).item()
    # on-policy (rho = 1, nothing clipped): per-token loss -A_t, so the weighted loss is mean(-A_t * ratio_t)
    assert plain == pytest.approx(float(-inputs["advantages"].mean()), rel=1e-5)
    assert weighted == pytest.approx(float((-inputs["advantages"] * ratio).mean()), rel=1e-5)
    seq = torch.full((B, 1), 0.25)  # sequence-level modes give one ratio per row
    assert tr._ppo_loss(tr.model, {**inputs, "importance_sampling_ratio": seq}).item() == pytest.approx(
        0.25 * plain, rel=1e-5
    )


def test_grad_clip_option_is_validated():
    from rlx.trainers.ppo_config import PPOConfig

    with pytest.raises(ValueError, match="grad_clip"):
        PPOConfig(output_dir="/tmp/rlx_ppo_cfg", use_cpu=True, per_device_train_batch_size=8, num_generations=4,
                  grad_clip="both")  # fmt: skip
