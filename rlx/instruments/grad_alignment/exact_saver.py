"""What the exact two-pass form of D' saves during training (pass 1), and how its files are read back.

`ExactSaver` is driven by the grad_alignment instrument (`diagnostics.grad_alignment.exact.enabled=true`); the
layout of RUN_DIR/grad_alignment_exact/ and the offline recomputation (pass 2, `python -m analysis alignment-exact`)
are described in rlx/alignment/exact.py and docs/gradient_alignment.md ("The exact two-pass form").
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rlx.errors import UserError
from rlx.instruments.base import unwrap_policy
from rlx.trainers.registry import TrainerSpec

EXACT_DIR = "grad_alignment_exact"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
"""Largest safetensors shard of saved parameters: bounds the host memory one save needs."""
INFO = "info.json"
TARGET_FILE = "target_online.safetensors"


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


def _policy(trainer: Any) -> torch.nn.Module:
    return unwrap_policy(trainer.accelerator.unwrap_model(trainer.model))


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
        self._trainer: Any = None
        """The trainer whose policy `attach` hooked (for the run's info.json)."""

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

        self.handle = _policy(trainer).register_forward_pre_hook(record, with_kwargs=True)
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
        policy = _policy(trainer)
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
