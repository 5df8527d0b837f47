"""The one seam where instruments plug into a trainer.

Every rlx trainer (GRPO, DPO, SFT subclasses of TRL, and rlx's own PPO) computes its loss inside
`capture_loss_forward`. That context manager hooks the policy for the duration of the loss forward only
and records what TRL's fused LM head does not return:

- `token_logps` l_t, the per-token log-probs the loss consumes, (B, S-1), in the autograd graph;
- `hidden`, the post-final-norm last-layer states, (B, S, d), in the graph (the backbone's
  `last_hidden_state`, which is exactly the LM head's input).

Then the trainer builds a `LossContext` and hands it to `InstrumentSet.on_loss`, which asks each enabled
instrument for an extra loss term and per-step metrics. The trainer never knows which instruments are on.

    trainer._compute_loss
      └─ capture_loss_forward(policy)          # hooks armed, removed in `finally`
           └─ TRL loss forward (fused head) -> loss, l_t, h
      └─ InstrumentSet.on_loss(LossContext)    # regularizers add terms, diagnostics read w_t = dL/dl_t
      └─ loss + sum(extra) * loss_scale
    Trainer: backward -> InstrumentSet.on_pre_optimizer_step (grads visible) -> optimizer.step
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from rlx.trainers.catalog import trainer_spec
from rlx.trainers.registry import TrainerSpec

_REGISTRY: dict[str, type[Instrument]] = {}
"""Filled by `register_instrument` as instrument modules are imported; read it through
`rlx.instruments.catalog.registered_instruments`, which imports every built-in one first (base imports none:
each instrument imports base)."""


def register_instrument(name: str) -> Callable[[type[Instrument]], type[Instrument]]:
    """Class decorator: make an instrument available by name (verl's `@register_policy_loss` pattern)."""

    def deco(cls: type[Instrument]) -> type[Instrument]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"instrument '{name}' is registered twice ({_REGISTRY[name]} and {cls})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class LossContext:
    """What an instrument sees for one micro-batch loss computation.

    Shapes: B sequences, S tokens per sequence, d hidden size. Position j of `token_logps` is the
    log-prob of token j+1 given tokens <= j, predicted from `hidden[:, j]`.
    """

    trainer: Any
    """The trainer (for its accelerator, state, args)."""
    algo: str
    """The trainer's registered name (for logs and error messages: instruments read `spec`, never the name)."""
    inputs: dict[str, Any]
    """The trainer's micro-batch."""
    loss: torch.Tensor
    """The trainer's own loss for this micro-batch, scalar, in the graph (GA-scaled as the trainer returns it)."""
    token_logps: torch.Tensor | None
    """(B, S-1) per-token log-probs l_t the loss consumed, in the graph; zero where not scored."""
    mask: torch.Tensor | None
    """(B, S-1) float, 1 on tokens the loss scores (completion tokens)."""
    hidden: torch.Tensor | None
    """(B, S, d) post-final-norm last-layer states, in the graph."""
    entropy: torch.Tensor | None = None
    """(B, S-1) per-token entropy of the policy, when the trainer computed it."""
    loss_scale: float = 1.0
    """Factor the seam applies to extra terms so they match the trainer's gradient-accumulation scaling
    (1/GA when the trainer's loss is already GA-scaled, as GRPO's; 1 when the Trainer divides afterwards)."""
    post_scale: float = 1.0
    """Factor the HF Trainer still applies to the returned loss before backward (1/GA for DPO, 1 for GRPO),
    so the gradient the optimizer accumulates from this micro-batch is post_scale * d(loss)/d(theta)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Algorithm-specific tensors, aligned with the last `completion_len` columns of `token_logps`:
    `advantages` (B,) or (B, C), `old_logps` (B, C), `ref_logps` (B, C), `group_ids` (B,), `sample_ids` (B,),
    `rewards` (B,) (the weighted task reward of each completion, NaN where no reward function scored it)."""
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    """What the instruments' `taps` asked for, recorded during this loss forward (in the graph): name -> the
    module's input or output tensor, e.g. (B, S, d) for a decoder block, (B, S, m) for a `down_proj` input."""
    spec: TrainerSpec | None = None
    """The trainer's registered facts (rlx/trainers/registry.py); looked up from `algo` when not given."""
    _weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = trainer_spec(self.algo)  # an unregistered name is an error, not a silent default

    @property
    def completion_len(self) -> int:
        """C: columns of `token_logps` that belong to the completion (all of them for DPO/SFT)."""
        return int(self.extras.get("completion_len", self.token_logps.shape[1]))

    @property
    def completion_logps(self) -> torch.Tensor:
        """(B, C) log-probs of completion tokens."""
        return self.token_logps[:, -self.completion_len :]

    @property
    def completion_mask(self) -> torch.Tensor:
        """(B, C) mask of completion tokens."""
        return self.mask[:, -self.completion_len :]

    @property
    def completion_hidden(self) -> torch.Tensor:
        """(B, C, d) states at the positions that predict completion tokens."""
        c = self.completion_len
        return self.hidden[:, -c - 1 : -1]

    def token_weights(self) -> torch.Tensor:
        """w_t = dL/dl_t, (B, S-1), by one autograd call on the real loss (graph kept for backward).

        This reproduces every TRL loss type, normaliser and gradient-accumulation scaling without
        re-deriving them: grad L = sum_t w_t grad l_t by the chain rule (docs/gradient_alignment.md).
        """
        if self._weights is None:
            (w,) = torch.autograd.grad(self.loss, self.token_logps, retain_graph=True, allow_unused=True)
            self._weights = torch.zeros_like(self.token_logps) if w is None else w.detach()
        return self._weights


@dataclass
class LossTerm:
    """An instrument's answer to `on_loss`: an extra loss (unscaled; None for pure diagnostics) and metrics."""

    loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Tap:
    """A module tensor an instrument wants from the loss forward: the module's first positional `input` or its
    `output` (the first element when the module returns a tuple)."""

    module: nn.Module
    kind: str = "output"

    def __post_init__(self) -> None:
        if self.kind not in ("input", "output"):
            raise ValueError(f"Tap.kind={self.kind!r}, expected 'input' or 'output'")


def decoder_layers(policy: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (`model.layers` for the Llama/Qwen/Mistral families)."""
    layers = getattr(backbone_of(policy), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(policy).__name__}: no decoder blocks at {policy.base_model_prefix}.layers; the probe monitors "
            "support the Llama/Qwen/Mistral layout (blocks in `model.layers`, MLP projection `mlp.down_proj`)."
        )
    return layers


def residual_tap(policy: nn.Module, layer: int) -> Tap:
    """The residual stream at `layer` in HF `hidden_states` order: 0 = the token embeddings, l = the output of
    block l (1..L). Block L's output is taken before the final norm (the post-norm states are `LossContext.hidden`)."""
    layers = decoder_layers(policy)
    if not 0 <= layer <= len(layers):
        raise ValueError(
            f"layer {layer} out of range: the model has {len(layers)} blocks (valid 0..{len(layers)})"
        )
    if layer == 0:
        return Tap(backbone_of(policy).get_input_embeddings(), "output")
    return Tap(layers[layer - 1], "output")


METRIC_REDUCTIONS = ("mean", "none")


def log_metrics(
    trainer: Any,
    metrics: Mapping[str, float | torch.Tensor],
    reduce: str = "mean",
    mode: str | None = None,
) -> None:
    """The one channel for per-step metrics: queue `metrics` in TRL's `trainer._metrics[mode]`, which the trainer's
    `log()` averages per logging step into metrics.jsonl and TensorBoard.

    reduce="mean": the NaN-aware mean over ranks, one all-reduce for every metric of the call (a rank whose value is
    not finite is left out of that metric's mean; NaN when no rank has one). A collective: every rank calls it at the
    same point with the same names. The values pass through one float32 tensor, also on one process.
    reduce="none": the values are already global (reduced by the caller, or identical on every rank); no collective,
    each is queued as `float(value)`.
    mode: TRL's "train" or "eval" store; by default "train" while `trainer.model` is in training mode.
    """
    if reduce not in METRIC_REDUCTIONS:
        raise ValueError(f"log_metrics: reduce={reduce!r}, expected one of {METRIC_REDUCTIONS}")
    if not metrics:
        return
    if mode is None:
        mode = "train" if trainer.model.training else "eval"
    store = trainer._metrics[mode]
    if reduce == "none":
        for k, v in metrics.items():
            store[k].append(float(v))
        return
    keys = sorted(metrics)
    acc = trainer.accelerator
    values = torch.tensor([float(metrics[k]) for k in keys], device=acc.device)
    if acc.num_processes > 1:
        finite = torch.isfinite(values)
        sums = acc.reduce(torch.where(finite, values, torch.zeros_like(values)), reduction="sum")
        counts = acc.reduce(finite.float(), reduction="sum")
        values = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(values, float("nan")))
    for k, v in zip(keys, values.tolist()):
        store[k].append(v)


class Instrument:
    """Base class. Override only the events you need; every method is optional.

    Instruments are built with `(cfg, run)` where `cfg` is their own config section and `run` the
    `RunContext` (run dir, diagnostics writer, full config).
    """

    name: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False
    """True when `on_loss` reads `ctx.hidden` (the seam then hooks the backbone)."""
    changes_loss: ClassVar[bool] = False
    """True for regularizers (they add a loss term); False for pure measurements."""

    def __init__(self, cfg: Any, run: Any) -> None:
        self.cfg = cfg
        self.run = run

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_begin(self, trainer: Any) -> None:
        """Before the first micro-batch of an optimizer step (generation included). An instrument that has
        nothing to record at this step should leave the model as it is: hooks only on the steps that need them."""

    def taps(self, policy: nn.Module) -> dict[str, Tap]:
        """Module tensors to record during the coming loss forward (`LossContext.taps`), keyed by a name unique to
        this instrument (prefix it with the instrument's name). Asked before every loss forward: return {} on the
        steps that record nothing, so no hook is installed there."""
        return {}

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        return None

    def on_before_clip(self, trainer: Any) -> None:
        """The step's gradient is complete in `.grad` (accumulated, all-reduced) and not yet clipped. Fired by every
        rlx trainer (`InstrumentedMixin._clip_grad_norm`) when it clips, i.e. when `max_grad_norm > 0`."""

    def on_pre_optimizer_step(self, trainer: Any) -> None:
        """Gradients are in `.grad` (all-reduced; clipped) except under DeepSpeed, see rlx/instruments/README."""

    def on_step_end(self, trainer: Any) -> None: ...

    def on_train_end(self, trainer: Any) -> None: ...

    def close(self) -> None:
        """Remove whatever the instrument installed on the model or trainer (hooks). Called when `train()` returns
        (after `on_train_end`) and when it raises; must be idempotent."""

    # ---- resume --------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered row to disk now. Called at each checkpoint, before the run's diagnostics are
        snapshotted into it, so a kill loses nothing a checkpoint covers."""

    def state_dict(self) -> dict[str, Any]:
        """Everything this instrument needs to continue *exactly* after a resume (tensors, numbers, lists,
        generator states, rows kept in memory). Saved per rank in every checkpoint (`torch.save`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; called before training resumes (before `on_train_begin`)."""


class InstrumentSet:
    """The enabled instruments of a run, called in a fixed order on every rank."""

    def __init__(self, instruments: list[Instrument]):
        self.instruments = instruments

    @property
    def needs_hidden(self) -> bool:
        return any(i.needs_hidden for i in self.instruments)

    def __bool__(self) -> bool:
        return bool(self.instruments)

    def __iter__(self) -> Iterator[Instrument]:
        return iter(self.instruments)

    def taps(self, model: nn.Module) -> dict[str, Tap]:
        """Every instrument's taps for the coming loss forward (names must not collide)."""
        policy, out = unwrap_policy(model), {}
        for inst in self.instruments:
            for name, tap in inst.taps(policy).items():
                if name in out:
                    raise ValueError(
                        f"instrument {inst.name} asks for tap '{name}', which another instrument uses"
                    )
                out[name] = tap
        return out

    def on_loss(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss with every extra term added (scaled by `ctx.loss_scale`) and all metrics."""
        loss, metrics = ctx.loss, {}
        for inst in self.instruments:
            term = inst.on_loss(ctx)
            if term is None:
                continue
            if term.loss is not None:
                loss = loss + term.loss * ctx.loss_scale
            metrics.update(term.metrics)
        return loss, metrics

    def call(self, event: str, trainer: Any) -> None:
        for inst in self.instruments:
            getattr(inst, event)(trainer)

    def flush(self) -> None:
        for inst in self.instruments:
            inst.flush()

    def close(self) -> None:
        """`close` every instrument, all of them even if one raises (the first error is raised after)."""
        error = None
        for inst in self.instruments:
            try:
                inst.close()
            except Exception as e:  # the others must still release their hooks
                error = error or e
        if error is not None:
            raise error

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {inst.name: inst.state_dict() for inst in self.instruments}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore each instrument; a checkpoint from a run with other instruments is refused."""
        names = [inst.name for inst in self.instruments]
        if sorted(state) != sorted(names):
            raise ValueError(
                f"the checkpoint holds state for instruments {sorted(state)}, this run has {sorted(names)}"
            )
        for inst in self.instruments:
            inst.load_state_dict(state[inst.name])


# ---- capture of l_t and h during the loss forward -----------------------------------------------------


def unwrap_policy(model: nn.Module) -> nn.Module:
    """The HF causal LM inside DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def backbone_of(policy: nn.Module) -> nn.Module:
    """The decoder stack whose `last_hidden_state` feeds the LM head (post final norm)."""
    return getattr(policy, policy.base_model_prefix, None) or policy.model


@dataclass
class Captured:
    token_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    _logps: list = field(default_factory=list)
    _ent: list = field(default_factory=list)
    _mask: list = field(default_factory=list)
    _hid: list = field(default_factory=list)
    _forwards: int = 0
    _grad: list = field(default_factory=list)
    """Per recorded loss forward (and per recorded hidden state, `_hid_grad`): whether grad mode was on."""
    _hid_grad: list = field(default_factory=list)
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    _taps: dict[str, list] = field(default_factory=dict)
    """name -> [(tensor, grad mode)] per recorded forward of the tapped module."""

    def finish(self) -> Captured:
        # A training loss may also run a no-grad loss forward through the policy itself: TRL's DPO with a PEFT
        # policy and no reference model computes the reference log-probs with the adapters switched off. When
        # any forward ran with grad, only those are the policy's; without any (evaluation) all are kept.
        if any(self._grad):
            keep = lambda xs, flags: [x for x, g in zip(xs, flags, strict=True) if g]  # noqa: E731
            ent_flags = self._grad if len(self._ent) == len(self._grad) else [True] * len(self._ent)
            mask_flags = self._grad if len(self._mask) == len(self._grad) else [True] * len(self._mask)
            self._ent, self._mask = keep(self._ent, ent_flags), keep(self._mask, mask_flags)
            self._logps = keep(self._logps, self._grad)
            self._hid = keep(self._hid, self._hid_grad)
            self._taps = {k: [(t, g) for t, g in v if g] for k, v in self._taps.items()}
        # TRL may chunk one loss forward over sub-batches; concatenate them back.
        cat = lambda xs: torch.cat(xs, 0) if len(xs) > 1 else (xs[0] if xs else None)  # noqa: E731
        self.token_logps, self.entropy = cat(self._logps), cat(self._ent)
        self.label_mask, self.hidden = cat(self._mask), cat(self._hid)
        self.taps = {k: cat([t for t, _ in v]) for k, v in self._taps.items() if v}
        return self


@contextlib.contextmanager
def capture_loss_forward(
    model: nn.Module, hidden: bool = True, taps: Mapping[str, Tap] | None = None
) -> Iterator[Captured]:
    """Hook the policy for one loss forward; yields a `Captured` filled when the block exits.

    Only forwards called with `fused_lm_head=True` (TRL's loss path) or `rlx_capture=True` are recorded, so
    generation and a separate reference model's passes are ignored; when the block also runs such a forward of
    the policy itself without grad (a PEFT policy's adapters-off reference pass) next to ones with grad, only the
    ones with grad are kept. Hooks are always removed.
    Raises RuntimeError when the block ends normally without such a forward returning `log_probs`, or, with
    `hidden`, without the backbone running inside it: instruments would otherwise see None and record nothing.
    `taps` (name -> `Tap`): module inputs/outputs recorded, like the hidden states, only inside recorded loss
    forwards (`Captured.taps`); a tap whose module did not run there is an error too.
    """
    policy = unwrap_policy(model)
    cap = Captured()
    depth = {"n": 0}

    def top_pre(module, args, kwargs):
        if kwargs.get("fused_lm_head") or kwargs.get("rlx_capture"):
            depth["n"] += 1

    def top_post(module, args, kwargs, out):
        if not (kwargs.get("fused_lm_head") or kwargs.get("rlx_capture")):
            return
        depth["n"] -= 1
        cap._forwards += 1
        if getattr(out, "log_probs", None) is not None:
            cap._logps.append(out.log_probs)
            cap._grad.append(torch.is_grad_enabled())
            if getattr(out, "entropy", None) is not None:
                cap._ent.append(out.entropy)
            if getattr(out, "label_mask", None) is not None:
                cap._mask.append(out.label_mask.float())

    def backbone_post(module, args, out):
        if depth["n"] > 0:
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            cap._hid.append(h)
            cap._hid_grad.append(torch.is_grad_enabled())

    def tap_hook(name: str, kind: str):
        def hook(module, args, out):
            if depth["n"] > 0:
                t = args[0] if kind == "input" else (out[0] if isinstance(out, tuple) else out)
                cap._taps.setdefault(name, []).append((t, torch.is_grad_enabled()))

        return hook

    handles = [
        policy.register_forward_pre_hook(top_pre, with_kwargs=True),
        policy.register_forward_hook(top_post, with_kwargs=True),
    ]
    try:
        if hidden:
            handles.append(backbone_of(policy).register_forward_hook(backbone_post))
        for name, tap in (taps or {}).items():
            handles.append(tap.module.register_forward_hook(tap_hook(name, tap.kind)))
        yield cap
    finally:
        for h in handles:
            h.remove()
        cap.finish()
    _check_captured(cap, policy, hidden, taps or {})


def _check_captured(cap: Captured, policy: nn.Module, hidden: bool, taps: Mapping[str, Tap]) -> None:
    name = type(policy).__name__
    if cap.token_logps is None:
        if cap._forwards == 0:
            raise RuntimeError(
                f"capture_loss_forward saw no loss forward of {name}: expected the loss to call the policy with "
                "fused_lm_head=True (TRL's fused LM head path) or rlx_capture=True inside the block. A loss computed "
                "another way (from the backbone's outputs, or with a trainer option that replaces the fused head) "
                "cannot be instrumented: turn that option off or the instruments."
            )
        raise RuntimeError(
            f"capture_loss_forward saw {cap._forwards} loss forward(s) of {name} but none returned log_probs: "
            "expected the output of TRL's fused LM head (trl add_fused_lm_head on the policy)."
        )
    if hidden and cap.hidden is None:
        raise RuntimeError(
            f"capture_loss_forward saw no hidden states: the backbone {type(backbone_of(policy)).__name__} of "
            f"{name} did not run inside the loss forward, but an instrument needs them (needs_hidden). Expected "
            "the LM head's input to come from `backbone_of(policy)` (the module at policy.base_model_prefix)."
        )
    missing = sorted(set(taps) - set(cap.taps))
    if missing:
        raise RuntimeError(
            f"capture_loss_forward recorded nothing for tap(s) {missing}: their modules did not run inside the loss "
            f"forward of {name}. Expected modules of the policy itself (e.g. `residual_tap(policy, layer)`)."
        )
