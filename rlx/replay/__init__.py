"""Activation Replay (Xing et al., "Boosting Reasoning in Large Multimodal Models via Activation Replay",
arXiv 2511.19972) at evaluation time.

One entry for evaluation code, driven by `cfg.replay` (`ReplayConfig`):

    with activation_replay(rl_model, base_model, input_ids, attention_mask, cfg.replay, tokenizer=tok) as log:
        out = rl_model.generate(input_ids=input_ids, attention_mask=attention_mask, **decoding)

`mode=off` is a no-op context; `learnable` optimises per-prompt offsets (the paper's method); `direct`
replaces early-layer inputs with the base model's (the released agent/video scripts). Decoding settings are
the caller's, so accuracy and pass@k compare with and without replay under identical decoding. A context
covers one `generate` call; to reuse one preparation for several calls use `prepare_replay` + `inject`.
See docs/activation_replay.md.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlx.errors import UserError
from rlx.replay.direct import DirectReplay, direct_replay
from rlx.replay.hooks import HookSet, count_hooks, decoder_parts
from rlx.replay.inject import InjectionLog, inject
from rlx.replay.learnable import LearnableReplay, learnable_replay
from rlx.replay.streams import eligible_positions

MODES = ("off", "learnable", "direct")

__all__ = [
    "MODES",
    "DirectReplay",
    "HookSet",
    "InjectionLog",
    "LearnableReplay",
    "activation_replay",
    "count_hooks",
    "decoder_parts",
    "inject",
    "load_base_model",
    "make_generate_fn",
    "prepare_replay",
    "replay_generate",
    "replay_generate_fn",
]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default) if not isinstance(cfg, dict) else cfg.get(key, default)


def normalise_mode(mode: Any) -> str:
    """`replay=off` arrives as False (YAML 1.1 booleans); map it back to "off"."""
    return "off" if mode is False or str(mode).lower() in ("false", "none", "") else str(mode)


def prepare_replay(
    rl_model: nn.Module,
    base_model: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: Any,
    tokenizer: Any = None,
    **model_inputs: Any,
) -> LearnableReplay | DirectReplay | None:
    """Prepare replay for one batch (left padding allowed); None when `cfg.mode == "off"`.

    `model_inputs` (e.g. `pixel_values`, `image_grid_thw`) are passed to every forward, as to `generate`.
    """
    mode = normalise_mode(_get(cfg, "mode", "off"))
    if mode not in MODES:
        raise UserError(f"replay.mode={mode!r}: expected one of {', '.join(MODES)}.")
    if mode == "off":
        return None
    if base_model is None:
        raise UserError(
            f"replay.mode={mode} needs the base model: set replay.base_model=PATH (base_model=PATH)."
        )
    special = tuple(getattr(tokenizer, "all_special_ids", ()) or ())
    with torch.inference_mode(False):
        input_ids, attention_mask = input_ids.clone(), attention_mask.clone()
        model_inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in model_inputs.items()}
        eligible = eligible_positions(
            rl_model,
            input_ids,
            attention_mask,
            _get(cfg, "positions", "auto"),
            mode,
            special,
            _get(cfg, "exclude_special", True),
        )
        common = dict(
            rho=_get(cfg, "rho", 0.4),
            align=_get(cfg, "align", "code"),
            fp32=_get(cfg, "fp32", False),
            chunk=_get(cfg, "lens_chunk_size", 16384),
            model_inputs=model_inputs,
        )
        if mode == "learnable":
            return learnable_replay(
                rl_model,
                base_model,
                input_ids,
                attention_mask,
                eligible,
                num_layers=_get(cfg, "num_layers", 16),
                top_k=_get(cfg, "top_k", 50),
                lr=_get(cfg, "lr", 10.0),
                steps=_get(cfg, "steps", 25),
                log_final_loss=_get(cfg, "log_final_loss", False),
                **common,
            )
        thresholds = _get(cfg, "direct_thresholds", None)
        return direct_replay(
            rl_model,
            base_model,
            input_ids,
            attention_mask,
            eligible,
            num_layers=_get(cfg, "direct_num_layers", 7),
            thresholds=list(thresholds) if thresholds is not None else None,
            require_lower=_get(cfg, "direct_require_lower", True),
            **common,
        )


@contextlib.contextmanager
def activation_replay(
    rl_model: nn.Module,
    base_model: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: Any,
    tokenizer: Any = None,
    **model_inputs: Any,
) -> Iterator[InjectionLog]:
    """Prepare replay for this batch and arm it for the next `generate` on `rl_model` inside the block."""
    state = prepare_replay(rl_model, base_model, input_ids, attention_mask, cfg, tokenizer, **model_inputs)
    with inject(rl_model, state) as log:
        yield log


def replay_generate(
    rl_model: nn.Module,
    base_model: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: Any,
    tokenizer: Any = None,
    model_inputs: dict[str, Any] | None = None,
    **generate_kwargs: Any,
) -> Any:
    """`rl_model.generate(...)` with replay prepared for and injected into this batch's prefill."""
    model_inputs = model_inputs or {}
    with activation_replay(rl_model, base_model, input_ids, attention_mask, cfg, tokenizer, **model_inputs):
        return rl_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **model_inputs, **generate_kwargs
        )


