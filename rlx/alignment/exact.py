"""The paper's D' in its exact two-pass form: save during training, recompute after it.

In arXiv 2512.00778, D' is the final trained model's greedy responses to held-out prompts, so G at step t needs
a model that only exists once training is over. Two passes over ONE run give it exactly
(docs/gradient_alignment.md, "The exact two-pass form"):

Pass 1, training with `diagnostics.grad_alignment.exact.enabled=true` (`ExactSaver` in
rlx/instruments/grad_alignment/exact_saver.py, called by the instrument at three of its events; that module also
holds the file layout's names and readers this one uses). At every `save_every`-th logged step it writes RUN_DIR/grad_alignment_exact/step_NNNNNN/:

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

import json
import sys
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlx.errors import UserError
from rlx.instruments.grad_alignment import GradAlignment
from rlx.instruments.grad_alignment.exact_saver import (
    EXACT_DIR,
    FORMAT_VERSION,
    INFO,
    TARGET_FILE,
    exact_dir,
    load_params,
    step_dirs,
)

FINAL_EXACT = "final_exact"
"""The label of D' = this run's own final responses (the exact two-pass form)."""
TABLES = {"final": "grad_alignment_final_exact", "online": "grad_alignment_replay_online"}
"""Stems of the offline pass's table and summary under diagnostics/, per `target=`."""


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

    from rlx.run import RunContext

    class Replayed(GradAlignment):
        def __init__(self, cfg: Any, run: Any) -> None:
            super().__init__(cfg, run)
            self.replayed_rows: list[dict] = []

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
    return Replayed(ga, RunContext(cfg=cfg, run_dir=run_dir))


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
    from rlx.instruments.base import LossContext, capture_loss_forward, unwrap_policy
    from rlx.models import load_tokenizer_for
    from rlx.storage import DiagnosticsWriter

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
    with closing(inst):  # the instrument's hooks are removed however the loop ends
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
            inst.on_before_clip(trainer)  # the seam's event: the full gradient, before the trainer would clip
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
