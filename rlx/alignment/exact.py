"""The paper's D' in its exact two-pass form: save during training, recompute after it.

In arXiv 2512.00778, D' is the final trained model's greedy responses to held-out prompts, so G at step t needs
a model that only exists once training is over. Two passes over ONE run give it exactly
(docs/gradient_alignment.md, "The exact two-pass form"):

Pass 1, training with `diagnostics.grad_alignment.exact.enabled=true` (`ExactSaver`, called by the instrument at
three hook points). At every `save_every`-th logged step it writes RUN_DIR/grad_alignment_exact/step_NNNNNN/:

    weights_before-00000.safetensors ...  the trainable parameters (instrument scope: the whole policy without
                                          PEFT, the LoRA adapters with it) before the step's update, in their dtype,
                                          in shards of at most 1 GiB (the host copy never exceeds one shard)
    weights_after-00000.safetensors ...   the same after the update (`save_update`): the `update` row, delta_R
    batch.pt                              per micro-batch the instrument measured: the policy's loss-forward calls
                                          (args, kwargs: token ids, masks, labels; the RNG state and autocast
                                          setting each ran under), w_t = dL/dl_t as the instrument used it (the
                                          trainer's post-scale included), the trainer's batch (`inputs`: prompt and
                                          completion ids and masks, advantages, old / reference log-probs for
                                          GRPO and PPO; input ids and masks for DPO and SFT) and the loss extras
    meta.json                             step, logged index, micro-batches, bytes written

and, once per run, grad_alignment_exact/info.json (algo, the trainer attributes the instrument reads, the fused
LM head's temperature, PEFT, base model) and target_online.safetensors (the D' the run measured against online).
A step directory appears (renamed from `.tmp`) only when complete, after the step's update.

Pass 2, `python -m analysis alignment-exact RUN_DIR [target=final|online]` (`replay`): generates D' from the run's
final model as `rlx final-responses` does (or takes the saved online D'), then for each saved step loads the
weights, re-runs the saved loss forwards under the saved RNG state and drives the SAME `GradAlignment` instrument
through the trainer's event order with the surrogate loss sum_t w_t l_t. Its dL/dl_t is w_t exactly and its
gradient is sum_t w_t grad l_t, the optimizer's gradient for every loss carried by l_t, so every row the
instrument writes (total, pos, neg, kl, tertiles, other, layer groups, update, drift) is recomputed by the
instrument's own code, no second implementation. What it cannot see: gradient terms not carried by l_t
(regularizers, an entropy bonus: the online `other` row), which the surrogate does not contain.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlx.errors import UserError
from rlx.trainers.registry import TrainerSpec

EXACT_DIR = "grad_alignment_exact"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
"""Largest safetensors shard of saved parameters: bounds the host memory one save needs."""
INFO = "info.json"
TARGET_FILE = "target_online.safetensors"
FINAL_EXACT = "final_exact"
"""The label of D' = this run's own final responses (the exact two-pass form)."""
TABLES = {"final": "grad_alignment_final_exact", "online": "grad_alignment_replay_online"}
"""Stems of the offline pass's table and summary under diagnostics/, per `target=`."""


def exact_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXACT_DIR


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete saved steps of a run, in step order (an unfinished `.tmp` directory is not one)."""
    root = exact_dir(run_dir)
    out = []
    for d in sorted(root.glob("step_*")) if root.is_dir() else []:
        name = d.name.removeprefix("step_")
        if d.is_dir() and name.isdigit() and (d / "meta.json").is_file():
            out.append((int(name), d))
    return out


# ---- saving (pass 1) -----------------------------------------------------------------------------------------


def _to_cpu(x: Any) -> Any:
    """Tensors detached and copied to the CPU, containers recursed; values torch.load(weights_only) cannot read
    become {"__unsupported__": type name}."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_to_cpu(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _to_cpu(v) for k, v in x.items()}
    return {"__unsupported__": type(x).__name__}