def load_base_model(path: str, like: nn.Module) -> nn.Module:
    """Load the base model from a local directory (or hub id) in the RL model's dtype and device, frozen, eval."""
    from pathlib import Path

    import transformers

    dtype = next(like.parameters()).dtype
    device = next(like.parameters()).device
    errors = []
    for cls_name in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path, dtype=dtype)
            break
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"{cls_name}: {e}")
    else:
        hint = "" if Path(path).exists() else " (no such directory)"
        raise UserError(
            f"cannot load replay base model from {path!r}{hint}: {'; '.join(errors)[:400]}. "
            "Set replay.base_model to the RL model's pre-RL checkpoint directory."
        )
    model.to(device).eval().requires_grad_(False)
    return model


@dataclass
class ReplayStats:
    """Running totals over the generate calls of one evaluation (what replay did, for the record)."""

    calls: int = 0
    prompts: int = 0
    loss_first: float = 0.0
    """learnable: sum over prompts of the loss at the zero offsets."""
    loss_last: float = 0.0
    """learnable: sum over prompts of the loss at the last evaluated step."""
    selected: float = 0.0
    """Sum over prompts of the selected (learnable) or replaced (direct) fraction of eligible positions."""
    injections: list[int] = field(default_factory=list)
    loss_rose: int = 0
    """learnable: prompts whose replay loss rose by more than 1% at some step of the preparation (step too large)."""
    lr: float | None = None
    """learnable: replay.lr, named in the warning."""

    def add(self, log: InjectionLog) -> None:
        st = log.state
        self.calls += 1
        self.injections.append(sum(log.fired.values()))
        if st is None:
            return
        n_elig = st.eligible.sum(1).clamp_min(1).float()
        if isinstance(st, LearnableReplay):
            counts = st.num_selected.float().mean(0)
            if len(st.losses):
                self.loss_first += float(st.losses[0].sum())
                self.loss_last += float(st.losses[-1].sum())
            self._check_rise(st.losses)
        else:
            counts = st.masks.float().sum(-1).mean(0)
        self.prompts += int(st.eligible.shape[0])
        self.selected += float((counts / n_elig).sum())

    def _check_rise(self, losses: torch.Tensor) -> None:
        """Count prompts whose loss rose from one step to the next; print one warning line the first time.

        Gradient descent on the offsets with a fitting step lowers the loss at every step; a rise means the step
        overshoots (replay.lr too large for the model's embedding scale: the paper's 10 assumes ~10^3 visual
        tokens of large norm), and the offsets then move the activations far from anything either model makes.
        """
        if losses.shape[0] < 2:
            return
        prev, nxt = losses[:-1].double(), losses[1:].double()
        # (steps - 1, B); rises under 1% are round-off near convergence (measured up to 0.16% at a safe lr),
        # an overshooting step raises the loss by tens of percent to several times
        rose = nxt > prev * 1.01 + 1e-12
        rows = rose.any(0)
        if not bool(rows.any()):
            return
        if self.loss_rose == 0:
            b = int(rows.nonzero()[0])
            t = int(rose[:, b].nonzero()[0])
            print(
                f"warning: Activation Replay: the replay loss rose during preparation (a prompt's loss went "
                f"{float(prev[t, b]):.4g} -> {float(nxt[t, b]):.4g} at step {t + 1}): replay.lr={self.lr} is "
                "too large a step for this model's activations; lower it (the embedded pair: replay.align=paper "
                "replay.lr=0.001, docs/activation_replay.md).",
                file=sys.stderr,
                flush=True,
            )
        self.loss_rose += int(rows.sum())

    def absorb(self, other: ReplayStats) -> None:
        """Add another rank's totals (the in-training evaluation gathers one ReplayStats per rank)."""
        self.calls += other.calls
        self.prompts += other.prompts
        self.loss_first += other.loss_first
        self.loss_last += other.loss_last
        self.selected += other.selected
        self.injections += other.injections
        self.loss_rose += other.loss_rose

    def summary(self) -> dict[str, float]:
        n = max(self.prompts, 1)
        return {
            "replay_prompts": self.prompts,
            "replay_loss_first": self.loss_first / n,
            "replay_loss_last": self.loss_last / n,
            "replay_loss_rose_prompts": self.loss_rose,
            "replay_selected_fraction": self.selected / n,
            "replay_prefills_injected": sum(1 for x in self.injections if x),
        }


