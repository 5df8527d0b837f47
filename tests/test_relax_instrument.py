"""The `relax` instrument on a synthetic seam: metrics, gradients, dumps, resume, ref-logps requirement."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from rlx.algorithms.stats import kl_k3
from rlx.config.schema import RelaxConfig
from rlx.errors import UserError  # noqa: F401
from rlx.instruments.base import InstrumentSet, LossContext
from rlx.instruments.catalog import registered_instruments
from rlx.regularizers.dsd import dynamic_spectral_dispersion
from rlx.regularizers.koopman import dictionary_features, koopman_operator
from rlx.run import RunContext
from rlx.storage import DiagnosticsWriter, read_manifest

B, S, C, D = 8, 14, 10, 16


def fake_trainer(step=0, beta=1e-9):
    return SimpleNamespace(
        state=SimpleNamespace(global_step=step),
        beta=beta,
        num_generations=4,
        args=SimpleNamespace(max_completion_length=12),
    )


def make_ctx(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=g).requires_grad_(True)
    lengths = torch.tensor([10, 7, 3, 2, 10, 9, 5, 1])
    mask = torch.zeros(B, S - 1)
    for i, n in enumerate(lengths):
        mask[i, S - 1 - C : S - 1 - C + int(n)] = 1
    token_logps = (hidden[:, :-1].sum(-1) * 0.01 - 1.0) * mask
    adv = torch.tensor([1.0, -1.0, 0.5, 0.2, -0.3, 2.0, 0.0, 1.0])
    ref = token_logps[:, -C:].detach() + 0.2 * torch.randn(B, C, generator=g)
    loss = -(adv[:, None] * token_logps[:, -C:]).sum() / mask.sum()
    extras = {
        "advantages": adv,
        "ref_logps": ref,
        "group_ids": torch.arange(B) // 4,
        "completion_len": C,
    }
    return LossContext(trainer, "grpo", {}, loss, token_logps, mask, hidden, None, 1.0, extras=extras)


def make(tmp_path, **kw):
    cfg = OmegaConf.structured(RelaxConfig(**{"dict_batch_size": 4, "dict_steps": 16, **kw}))
    run = RunContext(cfg=None, run_dir=tmp_path, writer=DiagnosticsWriter(tmp_path))
    return registered_instruments()["relax"](cfg, run)


def tiny_policy(path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.slow
def test_lazy_reference_scores_initial_policy(tmp_path):
    from rlx.instruments.reference import LazyReference

    policy = tiny_policy(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    inputs = {
        "prompt_ids": torch.randint(0, 23, (4, 5), generator=g),
        "prompt_mask": torch.ones(4, 5, dtype=torch.long),
        "completion_ids": torch.randint(0, 23, (4, 6), generator=g),
        "completion_mask": torch.ones(4, 6, dtype=torch.long),
    }
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[:, 4:-1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # the policy moves; the reference stays the initial one
        for p in policy.parameters():
            p.add_(0.1)
    trainer = SimpleNamespace(model=policy, temperature=0.7)
    rows = torch.tensor([1, 3])
    got = LazyReference().logps(trainer, inputs, rows)
    torch.testing.assert_close(got, expected[rows], rtol=1e-5, atol=1e-5)


def test_relax_step_metrics_gradients_dumps_and_resume(tmp_path):
    trainer = fake_trainer()
    inst = make(tmp_path)
    inst.on_train_begin(trainer)
    ctx = make_ctx(trainer)
    loss, metrics = InstrumentSet([inst]).on_loss(ctx)
    assert set(metrics) >= {
        "relax/dsd_mean",
        "relax/dsd_pos_mean",
        "relax/masked_frac",
        "relax/loss",
        "relax/kl",
    }
    # recompute DSD with the fitted dictionary: the metrics are what the formulas say
    w = inst.weight.double()
    h64, m64 = ctx.completion_hidden.detach().double(), ctx.completion_mask.double()
    k = koopman_operator(dictionary_features(h64, w), m64, 1e-3)  # float64 reference
    dsd, _ = dynamic_spectral_dispersion(k, "svd", 1e-3)
    assert metrics["relax/dsd_mean"] == pytest.approx(float(dsd.mean()), rel=1e-5)
    pos = ctx.extras["advantages"] > 0
    assert metrics["relax/dsd_pos_mean"] == pytest.approx(float(dsd[pos].mean()), rel=1e-5)
    assert inst.xi == pytest.approx(25.0 * float(dsd.median()), rel=1e-5)
    assert metrics["relax/masked_frac"] == 0.0 and metrics["relax/kl"] == 0.0  # nothing above xi yet
    a = ctx.extras["advantages"].clamp_min(0)
    e = torch.exp(-a * dsd)
    expected = 0.5 * (torch.log(e[:4].mean()) + torch.log(e[4:].mean()))
    assert metrics["relax/loss"] == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert torch.isfinite(ctx.hidden.grad).all()
    # dumps: one parquet per step and rank, registered with a schema version
    inst.on_step_end(trainer)
    man = read_manifest(tmp_path)
    by_path = {f["path"]: f for f in man["files"]}
    assert {"relax/dictionary.safetensors", "relax/dictionary_fit.json"} <= set(by_path)
    shard = by_path["relax/trajectories_step000001.rank0.parquet"]
    assert shard["schema_version"] == 1 and shard["instrument"] == "relax"
    df = pd.read_parquet(tmp_path / "diagnostics" / shard["path"])
    assert len(df) == B and list(df["masked"]) == [False] * B
    spec = by_path["relax/spectra_step000001.rank0.safetensors"]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "diagnostics" / spec["path"])
    assert tensors["singular_values"].shape == (B, 50) and tensors["step"].tolist() == [1] * B
    torch.testing.assert_close(torch.tensor(df["dsd"].values), dsd.double(), rtol=1e-5, atol=0)
    assert list(df["length"]) == [10, 7, 3, 2, 10, 9, 5, 1]
    # resume: a fresh instrument in the same run dir reloads W and xi instead of refitting
    again = make(tmp_path)
    again.on_train_begin(trainer)
    torch.testing.assert_close(again.weight, inst.weight)
    assert again.xi == pytest.approx(inst.xi)


def test_adaptive_kl_applies_above_xi(tmp_path):
    trainer = fake_trainer()
    inst = make(tmp_path, xi=0.0, alpha=0.0, beta=0.5)
    inst.on_train_begin(trainer)
    ctx = make_ctx(trainer)
    term = inst.on_loss(ctx)

    assert inst.reference.model is None  # the trainer's ref_logps were used: no own reference pass
    a = ctx.extras["advantages"]
    lengths = ctx.completion_mask.sum(1)
    m = ((a > 0) & (lengths > 1)).float()  # DSD > 0 = xi for every trajectory with a transition
    assert term.metrics["relax/masked_frac"] == pytest.approx(float(m.mean()))
    kl = kl_k3(ctx.completion_logps.detach(), ctx.extras["ref_logps"]).clamp(-10, 10)
    expected = (kl * ctx.completion_mask * m[:, None]).sum() / ctx.completion_mask.sum()
    assert term.metrics["relax/kl"] == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(term.loss.detach(), 0.5 * expected)


def test_code_compat_and_eig_and_batch_group(tmp_path):
    trainer = fake_trainer()
    base = make(tmp_path / "a", xi=1e9)
    base.on_train_begin(trainer)
    m0 = base.on_loss(make_ctx(trainer)).metrics
    compat = make(tmp_path / "b", xi=1e9, code_compat=True, group="batch")
    compat.on_train_begin(trainer)
    m1 = compat.on_loss(make_ctx(trainer)).metrics
    torch.testing.assert_close(compat.weight, base.weight)  # same fit data, same seed
    assert not math.isclose(
        m0["relax/dsd_mean"], m1["relax/dsd_mean"], rel_tol=1e-3
    )  # padding couples DSD to L
    eig = make(tmp_path / "c", xi=1e9, spectrum="eig")
    eig.on_train_begin(trainer)
    ctx = make_ctx(trainer)
    loss, m2 = InstrumentSet([eig]).on_loss(ctx)
    loss.backward()
    assert math.isfinite(m2["relax/dsd_mean"]) and torch.isfinite(ctx.hidden.grad).all()


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="spectrum"):
        make(tmp_path, spectrum="qr")
    with pytest.raises(UserError, match="group"):
        make(tmp_path, group="token")


def test_subset_gradient_equals_full_computation(tmp_path):
    """Gradients are computed only where a > 0 and DSD <= xi; the result equals differentiating everything."""
    from rlx.regularizers.loss import exploration_loss

    trainer = fake_trainer()
    inst = make(tmp_path, beta=0.0, alpha=1.0)
    inst.on_train_begin(trainer)
    inst.on_loss(make_ctx(trainer))  # fit + calibrate
    inst.xi = 0.9 * float(inst.on_loss(make_ctx(trainer)).metrics["relax/dsd_pos_mean"])  # some over xi
    ctx = make_ctx(trainer)
    term = inst.on_loss(ctx)
    (g_inst,) = torch.autograd.grad(term.loss, ctx.hidden)
    ctx2 = make_ctx(trainer)
    k = koopman_operator(dictionary_features(ctx2.completion_hidden, inst.weight), ctx2.completion_mask, 1e-3)
    dsd, _ = dynamic_spectral_dispersion(k, "svd", 1e-3)
    a = ctx2.extras["advantages"].clamp_min(0)
    ref, _ = exploration_loss(dsd, a, ctx2.extras["group_ids"], inst.xi)
    (g_ref,) = torch.autograd.grad(ref, ctx2.hidden)
    assert 0 < term.metrics["relax/masked_frac"] < 0.5
    torch.testing.assert_close(term.loss.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_inst, g_ref, rtol=1e-4, atol=1e-7)


def test_state_dict_continues_exactly(tmp_path):
    """Resume contract: a fresh instrument loaded with another's state gives the identical next call
    (loss, metrics, gradient, the rows it then writes) and does not refit or recalibrate."""
    trainer = fake_trainer()
    a = make(tmp_path / "a", beta=0.5, refit_every=2)
    a.on_train_begin(trainer)
    for step in (0, 1, 2):  # fit at 0, refit at 2 (from the fitted W): two fits in the history
        trainer.state.global_step = step
        m = a.on_loss(make_ctx(trainer, seed=7 if step == 2 else step)).metrics
    assert [f["fit_step"] for f in a.fits] == [0, 2] and a.micro == 3 and len(a.rows) == 3 * B
    a.xi = 0.9 * m["relax/dsd_pos_mean"]  # some trajectories over xi: the KL branch runs too
    state = a.state_dict()
    b = make(tmp_path / "b", beta=0.5, refit_every=2)
    b.load_state_dict(torch.load(_roundtrip(state, tmp_path), weights_only=False))
    b.on_train_begin(trainer)  # must not replace the restored W by a file
    trainer.state.global_step = 3
    ca, cb = make_ctx(trainer, seed=7), make_ctx(trainer, seed=7)
    ta, tb = a.on_loss(ca), b.on_loss(cb)
    assert ta.metrics == tb.metrics and 0 < ta.metrics["relax/masked_frac"] < 0.5
    assert torch.equal(ta.loss.detach(), tb.loss.detach())
    (ga,), (gb,) = torch.autograd.grad(ta.loss, ca.hidden), torch.autograd.grad(tb.loss, cb.hidden)
    assert torch.equal(ga, gb)
    assert b.fits == a.fits and b.fit_step == a.fit_step == 2 and b.micro == a.micro == 4
    a.flush(), b.flush()
    ra = pd.read_parquet(tmp_path / "a/diagnostics/relax/trajectories_step000004.rank0.parquet")
    rb = pd.read_parquet(tmp_path / "b/diagnostics/relax/trajectories_step000004.rank0.parquet")
    pd.testing.assert_frame_equal(ra, rb)
    assert len(ra) == 4 * B and sorted(ra.step.unique()) == [1, 2, 3, 4]


def _roundtrip(state, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_fit_history_refit_cadence_and_flush(tmp_path):
    trainer = fake_trainer()
    inst = make(tmp_path, refit_every=3, flush_every=50, xi=1e9)
    inst.on_train_begin(trainer)
    for step in range(7):
        trainer.state.global_step = step
        inst.on_loss(make_ctx(trainer, seed=step))
        trainer.state.global_step = step + 1  # the Trainer's order: optimizer step, then on_step_end
        inst.on_step_end(trainer)
    assert [f["fit_step"] for f in inst.fits] == [0, 3, 6]
    shards = tmp_path / "diagnostics" / "relax"
    assert not list(shards.glob("trajectories_*"))  # buffered: flush_every=50
    inst.flush()
    df = pd.read_parquet(shards / "trajectories_step000007.rank0.parquet")
    assert len(df) == 7 * B and inst.rows == [] and inst.spectra == []
    import json

    fit = json.loads((shards / "dictionary_fit.json").read_text())
    man = {f["path"]: f for f in read_manifest(tmp_path)["files"]}
    assert man["relax/dictionary_fit.json"]["schema_version"] == 2
    assert [f["fit_step"] for f in fit["fits"]] == [0, 3, 6]
    first = fit["fits"][0]
    assert first["adam_steps"] == len(first["losses"]) == 16 and first["n_trajectories"] == B - 1
    assert first["loss_after"] < first["loss_before"] and first["weight_change"] > 0


def _gather_worker(rank, world, port, out):
    import torch.distributed as dist

    from rlx.instruments.relax import gather_states

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n, t = (3, 5) if rank == 0 else (2, 7)  # ranks hold different numbers of rows and widths
    h = torch.full((n, t, 4), float(rank + 1)) + torch.arange(t)[None, :, None]
    m = torch.ones(n, t)
    got = gather_states(h, m)
    if rank == 0:
        torch.save(got, out)
    else:
        assert got is None
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_states_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    out = tmp_path / "g.pt"
    mp.spawn(_gather_worker, args=(2, port, str(out)), nprocs=2)
    h, m = torch.load(out)
    assert h.shape == (5, 7, 4) and m.shape == (5, 7)
    assert m[:3, 5:].sum() == 0 and m[:3, :5].all() and m[3:].all()  # rank 0's rows padded 5 -> 7
    assert torch.equal(h[0, :5, 0], 1 + torch.arange(5.0)) and torch.equal(h[3, :, 0], 2 + torch.arange(7.0))
    assert h[:3, 5:].abs().sum() == 0


# ---- LazyReference without loading a model (fast; the slow test above loads a real one) -------------------


class _TinyLM(torch.nn.Module):
    """A causal "LM" whose logits are an embedding lookup, plus an adapter offset while the adapter is enabled."""

    def __init__(self, vocab=7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.delta = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.adapter_on = True

    def forward(self, input_ids, attention_mask=None):
        logits = self.table[input_ids] + (self.delta[input_ids] if self.adapter_on else 0.0)
        return SimpleNamespace(logits=logits)


class _PeftLike(_TinyLM):
    """PEFT's interface as LazyReference uses it: disable_adapter() (a context) and get_base_model()."""

    def disable_adapter(self):
        import contextlib

        @contextlib.contextmanager
        def off():
            self.adapter_on = False
            try:
                yield
            finally:
                self.adapter_on = True

        return off()

    def get_base_model(self):
        return self