def save_params(named: list[tuple[str, torch.Tensor]], folder: Path, stem: str) -> int:
    """Write `named` tensors to `folder/stem-NNNNN.safetensors` shards of <= SHARD_BYTES; returns the bytes."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size = total = index = 0

    def flush():
        nonlocal shard, size, index
        if shard:
            save_file(shard, str(folder / f"{stem}-{index:05d}.safetensors"), metadata={"format": "rlx"})
            shard, size, index = {}, 0, index + 1

    for name, p in named:
        t = p.detach().to("cpu", copy=True).contiguous()
        b = t.numel() * t.element_size()
        if shard and size + b > SHARD_BYTES:
            flush()
        shard[name] = t
        size += b
        total += b
    flush()
    return total


def load_params(folder: Path, stem: str) -> dict[str, torch.Tensor] | None:
    """The tensors `save_params` wrote under `stem`, or None when there are none."""
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{stem}-*.safetensors"))
    if not files:
        return None
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def fused_head_settings(policy: torch.nn.Module, trainer: Any, spec: TrainerSpec) -> dict[str, Any]:
    """Temperature and fp32 cast of TRL's fused LM head on `policy`, read from the installed head when possible
    (else what the trainer's spec says its loss uses)."""
    temp, cast = spec.temperature(trainer), spec.lm_head_fp32(trainer)
    fn = getattr(getattr(policy, "forward", None), "__func__", None)
    try:
        nonlocal_vars = inspect.getclosurevars(fn).nonlocals if fn is not None else {}
    except (TypeError, ValueError):
        nonlocal_vars = {}
    if "temperature" in nonlocal_vars and "cast_lm_head_to_fp32" in nonlocal_vars:
        temp, cast = float(nonlocal_vars["temperature"]), bool(nonlocal_vars["cast_lm_head_to_fp32"])
    return {"temperature": temp, "cast_lm_head_to_fp32": cast}


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (bool, int, float, str)) or v is None}