def default_base_model(cfg: Any) -> str:
    """`replay.base_model`; `embedded` (or unset for an embedded policy) = the warm-started checkpoint that
    embedded RL runs start from (same key as the run's config)."""
    base = cfg.replay.base_model
    if base == "embedded" or (not base and cfg.model.name_or_path == "embedded"):
        from rlx.embedded import ensure_warm_started

        return str(ensure_warm_started(cfg, progress=False))
    if base:
        return base
    raise UserError(
        f"replay={cfg.replay.mode} needs the base model: add base_model=PATH (replay.base_model), the RL "
        "policy's pre-RL checkpoint with the same tokenizer."
    )


def make_generate_fn(model: nn.Module, tokenizer: Any, cfg: Any) -> Callable[..., Any] | None:
    """`generate_fn(model, input_ids, attention_mask, **gen_kwargs)` for `rlx.generation.generate_texts` that
    prepares `cfg.replay` for each batch and injects it into that batch's prefill; decoding is untouched.
    None when replay is off. The returned function carries `.stats` (ReplayStats) and `.base_model` (path).
    """
    if normalise_mode(cfg.replay.mode) == "off":
        return None
    if cfg.replay.mode not in MODES:
        raise UserError(f"replay={cfg.replay.mode!r}: expected one of {', '.join(MODES)}.")
    path = default_base_model(cfg)
    base = load_base_model(path, like=model)
    stats = ReplayStats(lr=float(cfg.replay.lr) if cfg.replay.mode == "learnable" else None)
    generate_fn = replay_generate_fn(base, tokenizer, cfg.replay, stats)
    generate_fn.base_model = path
    return generate_fn


def replay_generate_fn(
    base: nn.Module, tokenizer: Any, replay_cfg: Any, stats: ReplayStats | None = None
) -> Callable[..., Any]:
    """The per-batch `generate_fn` behind `make_generate_fn`, for a base model already loaded: prepares
    `replay_cfg` (a `ReplayConfig` or a dict of its keys, `mode` included) for each batch and injects it into
    that batch's prefill, recording into `stats`. The in-training evaluation (`eval.replay`) keeps one base
    model for the whole run and makes one of these per evaluation."""
    stats = stats if stats is not None else ReplayStats()

    def generate_fn(m: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> Any:
        with activation_replay(m, base, input_ids, attention_mask, replay_cfg, tokenizer) as log:
            out = m.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        stats.add(log)
        return out

    generate_fn.stats = stats
    return generate_fn
