"""The `probes` monitor: frozen linear probes loaded from safetensors files, scored on every rollout and logged by
reward bucket (docs/probes.md).

A probe file holds a tensor `direction` (d,), an optional `bias` (a scalar or (1,)), and header metadata:

    layer      HF hidden_states index: 0 = token embeddings, l = output of block l (1..L-1), L = the last block's
               output after the final norm (the LM head's input, what the seam calls `hidden`); or "final" (= L)
    position   last: the last completion token | mean: the mean over the completion tokens |
               prompt_last: the last prompt token
    name       (optional) the name in metrics and dumps; default the file's stem
    normalize  (optional) "true": score with direction / |direction|

Score of rollout i: s_i = <h_layer(i, position), direction> + bias, with h the states of the loss forward (the
policy being trained, at the step's weights). `save_probe` writes such a file.

Per scored step (step 1 and every `every` steps; on-policy steps only when the trainer reuses rollouts):

    taps (before each loss forward)  the residual stream of each layer < L a probe reads (`residual_tap`); the
                                     seam's `hidden` for layer L
    on_loss (each micro-batch)       pooled states at each probe's position, scores, rewards, per rollout
    on_step_end                      gathered over ranks; metrics probes/<name>/{mean,mean_correct,mean_wrong,auroc};
                                     rank 0 writes diagnostics/probes/step_NNNNNN.parquet (sample_id, step, probe,
                                     score, reward), which joins the rollout dumps on sample_id
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlx import dumps
from rlx.algorithms.probing import StepRows, auroc, reward_buckets
from rlx.errors import UserError
from rlx.instruments.base import (
    LossContext,
    Tap,
    decoder_layers,
    log_metrics,
    register_instrument,
    residual_tap,
    unwrap_policy,
)
from rlx.instruments.monitor import RolloutMonitor

POSITIONS = ("last", "mean", "prompt_last")
"""Where a probe reads the states: the last completion token, the mean over completion tokens, the last prompt
token."""
FINAL = "final"
"""`layer` metadata for the post-final-norm last layer (HF hidden_states[L])."""
TENSORS = ("direction", "bias")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Probe:
    """One probe as loaded from its file (layer None = "final", resolved to L against the model)."""

    name: str
    path: str
    direction: torch.Tensor
    """(d,) float32; already divided by its norm when `normalize`."""
    bias: float
    layer: int | None
    position: str
    normalize: bool = False


def _check_meta(layer: Any, position: Any, name: Any, where: str) -> tuple[int | None, str, str | None]:
    """Validated (layer, position, name) of a probe; UserError naming `where` otherwise."""
    if str(position) not in POSITIONS:
        raise UserError(f"{where}: position={position!r} is unknown; expected one of {', '.join(POSITIONS)}.")
    if isinstance(layer, str) and layer.strip().lower() == FINAL:
        lay = None
    else:
        try:
            lay = int(str(layer).strip())
        except ValueError:
            lay = -1
        if lay < 0 or isinstance(layer, bool):
            raise UserError(
                f"{where}: layer={layer!r}; expected an HF hidden_states index >= 0 (0 = embeddings, L = the "
                f"post-norm last layer) or {FINAL!r}."
            )
    if name is not None and not _NAME.fullmatch(str(name)):
        raise UserError(
            f"{where}: name={name!r}; expected letters, digits, '_', '.' or '-' (it becomes part of metric names)."
        )
    return lay, str(position), None if name is None else str(name)


def save_probe(
    path: str | Path,
    direction: Any,
    bias: float = 0.0,
    layer: int | str = FINAL,
    position: str = "last",
    name: str | None = None,
    normalize: bool = False,
) -> Path:
    """Write a probe file for `diagnostics.probes.paths`: `direction` (d,) as float32, `bias` as a (1,) float32
    tensor, `layer` (HF hidden_states index or "final"), `position` (last | mean | prompt_last), `name` and
    `normalize` in the header. Returns the path (parent folders are created)."""
    from safetensors.torch import save_file

    path = Path(path)
    lay, pos, nm = _check_meta(layer, position, name, f"save_probe({path})")
    d = torch.as_tensor(direction).detach().cpu()
    if d.dim() != 1 or d.numel() == 0 or not torch.isfinite(d.float()).all():
        raise UserError(
            f"save_probe({path}): direction has shape {tuple(d.shape)}; expected a finite (d,) vector."
        )
    if not math.isfinite(float(bias)):
        raise UserError(f"save_probe({path}): bias={bias}; expected a finite number.")
    meta = {
        "layer": FINAL if lay is None else str(lay),
        "position": pos,
        "normalize": str(bool(normalize)).lower(),
    }
    if nm is not None:
        meta["name"] = nm
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"direction": d.float().contiguous(), "bias": torch.tensor([float(bias)], dtype=torch.float32)}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_probe(path: str | Path) -> Probe:
    """Read and check one probe file (docs/probes.md); UserError saying what is wrong and how to fix it."""
    from safetensors import safe_open

    p = Path(path)
    where = f"diagnostics.probes: probe file {p}"
    if not p.is_file():
        raise UserError(
            f"{where} does not exist. Give existing files in diagnostics.probes.paths "
            "(write one with rlx.instruments.probes.save_probe)."
        )
    try:
        with safe_open(str(p), "pt") as fh:
            meta = dict(fh.metadata() or {})
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in keys & set(TENSORS)}
    except Exception as e:  # not safetensors, truncated, ...
        raise UserError(f"{where} is not a readable safetensors file ({e}).") from None
    extra = sorted(keys - set(TENSORS))
    if "direction" not in keys or extra:
        raise UserError(
            f"{where} holds tensors {sorted(keys)}; expected `direction` (d,) and optionally `bias` (nothing else)."
        )
    direction = tensors["direction"]
    if direction.dim() != 1 or not direction.is_floating_point() or direction.numel() == 0:
        raise UserError(
            f"{where}: `direction` is {direction.dtype} of shape {tuple(direction.shape)}; expected a float (d,) "
            "vector."
        )
    direction = direction.float()
    if not torch.isfinite(direction).all():
        raise UserError(f"{where}: `direction` has non-finite entries.")
    bias = tensors.get("bias")
    if bias is not None and (bias.numel() != 1 or bias.dim() > 1 or not bias.is_floating_point()):
        raise UserError(
            f"{where}: `bias` is {bias.dtype} of shape {tuple(bias.shape)}; expected a float scalar or (1,)."
        )
    b = 0.0 if bias is None else float(bias.reshape(()))
    if not math.isfinite(b):
        raise UserError(f"{where}: `bias` is not finite.")
    for key in ("layer", "position"):
        if key not in meta:
            raise UserError(
                f"{where}: the header has no `{key}` metadata (it has {sorted(meta)}); expected layer (an HF "
                f"hidden_states index or {FINAL!r}) and position ({' | '.join(POSITIONS)}). Write the file with "
                "rlx.instruments.probes.save_probe."
            )
    layer, position, name = _check_meta(meta["layer"], meta["position"], meta.get("name"), where)
    normalize = str(meta.get("normalize", "false")).strip().lower()
    if normalize not in ("true", "false", "1", "0"):
        raise UserError(f"{where}: normalize={meta['normalize']!r}; expected true or false.")
    norm = normalize in ("true", "1")
    if norm:
        n = direction.norm()
        if float(n) == 0.0:
            raise UserError(f"{where}: normalize=true but `direction` is all zeros.")
        direction = direction / n
    return Probe(
        name=name or p.stem,
        path=str(p),
        direction=direction,
        bias=b,
        layer=layer,
        position=position,
        normalize=norm,
    )


def pooled_states(
    states: torch.Tensor, position: str, prompt_mask: torch.Tensor | None, completion_mask: torch.Tensor
) -> torch.Tensor:
    """(B, S, d) states of the forward on cat(prompt, completion) -> (B, d) float64 states at `position`
    (`POSITIONS`); NaN rows where the position does not exist (an empty completion).

    prompt_mask (B, P) marks the real prompt tokens (None: all of them), completion_mask (B, C) the completion
    tokens; S must be P + C."""
    b, s, _ = states.shape
    c = completion_mask.shape[1]
    p = s - c
    if p < 0 or (prompt_mask is not None and prompt_mask.shape[1] != p):
        raise ValueError(
            f"pooled_states: {s} positions for a prompt of {None if prompt_mask is None else prompt_mask.shape[1]} "
            f"and a completion of {c} tokens; expected the forward on cat(prompt, completion)."
        )
    h = states.detach().double()
    nan = torch.full((b, h.shape[-1]), float("nan"), dtype=torch.float64, device=h.device)
    if position == "mean":
        m = completion_mask.detach().to(h.device, torch.float64)
        n = m.sum(1, keepdim=True)
        out = (h[:, p:] * m.unsqueeze(-1)).sum(1) / n.clamp_min(1.0)
        return torch.where(n > 0, out, nan)
    if position == "last":
        m, offset = completion_mask.detach().to(h.device) > 0, p
    elif position == "prompt_last":
        pm = torch.ones(b, p, device=h.device) if prompt_mask is None else prompt_mask.detach().to(h.device)
        m, offset = pm > 0, 0
    else:
        raise ValueError(f"position={position!r}: expected one of {POSITIONS}")
    idx = torch.arange(1, m.shape[1] + 1, device=h.device)
    last = (m.long() * idx).max(1).values - 1 if m.shape[1] else torch.full((b,), -1, device=h.device)
    rows = h[torch.arange(b, device=h.device), (offset + last.clamp_min(0)).clamp_max(s - 1)]
    return torch.where((last >= 0).unsqueeze(1), rows, nan)


def probe_scores(pooled: torch.Tensor, direction: torch.Tensor, bias: float) -> torch.Tensor:
    """(B, d) pooled states -> (B,) <h, direction> + bias in float64 (NaN rows stay NaN)."""
    return pooled.double() @ direction.to(pooled.device, torch.float64) + float(bias)


@register_instrument("probes")
class Probes(RolloutMonitor):
    """Frozen linear probes from safetensors files, scored on every rollout of the scored steps."""

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        if int(cfg.every) < 1:
            raise UserError(
                f"diagnostics.probes.every={cfg.every}: expected an integer >= 1 (score every N steps)."
            )
        if not math.isfinite(float(cfg.threshold)):
            raise UserError(
                f"diagnostics.probes.threshold={cfg.threshold}: expected a finite reward threshold."
            )
        paths = list(cfg.paths or [])
        if not paths:
            raise UserError(
                "diagnostics.probes.enabled=true but diagnostics.probes.paths is empty: give the probe files, e.g. "
                "diagnostics.probes.paths=[probe.safetensors] (write one with rlx.instruments.probes.save_probe)."
            )
        self.probes = [load_probe(p) for p in paths]
        """The probes, in `paths` order (files checked now; against the model at train begin)."""
        names = [p.name for p in self.probes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(
                f"diagnostics.probes: several files have the name(s) {dup}; give each probe a distinct `name` "
                "(save_probe(..., name=...)) or a distinct file stem."
            )
        self.num_layers: int | None = None
        """L, the model's block count (set at train begin)."""
        self.rows = StepRows()
        self.last_metrics: dict[str, float] = {}

    # ---- set-up and checks against the model ------------------------------------------------------------------

    def check_model(self, policy: torch.nn.Module) -> None:
        """UserError unless every probe's direction has the model's hidden size and its layer exists; sets L."""
        text = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        d = int(getattr(text, "hidden_size", 0) or 0)
        n_layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        needs_blocks = False
        for p in self.probes:
            where = f"diagnostics.probes: probe {p.name!r} ({p.path})"
            if d and p.direction.numel() != d:
                raise UserError(
                    f"{where}: direction has {p.direction.numel()} entries but the model's hidden size is {d}. "
                    "Use a probe trained on this model's states."
                )
            if p.layer is not None and p.layer > n_layers:
                raise UserError(
                    f"{where}: layer {p.layer} is out of range: the model has {n_layers} blocks, so layer is 0 "
                    f"(embeddings) .. {n_layers} (post-norm last layer) or {FINAL!r}."
                )
            needs_blocks = needs_blocks or (p.layer is not None and p.layer < n_layers)
        if needs_blocks:
            try:
                blocks = len(decoder_layers(policy))
            except ValueError as e:
                raise UserError(f"diagnostics.probes: a probe reads an inner layer, but {e}") from None
            if blocks != n_layers:
                raise UserError(
                    f"diagnostics.probes: the model has {blocks} blocks in model.layers but config.num_hidden_layers="
                    f"{n_layers}; cannot place inner-layer probes."
                )
        self.num_layers = n_layers

    def on_train_begin(self, trainer: Any) -> None:
        self.bind(trainer)
        self.check_model(unwrap_policy(trainer.model))

    # ---- cadence and taps -----------------------------------------------------------------------------------

    def _active(self) -> bool:
        return self.num_layers is not None and self.measuring()

    def _layer(self, probe: Probe) -> int:
        """The probe's HF hidden_states index (final -> L)."""
        return self.num_layers if probe.layer is None else probe.layer

    def _inner_layers(self) -> list[int]:
        return sorted({self._layer(p) for p in self.probes if self._layer(p) < self.num_layers})

    @property
    def needs_hidden(self) -> bool:  # type: ignore[override]
        """Scored steps with a probe on the last (post-norm) layer read `ctx.hidden`; others need nothing."""
        return self._active() and any(self._layer(p) == self.num_layers for p in self.probes)

    def taps(self, policy: torch.nn.Module) -> dict[str, Tap]:
        if not self._active():
            return {}
        return {f"probes/layer{k}": residual_tap(policy, k) for k in self._inner_layers()}

    # ---- per micro-batch ----------------------------------------------------------------------------------

    def _states(self, ctx: LossContext, layer: int) -> torch.Tensor | None:
        if layer == self.num_layers:
            return ctx.hidden
        return ctx.taps.get(f"probes/layer{layer}")

    def on_loss(self, ctx: LossContext) -> None:
        trainer = ctx.trainer
        self.bind(trainer)
        model = getattr(trainer, "model", None)
        if (
            self.num_layers is None
            or not torch.is_grad_enabled()
            or (model is not None and not model.training)
        ):
            return None
        if not self.measuring():
            return None
        inputs = ctx.inputs or {}
        cmask = inputs.get("completion_mask")
        cmask = ctx.completion_mask if cmask is None else cmask
        pmask = inputs.get("prompt_mask")
        scores: dict[str, torch.Tensor] = {}
        pooled_cache: dict[tuple[int, str], torch.Tensor] = {}
        with torch.no_grad():
            for k, p in enumerate(self.probes):
                key = (self._layer(p), p.position)
                if key not in pooled_cache:
                    states = self._states(ctx, key[0])
                    if states is None:  # the forward ran without our hooks (not a measured forward): skip it
                        return None
                    pooled_cache[key] = pooled_states(states, p.position, pmask, cmask)
                scores[f"s{k}"] = probe_scores(pooled_cache[key], p.direction, p.bias)
        n = cmask.shape[0]
        rewards = ctx.extras.get("rewards")
        if rewards is None:
            rewards = torch.full((n,), float("nan"))
        self.rows.add(ctx.extras.get("sample_ids"), reward=rewards.detach().float(), **scores)
        return None

    # ---- step end -------------------------------------------------------------------------------------------

    @staticmethod
    def step_metrics(score: torch.Tensor, reward: torch.Tensor, threshold: float) -> dict[str, float]:
        """mean, mean_correct, mean_wrong (finite scores) and auroc (score vs correct, over rollouts with a reward
        and a finite score) of one probe at one step."""
        ok = torch.isfinite(score)
        b = reward_buckets(reward, threshold)
        out = {}
        for key, sel in (("mean", ok), ("mean_correct", ok & b["correct"]), ("mean_wrong", ok & b["wrong"])):
            out[key] = float(score[sel].mean()) if bool(sel.any()) else math.nan
        scored = ok & (b["correct"] | b["wrong"])
        out["auroc"] = auroc(score[scored], b["correct"][scored])
        return out

    def on_step_end(self, trainer: Any) -> None:
        self.bind(trainer)
        step = int(trainer.state.global_step)
        if self.num_layers is None or not self.measured(step):
            return
        cols = self.rows.gather(getattr(trainer, "accelerator", None))  # a collective: every rank calls it
        if not cols:
            return
        thr = float(self.cfg.threshold)
        metrics = {}
        for k, p in enumerate(self.probes):
            for key, v in self.step_metrics(cols[f"s{k}"], cols["reward"], thr).items():
                metrics[f"{p.name}/{key}"] = v
        self.last_metrics = metrics
        if getattr(trainer, "_metrics", None) is not None:
            finite = {f"probes/{k}": v for k, v in metrics.items() if math.isfinite(v)}
            log_metrics(trainer, finite, reduce="none", mode="train")
        if not self.cfg.save_rows or not getattr(self.run, "is_main", True) or self.run.writer is None:
            return
        sids = cols["sample_id"].tolist()
        rows = [
            {
                "sample_id": int(sid),
                "step": step,
                "probe": p.name,
                "score": float(cols[f"s{k}"][i]),
                "reward": float(cols["reward"][i]),
            }
            for k, p in enumerate(self.probes)
            for i, sid in enumerate(sids)
        ]
        self.run.writer.write(dumps.PROBES, rows, step=step)