class ExactSaver:
    """Pass 1: records and writes what the offline recomputation of the logged steps needs (see module doc)."""

    def __init__(self, cfg: Any, run: Any) -> None:
        ex = cfg.exact
        if int(ex.save_every) < 1:
            raise UserError(
                f"diagnostics.grad_alignment.exact.save_every={ex.save_every}: expected an integer >= 1 "
                "(save every K-th logged step)."
            )
        if int(getattr(run, "world_size", 1) or 1) > 1:
            raise UserError(
                "diagnostics.grad_alignment.exact is single-process: the offline pass replays one process's "
                "micro-batches. Launch on one process, or set diagnostics.grad_alignment.exact.enabled=false."
            )
        if cfg.variant == "activation":
            raise UserError(
                "diagnostics.grad_alignment.exact needs variant=param (the activation variant measures the LM "
                "head only); set diagnostics.grad_alignment.variant=param or exact.enabled=false."
            )
        self.cfg, self.run = ex, run
        self.root = exact_dir(run.run_dir)
        self.every = int(ex.save_every)
        self.handle = None
        self.forwards: list[tuple[int, dict]] = []
        self.step: int | None = None
        self.micro: list[dict] = []
        self.tmp: Path | None = None
        self.bytes: dict[str, int] = {}
        self.broken = ""

    def wants(self, inst: Any, step: int) -> bool:
        """Whether `step` is saved: a logged step whose index among logged steps (from 0) is a multiple of K."""
        return inst._logged(step) and len(inst.series) % self.every == 0

    def attach(self, inst: Any, trainer: Any) -> None:
        """Record the policy's loss-forward calls (as the seam's capture selects them) on saved steps."""
        if inst.variant != "param":
            raise UserError(
                "diagnostics.grad_alignment.exact needs the parameter variant; this launch uses the activation "
                "variant (DeepSpeed ZeRO-2/3). Launch without ZeRO or set exact.enabled=false."
            )
        if self.handle is not None:
            return

        def record(module, args, kwargs):
            if not (kwargs.get("fused_lm_head") or kwargs.get("rlx_capture")):
                return
            if not module.training or not torch.is_grad_enabled():
                return
            step = int(trainer.state.global_step) + 1
            if not self.wants(inst, step):
                return
            dev = next(
                (v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), torch.device("cpu")
            )
            cuda = None
            if dev.type == "cuda":
                cuda = torch.cuda.get_rng_state(dev)
            self.forwards.append(
                (
                    step,
                    {
                        "args": _to_cpu(list(args)),
                        "kwargs": _to_cpu(dict(kwargs)),
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": cuda,
                        "autocast": [
                            dev.type,
                            bool(torch.is_autocast_enabled(dev.type)),
                            str(torch.get_autocast_dtype(dev.type)).removeprefix("torch."),
                        ],
                    },
                )
            )

        self.handle = inst._policy(trainer).register_forward_pre_hook(record, with_kwargs=True)
        self._trainer = trainer

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.tmp is not None and self.tmp.exists():  # a step that never reached its update
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    def on_micro(self, inst: Any, ctx: Any, w: torch.Tensor) -> None:
        """One measured micro-batch: its forward calls, w_t, the batch; the weights at a step's first one."""
        step = inst.cur.step
        forwards = [f for s, f in self.forwards if s == step]
        self.forwards = []
        if self.step != step:
            if not self.wants(inst, step):
                return
            self._begin(inst, step)
        if not forwards:  # the seam's loss forward was not seen: this step cannot be replayed
            self.broken = "a micro-batch's loss forward was not recorded"
        self.micro.append(
            {
                "forwards": forwards,
                "w": w.detach().float().cpu(),
                "inputs": _to_cpu(dict(ctx.inputs)),
                "extras": _to_cpu(dict(ctx.extras)),
            }
        )

    def _begin(self, inst: Any, step: int) -> None:
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.step, self.micro, self.bytes, self.broken = step, [], {}, ""
        self.tmp = self.root / f".step_{step:06d}.tmp"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.bytes["weights_before"] = save_params(
            list(zip(inst.names, inst.params)), self.tmp, "weights_before"
        )
        if not (self.root / INFO).exists() or not (self.root / TARGET_FILE).exists():
            self._write_run_info(inst)

    def _write_run_info(self, inst: Any) -> None:
        from safetensors.torch import save_file

        trainer = self._trainer
        policy = inst._policy(trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        peft = hasattr(model, "peft_config")
        base = getattr(policy.config, "_name_or_path", None) or None
        if peft:
            pc = next(iter(model.peft_config.values()))
            base = getattr(pc, "base_model_name_or_path", None) or base
        args = trainer.args.to_dict() if hasattr(trainer.args, "to_dict") else vars(trainer.args)
        info = {
            "format_version": FORMAT_VERSION,
            "algo": inst.algo,
            "peft": peft,
            "base_model": base,
            "every": int(inst.cfg.every),
            "save_every": self.every,
            "save_update": bool(self.cfg.save_update),
            "online_target": inst.target.name,
            "fused_head": fused_head_settings(policy, trainer, inst.spec),
            "trainer": _scalars(
                {
                    k: getattr(trainer, k, None)
                    for k in ("beta", "temperature", "epsilon_low", "epsilon_high", "rlx_algo")
                }
            ),
            "args": _scalars(dict(args)),
            "torch": torch.__version__,
        }
        t = inst.target
        save_file(
            {"input_ids": t.input_ids, "attention_mask": t.attention_mask, "loss_mask": t.loss_mask},
            str(self.root / TARGET_FILE),
            metadata={"name": t.name},
        )
        tmp = self.root / f".{INFO}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.root / INFO)

    def on_step_end(self, inst: Any, cur: Any) -> None:
        """After the step's update: the weights after it, the batch, meta.json; then the directory is complete."""
        if self.step != cur.step or self.tmp is None:
            return
        if self.broken:
            print(f"warning: grad_alignment.exact: step {cur.step} not saved ({self.broken})", flush=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp, self.step, self.micro = None, None, []
            return
        params = list(zip(inst.names, inst.params))
        if self.cfg.save_update:
            self.bytes["weights_after"] = save_params(params, self.tmp, "weights_after")
        torch.save({"format_version": FORMAT_VERSION, "micro": self.micro}, self.tmp / "batch.pt")
        self.bytes["batch"] = (self.tmp / "batch.pt").stat().st_size
        meta = {
            "step": cur.step,
            "logged_index": len(inst.series),  # this step is not in the series yet
            "micro_batches": len(self.micro),
            "bytes": self.bytes,
            "total_bytes": sum(self.bytes.values()),
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        final = self.root / f"step_{cur.step:06d}"
        if final.exists():  # a resumed run repeats the steps after its checkpoint
            shutil.rmtree(final)
        os.replace(self.tmp, final)
        self.tmp, self.step, self.micro = None, None, []


# ---- recomputation (pass 2) ----------------------------------------------------------------------------------

USAGE = (
    "usage: python -m analysis alignment-exact RUN_DIR [target=final|online] [n=256] [batch_size=64] "
    "[max_new_tokens=N]"
)


def parse_args(argv: list[str]) -> dict[str, Any]:
    """RUN_DIR [target=final|online] [n=N] [batch_size=B] [max_new_tokens=M] -> keyword arguments of `replay`."""
    from rlx.alignment.final_responses import parse_run_args

    target = {"final": "this run's final responses", "online": "the target the run used online"}
    return parse_run_args(argv, USAGE, {"target": target})


class _Accelerator:
    num_processes = 1

    def __init__(self, device: torch.device):
        self.device = device

    def unwrap_model(self, model):
        return model


def _replay_instrument(run_cfg: Any, run_dir: Path):
    """The online instrument class, collecting rows instead of writing them; every replayed step is logged."""
    from omegaconf import OmegaConf

    from rlx.instruments.grad_alignment import GradAlignment
    from rlx.run import RunContext

    class Replayed(GradAlignment):
        def _logged(self, step: int) -> bool:
            return True

        def _emit(self, trainer, cur, rows, sk) -> None:
            total = next(r for r in rows if r["component"] == "total")
            self.series.append(total["G"])
            self.replayed_rows.extend(rows)

    cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))
    ga = cfg.diagnostics.grad_alignment
    # D' is set by the caller; no sketches, token shards or saving in the offline pass
    ga.target, ga.sketch_dim, ga.save_token_weights, ga.variant = "auto", 0, False, "param"
    if "exact" in ga:
        ga.exact.enabled = False
    inst = Replayed(ga, RunContext(cfg=cfg, run_dir=run_dir))
    inst.replayed_rows = []
    return inst


def _load_policy(run_dir: Path, cfg: Any, info: dict, device: torch.device) -> torch.nn.Module:
    """The run's policy with the module names of training: final/ without PEFT; base + fresh adapters with it."""
    from trl.trainer.utils import add_fused_lm_head

    from rlx.instruments.base import unwrap_policy
    from rlx.models import load_causal_lm, resolve_model_dir

    if info.get("peft"):
        from peft import get_peft_model

        from rlx.trainers.construction import peft_config

        base = info.get("base_model")
        if not base or not Path(base).exists():
            base = resolve_model_dir(cfg)
        model = get_peft_model(load_causal_lm(str(base), cfg), peft_config(cfg))
    else:
        model = load_causal_lm(str(run_dir / "final"), cfg)
    model.to(device)
    fh = info.get("fused_head", {})
    add_fused_lm_head(
        unwrap_policy(model),
        temperature=float(fh.get("temperature", 1.0)),
        cast_lm_head_to_fp32=bool(fh.get("cast_lm_head_to_fp32", False)),
    )
    model.train()
    return model


def _set_params(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    named = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(named))
    if missing:
        raise UserError(
            f"{where}: saved parameter {missing[0]} is not in the rebuilt model ({len(missing)} missing); the run's "
            "model config or PEFT settings differ from what was saved."
        )
    with torch.no_grad():
        for n, t in tensors.items():
            named[n].copy_(t.to(named[n].device, named[n].dtype))


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _unsupported(x: Any, path: str = "") -> str | None:
    if isinstance(x, dict):
        if "__unsupported__" in x:
            return f"{path} ({x['__unsupported__']})"
        for k, v in x.items():
            found = _unsupported(v, f"{path}.{k}" if path else k)
            if found:
                return found
    if isinstance(x, list):
        for i, v in enumerate(x):
            found = _unsupported(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _forward(policy: torch.nn.Module, rec: dict, device: torch.device) -> None:
    """One saved loss-forward call, under its saved RNG state and autocast setting (outputs go to the hooks)."""
    torch.set_rng_state(rec["rng_cpu"])
    if rec.get("rng_cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rec["rng_cuda"], device)
    _, enabled, dtype = rec["autocast"]
    args, kwargs = _to_device(rec["args"], device), _to_device(rec["kwargs"], device)
    with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=enabled):
        policy(*args, **kwargs)


def load_target(
    run_dir: Path, target: str, tokenizer: Any, n: int, batch_size: int, max_new_tokens, progress
):
    """D' of the offline pass: this run's final responses (`final_exact`) or the online D' (`replay:<label>`)."""
    from rlx.alignment.final_responses import responses_path, write_final_responses
    from rlx.alignment.target import TargetBatch, batch_from_jsonl

    if target == "online":
        from safetensors import safe_open
        from safetensors.torch import load_file

        f = exact_dir(run_dir) / TARGET_FILE
        if not f.is_file():
            raise UserError(f"{f} not found: the run saved no online D' (exact data incomplete).")
        with safe_open(str(f), "pt") as fh:
            name = (fh.metadata() or {}).get("name", "online")
        t = load_file(str(f))
        return TargetBatch(t["input_ids"], t["attention_mask"], t["loss_mask"], f"replay:{name}")
    path = responses_path(run_dir)
    rows = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if len(rows) >= n and max_new_tokens is None:
        print(f"D': the first {n} rows of {path} (this run's final responses; delete it to regenerate)")
    else:
        path = write_final_responses(run_dir, n, batch_size, max_new_tokens, progress)
    return batch_from_jsonl(tokenizer, str(path), n, FINAL_EXACT, f"alignment-exact {run_dir}")


def replay(
    run_dir: str | Path,
    target: str = "final",
    n: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> Path:
    """Recompute the instrument's rows at every saved step of `run_dir` against D' (module doc); returns the table."""
    from tqdm.auto import tqdm

    from rlx import dumps
    from rlx.alignment import functional as am
    from rlx.alignment.final_responses import DEFAULT_N, check_run_dir
    from rlx.config.loader import load_config
    from rlx.diagnostics import DiagnosticsWriter
    from rlx.instruments.base import LossContext, capture_loss_forward, unwrap_policy
    from rlx.models import load_tokenizer_for

    run_dir = check_run_dir(run_dir)
    n = DEFAULT_N if n is None else int(n)
    if n < 1:
        raise UserError(f"n={n}: expected the number of held-out prompts to answer, an integer >= 1.")
    steps = step_dirs(run_dir)
    info_path = exact_dir(run_dir) / INFO
    if not steps or not info_path.is_file():
        raise UserError(
            f"{run_dir} has no saved exact data ({EXACT_DIR}/step_*/ and {INFO}): train it with "
            "diagnostics.grad_alignment.exact.enabled=true (and grad_alignment.enabled=true)."
        )
    info = json.loads(info_path.read_text())
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{info_path}: format_version {info['format_version']} is newer than this rlx reads.")
    cfg = load_config([f"recipe={run_dir / 'config.yaml'}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer_for(str(run_dir / "final"))
    batch = load_target(run_dir, target, tokenizer, n, batch_size, max_new_tokens, progress)

    model = _load_policy(run_dir, cfg, info, device)
    policy = unwrap_policy(model)
    saved_names = set(load_params(steps[0][1], "weights_before") or {})
    for name, p in model.named_parameters():  # the instrument's scope is exactly what was saved
        p.requires_grad_(name in saved_names)
    trainer = SimpleNamespace(
        model=model,
        accelerator=_Accelerator(device),
        state=SimpleNamespace(global_step=0),
        args=SimpleNamespace(**info.get("args", {})),
        processing_class=tokenizer,
        rlx_algo=info["algo"],
        _metrics={"train": defaultdict(list)},
        is_deepspeed_enabled=False,
        _clip_grad_norm=lambda m: None,
        **{k: v for k, v in info.get("trainer", {}).items() if k != "rlx_algo"},
    )
    inst = _replay_instrument(cfg, run_dir)
    inst.target = batch
    inst.on_train_begin(trainer)
    if set(inst.names) != saved_names:
        raise UserError(
            f"{steps[0][1]}: the saved parameters ({len(saved_names)}) are not the instrument's scope in the "
            f"rebuilt model ({len(inst.names)}); the run's config changed after training."
        )
    for step, folder in tqdm(steps, desc="alignment-exact", disable=not progress):
        before = load_params(folder, "weights_before")
        saved = torch.load(folder / "batch.pt", map_location="cpu", weights_only=True)
        _set_params(model, before, folder)
        for p in model.parameters():
            p.grad = None
        trainer.state.global_step = step - 1
        step_begin = getattr(inst, "on_step_begin", None)
        if step_begin is not None:  # instruments that hook the model only on the steps they log
            step_begin(trainer)
        for m, micro in enumerate(saved["micro"]):
            bad = _unsupported(micro["forwards"])
            if bad:
                raise UserError(
                    f"{folder}/batch.pt: micro-batch {m}'s loss forward had an argument that was not saved: {bad}."
                )
            with capture_loss_forward(model, hidden=inst.needs_hidden) as cap:
                for rec in micro["forwards"]:
                    _forward(policy, rec, device)
            w = micro["w"].to(device)
            if cap.token_logps is None or cap.token_logps.shape != w.shape:
                raise UserError(
                    f"{folder}/batch.pt: micro-batch {m} replays to log-probs of shape "
                    f"{None if cap.token_logps is None else tuple(cap.token_logps.shape)}, saved w_t has "
                    f"{tuple(w.shape)}; the saved forward does not match this model."
                )
            loss = (w * cap.token_logps).sum()  # dL/dl_t = w_t exactly; gradient sum_t w_t grad l_t
            ctx = LossContext(
                trainer=trainer,
                algo=info["algo"],
                inputs=_to_device(micro["inputs"], device),
                loss=loss,
                token_logps=cap.token_logps,
                mask=cap.label_mask,
                hidden=cap.hidden,
                entropy=cap.entropy,
                extras=_to_device(micro["extras"], device),
            )
            inst.on_loss(ctx)
            loss.backward()
        trainer._clip_grad_norm(model)  # the instrument's wrapper reads the full gradient here
        inst.on_pre_optimizer_step(trainer)
        after = load_params(folder, "weights_after")
        if after is not None:
            _set_params(model, after, folder)
        elif inst.cur is not None:
            inst.cur.theta = None  # no update row without the weights after the step
        trainer.state.global_step = step
        inst.on_step_end(trainer)
    rows = inst.replayed_rows
    summary = am.run_summary(inst.series)
    summary.update(
        {
            "target": batch.name,
            "target_option": f"alignment-exact target={target}",
            "variant": "param",
            "algo": info["algo"],
            "steps": [s for s, _ in steps],
            "save_every": info.get("save_every"),
            "n_target": int(batch.input_ids.shape[0]),
        }
    )
    table = TABLES[target].removeprefix("grad_alignment_")
    writer = DiagnosticsWriter(run_dir)
    path = writer.write(
        dumps.ALIGNMENT_EXACT,
        rows,
        table=table,
        description=f"gradient alignment recomputed offline at the saved steps against D' = {batch.name} "
        "(python -m analysis alignment-exact; docs/gradient_alignment.md)",
    )
    writer.write(
        dumps.ALIGNMENT_EXACT_SUMMARY,
        summary,
        table=table,
        description=f"run summary of the offline alignment against D' = {batch.name}",
    )
    print(
        f"{len(steps)} saved steps recomputed against D' = {batch.name} ({summary['n_logged']} G_total values): "
        f"frac G>0 {summary['frac_positive']:.2f}, sign flips {summary['sign_flip_rate']:.2f}, "
        f"CV {summary['cv']:.2f}, {summary['regime']}"
    )
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(USAGE)
        return None
    return replay(**parse_args(argv))