class _Wrapper(torch.nn.Module):
    """DDP-style wrapper: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _ref_inputs(vocab=7):
    g = torch.Generator().manual_seed(2)
    return {
        "prompt_ids": torch.randint(0, vocab, (3, 4), generator=g),
        "prompt_mask": torch.ones(3, 4, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (3, 5), generator=g),
        "completion_mask": torch.ones(3, 5, dtype=torch.long),
    }


def _expected_ref_logps(table, inputs, rows, temperature):
    """float64: log softmax(table[x_{t-1}] / T) at the completion tokens, positions p-1 .. S-2."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)[rows].long()
    p = inputs["prompt_ids"].shape[1]
    logits = table.detach().double()[ids][:, p - 1 : -1] / temperature
    comp = inputs["completion_ids"][rows]
    return torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)


def test_lazy_reference_peft_scores_with_the_adapter_disabled():
    """A PEFT policy (inside two DDP-like wrappers) is its own reference with the adapter off; nothing is loaded."""
    from rlx.instruments.reference import LazyReference

    policy = _PeftLike()
    trainer = SimpleNamespace(model=_Wrapper(_Wrapper(policy)), temperature=0.7)
    inputs, rows = _ref_inputs(), torch.tensor([0, 2])
    ref = LazyReference()
    got = ref.logps(trainer, inputs, rows)
    torch.testing.assert_close(
        got.double(), _expected_ref_logps(policy.table, inputs, rows, 0.7), rtol=1e-5, atol=1e-6
    )
    assert ref.model is None and policy.adapter_on  # no copy loaded; the adapter is back on afterwards
    assert ref._peft(SimpleNamespace(model=policy)) is policy


def test_lazy_reference_needs_both_peft_methods():
    """Only a model with disable_adapter *and* get_base_model is treated as PEFT; wrappers are looked through,
    but only when `.module` is itself a module."""
    from rlx.instruments.reference import LazyReference

    ref = LazyReference()
    half = _TinyLM()
    half.disable_adapter = lambda: None  # one of the two methods only
    assert ref._peft(SimpleNamespace(model=half)) is None
    assert ref._peft(SimpleNamespace(model=_TinyLM())) is None
    other = _PeftLike()
    other.module = "not a module"
    assert ref._peft(SimpleNamespace(model=other)) is other
    assert ref._peft(SimpleNamespace(model=_Wrapper(_PeftLike()))) is not None


def _fake_policy(module_name="transformers.models.qwen2", dtype=torch.bfloat16, device="cpu"):
    cls = type("FakePolicy", (_TinyLM,), {"__module__": module_name})
    policy = cls()
    policy.config = SimpleNamespace(_name_or_path="/runs/x/start", _attn_implementation="eager")
    policy.dtype = dtype
    policy.device = torch.device(device)
    return policy


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Replace AutoModelForCausalLM.from_pretrained: record its arguments, return a fresh _TinyLM (seed 5)."""
    import transformers

    calls = []

    def fake(path, **kw):
        calls.append((path, kw))
        return _TinyLM(seed=5)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    return calls


def test_lazy_reference_loads_the_start_model_once_frozen_like_the_policy(from_pretrained_calls):
    from rlx.instruments.reference import LazyReference

    ref = LazyReference()
    model = ref._load(_fake_policy())
    assert from_pretrained_calls == [
        (
            "/runs/x/start",
            {"dtype": torch.bfloat16, "attn_implementation": "eager", "trust_remote_code": False},
        )
    ]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert ref._load(_fake_policy()) is model and len(from_pretrained_calls) == 1  # loaded on first use only
    # custom code only when the policy itself runs it (model.trust_remote_code)
    LazyReference()._load(_fake_policy("transformers_modules.acme.modeling"))
    assert from_pretrained_calls[-1][1]["trust_remote_code"] is True
    # placed on the policy's device (meta: a device without data)
    meta = LazyReference()._load(_fake_policy(device="meta"))
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_lazy_reference_without_peft_scores_the_loaded_start_model(from_pretrained_calls):
    from rlx.instruments.reference import LazyReference

    policy = _fake_policy(dtype=torch.float32)
    trainer = SimpleNamespace(model=_Wrapper(policy))  # no temperature attribute: 1.0
    inputs, rows = _ref_inputs(), torch.tensor([1])
    ref = LazyReference()
    got = ref.logps(trainer, inputs, rows)
    loaded = _TinyLM(seed=5)  # what the fake from_pretrained returns: adapter term included, as loaded
    expected = _expected_ref_logps(loaded.table + loaded.delta, inputs, rows, 1.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert len(from_pretrained_calls) == 1 and ref.model is not None
