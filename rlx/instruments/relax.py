"""The `relax` regularizer: ReLaX latent exploration (arXiv 2512.07558) behind the instrument seam.

Per loss micro-batch (no extra forward: the states come from the seam's hook on the loss forward):

    h_i      = fp32 post-norm last-layer states predicting completion i's tokens    (B, C, d)
    K_i      = EDMD ridge operator of sigmoid(W h_i) over valid transitions          (B, m, m)
    d_i      = DSD(K_i) (singular values by default)                                 (B,)
    a_i      = max(A_i, 0)  [* L_i / L_max with code_compat]
    loss    += alpha * L_xp(d, a; groups) + beta * token-mean(M_i * clamp(k3 KL))

Reference log-probs for the adaptive KL come from the trainer when it computed them (GRPO with
trainer.beta != 0), otherwise from `LazyReference` on the KL-masked rows only.

W is fitted at the first loss call and refitted every `refit_every` steps (authors' cadence, 50) on the
detached states of the current rollout batch gathered from every rank, with a budget of `dict_steps` Adam
steps, on rank 0; it is broadcast to all ranks and saved as `diagnostics/relax/dictionary.safetensors`, and
every fit's loss curve goes to `diagnostics/relax/dictionary_fit.json`. Exact resume restores W, xi and
the fit history through `state_dict` / `load_state_dict`; without a saved state, a run directory that
already holds a dictionary reuses it.

Dumps (every `save_every` steps, written every `flush_every` steps): per-trajectory rows (parquet), a compact
fp16 summary of the spectra of every recorded micro-batch (quantiles over its trajectories of each sorted
singular value), and each trajectory's full spectrum only at step 1 and every `full_spectra_every` steps.
Bytes per step on the tiny recipe: docs/relax.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlx import dumps
from rlx.algorithms.stats import masked_mean
from rlx.errors import UserError
from rlx.instruments.base import (
    Instrument,
    LossContext,
    LossTerm,
    backbone_of,
    register_instrument,
    unwrap_policy,
)
from rlx.instruments.reference import LazyReference
from rlx.regularizers.dictionary import (
    dataset_loss,
    fit_dictionary,
    init_dictionary,
    usable_trajectories,
)
from rlx.regularizers.dsd import SPECTRA, dispersion_from_features, dynamic_spectral_dispersion
from rlx.regularizers.koopman import dictionary_features, koopman_operator
from rlx.regularizers.loss import adaptive_kl, exploration_loss, kl_mask, positive_advantage

SUMMARY_LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
"""Quantile levels over a micro-batch's trajectories kept for each sorted singular value in the summary."""
DICT_FILE = dumps.RELAX_DICTIONARY.path


def sequence_advantages(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) advantages; token-level (B, C) ones are averaged over each completion's valid tokens."""
    if adv.dim() == 1:
        return adv.float()
    return masked_mean(adv.float(), mask, 1)


def group_ids_of(ctx: LossContext, n: int) -> torch.Tensor:
    """Prompt-group ids (B,): the trainer's tags, else consecutive blocks of trainer.num_generations."""
    gid = ctx.extras.get("group_ids")
    if gid is not None:
        return gid
    r = int(getattr(ctx.trainer, "num_generations", 0) or n)
    return torch.arange(n) // r


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_states(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every rank's (N_r, T_r, d) states and (N_r, T_r) masks, padded and gathered on rank 0.

    Returns the concatenation in rank order on rank 0 (rows of each rank trimmed back to N_r, widths padded
    to the largest T_r with mask 0) and None on the other ranks. Without torch.distributed it returns the
    inputs. A gather, not an all_gather: only rank 0 fits, so only rank 0 holds world x the states.
    """
    if not _dist() or torch.distributed.get_world_size() == 1:
        return hidden, mask
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = torch.tensor([hidden.shape[0], hidden.shape[1]], device=hidden.device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    n_max = max(int(t[0]) for t in shapes)
    t_max = max(int(t[1]) for t in shapes)
    h = torch.nn.functional.pad(hidden, (0, 0, 0, t_max - hidden.shape[1], 0, n_max - hidden.shape[0]))
    m = torch.nn.functional.pad(mask, (0, t_max - mask.shape[1], 0, n_max - mask.shape[0]))
    hs = [torch.empty_like(h) for _ in range(world)] if rank == 0 else None
    ms = [torch.empty_like(m) for _ in range(world)] if rank == 0 else None
    dist.gather(h.contiguous(), hs, dst=0)
    dist.gather(m.contiguous(), ms, dst=0)
    if rank != 0:
        return None
    n = [int(t[0]) for t in shapes]
    return torch.cat([x[:k] for x, k in zip(hs, n)]), torch.cat([x[:k] for x, k in zip(ms, n)])


@register_instrument("relax")
class Relax(Instrument):
    """ReLaX: alpha * L_xp + beta * adaptive KL, with per-step DSD metrics and per-trajectory dumps."""

    needs_hidden = True
    changes_loss = True

    def __init__(self, cfg: Any, run: Any) -> None:
        super().__init__(cfg, run)
        if cfg.spectrum not in SPECTRA:
            raise UserError(
                f"regularizers.relax.spectrum={cfg.spectrum!r}: expected one of {', '.join(SPECTRA)}. "
                "Use svd (authors' code, default) or eig (paper Eq. 6)."
            )
        if cfg.group not in ("prompt", "batch"):
            raise UserError(
                f"regularizers.relax.group={cfg.group!r}: expected prompt or batch. "
                "prompt = log-mean-exp over each prompt group (paper); batch = over the micro-batch (code)."
            )
        if cfg.alpha < 0 or cfg.beta < 0 or cfg.dict_size < 2:
            raise UserError(
                f"regularizers.relax: alpha={cfg.alpha}, beta={cfg.beta}, dict_size={cfg.dict_size}; "
                "expected alpha >= 0, beta >= 0 and dict_size >= 2. Fix the recipe or override."
            )
        if int(cfg.full_spectra_every) < 0:
            raise UserError(
                f"regularizers.relax.full_spectra_every={cfg.full_spectra_every}: expected an integer >= 0 "
                "(keep full spectra at step 1 and every N steps; 0 = never, summaries only)."
            )
        if cfg.dict_steps < 0 or cfg.dict_epochs < 0 or cfg.refit_every < 0:
            raise UserError(
                f"regularizers.relax: dict_steps={cfg.dict_steps}, dict_epochs={cfg.dict_epochs}, "
                f"refit_every={cfg.refit_every}; expected integers >= 0 (0 = off / use dict_epochs)."
            )
        self.weight: torch.Tensor | None = None
        self.xi: float | None = None if cfg.xi is None else float(cfg.xi)
        self.xi_median: float | None = None
        self.fit_step = -1
        self.micro = 0
        self.rows: list[dict[str, Any]] = []
        self.spectra: list[dict[str, Any]] = []  # full spectra of the recorded micro-batches at full steps
        self.summaries: list[dict[str, Any]] = []  # compact summary of every recorded micro-batch
        self.fits: list[dict[str, Any]] = []
        self.reference = LazyReference()

    @property
    def _eps(self) -> float:
        """eps of the smoothed modulus: the authors' for svd; for eig only with eig_eps (Eq. 6 has none)."""
        if self.cfg.spectrum == "eig" and not self.cfg.eig_eps:
            return 0.0
        return float(self.cfg.eps)

    # ---- resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """W, xi (and the median it was calibrated from), fit step, micro-batch counter, fit history and
        the per-trajectory rows, spectra and spectrum summaries not yet written. The fit owns no generator between fits (each
        fit seeds its own from dict_seed + step); the lazy reference is the base model and is rebuilt."""
        return {
            "weight": None if self.weight is None else self.weight.detach().cpu().clone(),
            "xi": self.xi,
            "xi_median": self.xi_median,
            "fit_step": self.fit_step,
            "micro": self.micro,
            "fits": [dict(f) for f in self.fits],
            "rows": [dict(r) for r in self.rows],
            "spectra": [{**r, "values": r["values"].clone()} for r in self.spectra],
            "summaries": [dict(r) for r in self.summaries],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = state.get("weight")
        self.weight = None if w is None else w.detach().float().clone()
        self.xi = None if state.get("xi") is None else float(state["xi"])
        self.xi_median = state.get("xi_median")
        self.fit_step = int(state.get("fit_step", -1))
        self.micro = int(state.get("micro", 0))
        self.fits = [dict(f) for f in state.get("fits", [])]
        self.rows = [dict(r) for r in state.get("rows", [])]
        spectra = state.get("spectra", [])
        if "summaries" not in state:  # a checkpoint of rlx before spectra v2: one full tensor per record
            spectra = self._records_from_v1(spectra)
            self.summaries = [self._summary(r["step"], r["micro_step"], r["values"]) for r in spectra]
            spectra = [r for r in spectra if self._full_step(r["step"])]
        else:
            self.summaries = [dict(r) for r in state["summaries"]]
        self.spectra = [{**r, "values": r["values"].clone()} for r in spectra]

    def _records_from_v1(self, tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
        """v1 state: the i-th tensor holds the spectra of the i-th recorded micro-batch of `self.rows`."""
        keys = list(dict.fromkeys((r["step"], r["micro_step"]) for r in self.rows))
        return [{"step": s, "micro_step": m, "values": t} for (s, m), t in zip(keys, tensors)]

    # ---- events ------------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Any) -> None:
        if self.weight is None:  # nothing restored by load_state_dict: reuse a dictionary in the run dir
            self._load_dictionary()

    def on_loss(self, ctx: LossContext) -> LossTerm | None:
        cfg = self.cfg
        step = int(getattr(getattr(ctx.trainer, "state", None), "global_step", 0) or 0)
        hidden = ctx.completion_hidden.float()
        mask = ctx.completion_mask.float()
        if self.weight is None or (cfg.refit_every and step > self.fit_step and step % cfg.refit_every == 0):
            self._fit(ctx, step)
        weight = self.weight.to(hidden.device)

        lengths = mask.sum(1)
        adv = sequence_advantages(ctx.extras["advantages"], mask)
        if cfg.code_compat:
            # Authors' verl: states zeroed past the response and padded to L_max, every transition used.
            l_max = self._max_len(ctx)
            hidden = hidden * mask.unsqueeze(-1)
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, max(l_max - hidden.shape[1], 0)))
            tmask = None
            a = positive_advantage(adv, lengths, l_max)
        else:
            tmask = mask
            a = positive_advantage(adv)
        feats = dictionary_features(hidden, weight)
        # DSD of every trajectory without a graph (metrics, mask, dumps), then with gradients only where the
        # loss can push (a > 0 and DSD <= xi): elsewhere z is 0 or detached, so the gradient is identical.
        if cfg.spectrum == "svd":
            dsd_all, spectrum = dispersion_from_features(feats, tmask, cfg.ridge, self._eps)
        else:
            with torch.no_grad():
                dsd_all, spectrum = dynamic_spectral_dispersion(
                    koopman_operator(feats, tmask, cfg.ridge), cfg.spectrum, self._eps
                )
        if self.xi is None:
            self._calibrate_xi(dsd_all)
        dsd = dsd_all
        push = ((a > 0) & (dsd_all <= self.xi)).nonzero().squeeze(1)
        if cfg.alpha > 0 and push.numel() > 0 and torch.is_grad_enabled():
            sub_mask = None if tmask is None else tmask[push]
            koop = koopman_operator(feats[push], sub_mask, cfg.ridge)
            dsd_push, _ = dynamic_spectral_dispersion(koop, cfg.spectrum, self._eps)
            dsd = dsd_all.index_put((push,), dsd_push)

        gids = group_ids_of(ctx, dsd.shape[0]).to(dsd.device) if cfg.group == "prompt" else None
        l_xp, _ = exploration_loss(dsd, a, gids, self.xi)
        masked = kl_mask(a, dsd_all, self.xi)
        total = cfg.alpha * l_xp
        kl = torch.zeros((), device=dsd.device)
        if cfg.beta > 0 and bool(masked.any()):
            ref = ctx.extras.get("ref_logps")
            logps = ctx.completion_logps
            if ref is None:  # score only the masked rows with the reference; the others contribute zeros
                rows = masked.nonzero().squeeze(1)
                ref = logps.detach().clone()
                ref[rows] = self.reference.logps(ctx.trainer, ctx.inputs, rows).to(ref.dtype)
            kl = adaptive_kl(logps, ref, mask, masked)
            total = total + cfg.beta * kl

        d = dsd.detach()
        pos = a > 0
        metrics = {
            "relax/dsd_mean": float(d.mean()),
            "relax/dsd_pos_mean": float(d[pos].mean()) if bool(pos.any()) else math.nan,
            "relax/spectral_spread": float((d * pos).mean()),  # the authors' logged curve: mean DSD * 1[A>0]
            "relax/masked_frac": float(masked.float().mean()),
            "relax/loss": float(l_xp.detach()),
            "relax/kl": float(kl.detach()),
            "relax/xi": float(self.xi),
        }
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            self._record(step, ctx, d, spectrum.detach(), adv, a, lengths, masked, gids)
        self.micro += 1
        return LossTerm(total, metrics)

    def on_step_end(self, trainer: Any) -> None:
        step = int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)
        if self.cfg.flush_every <= 1 or step % self.cfg.flush_every == 0:
            self.flush()

    def on_train_end(self, trainer: Any) -> None:
        self.flush()

    # ---- dictionary --------------------------------------------------------------------------------

    def _dict_path(self):
        return self.run.writer.path(DICT_FILE) if self.run is not None and self.run.writer else None

    def _load_dictionary(self) -> None:
        path = self._dict_path()
        if path is None or not path.exists():
            return
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            self.weight = fh.get_tensor("W").float()
        self.fit_step = int(meta.get("fit_step", 0))
        if self.cfg.xi is None and meta.get("xi") not in (None, "None"):
            self.xi = float(meta["xi"])

    def _rollout_states(self, ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached completion states of this rank's whole rollout batch (one no-grad pass over TRL's
        buffered micro-batches), or of the current micro-batch when the trainer buffers none."""
        cap = self.cfg.dict_max_positions
        batches = getattr(ctx.trainer, "_buffered_inputs", None)
        if not batches or not isinstance(batches, list) or "prompt_ids" not in batches[0]:
            return ctx.completion_hidden.detach()[:, :cap], ctx.completion_mask.detach()[:, :cap]
        backbone = backbone_of(unwrap_policy(ctx.trainer.model))
        states, masks = [], []
        with torch.no_grad():
            for b in batches:
                p = b["prompt_ids"].shape[1]
                ids = torch.cat([b["prompt_ids"], b["completion_ids"][:, :cap]], 1)
                att = torch.cat([b["prompt_mask"], b["completion_mask"][:, :cap]], 1)
                out = backbone(input_ids=ids, attention_mask=att)
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                t = ids.shape[1] - p
                states.append(h[:, p - 1 : p - 1 + t].float())
                masks.append(b["completion_mask"][:, :cap].float())
        width = max(s.shape[1] for s in states)
        states = [torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[1])) for s in states]
        masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
        return torch.cat(states), torch.cat(masks)

    def _fit(self, ctx: LossContext, step: int) -> None:
        """Fit (or refit, from the current W) on this rollout batch's states gathered from every rank."""
        import time

        cfg = self.cfg
        local_h, local_m = self._rollout_states(ctx)
        gathered = gather_states(local_h.float(), local_m.float())
        device = ctx.completion_hidden.device
        d = ctx.completion_hidden.shape[-1]
        if gathered is not None:  # rank 0 (or a single process)
            hidden, mask = usable_trajectories(gathered[0].cpu(), gathered[1].cpu(), cfg.dict_max_positions)
            start = (
                self.weight.detach().cpu().float()
                if self.weight is not None
                else init_dictionary(cfg.dict_size, d, cfg.dict_seed)
            )
            t0 = time.perf_counter()
            before = dataset_loss(start, hidden, mask, cfg.ridge, cfg.dict_batch_size)
            weight, losses = fit_dictionary(
                hidden,
                mask,
                dict_size=cfg.dict_size,
                ridge=cfg.ridge,
                lr=cfg.dict_lr,
                batch_size=cfg.dict_batch_size,
                epochs=cfg.dict_epochs,
                steps=cfg.dict_steps,
                max_positions=cfg.dict_max_positions,
                seed=cfg.dict_seed + max(step, 0),
                init=start,
            )
            after = dataset_loss(weight, hidden, mask, cfg.ridge, cfg.dict_batch_size)
            self.fits.append(
                {
                    "fit_step": step,
                    "n_trajectories": int(hidden.shape[0]),
                    "world_size": int(torch.distributed.get_world_size()) if _dist() else 1,
                    "adam_steps": len(losses),
                    "lr": float(cfg.dict_lr),
                    "loss_before": before,
                    "loss_after": after,
                    "weight_change": float((weight - start).norm() / start.norm().clamp_min(1e-30)),
                    "seconds": time.perf_counter() - t0,
                    "losses": losses,
                }
            )
            weight = weight.to(device)
        else:
            weight = torch.empty(cfg.dict_size, d, device=device)
        if _dist():
            torch.distributed.broadcast(weight, src=0)
        self.weight = weight.detach().float()
        self.fit_step = step
        if self.xi is not None:  # xi is calibrated once, on the first fit, and then kept (authors: fixed)
            self._save_dictionary()

    def _calibrate_xi(self, dsd: torch.Tensor) -> None:
        """xi = xi_scale * median DSD of this first batch (rank 0's value, broadcast)."""
        med = torch.tensor([float(dsd.median())], device=dsd.device)
        if _dist():
            torch.distributed.broadcast(med, src=0)
        self.xi_median = float(med.item())
        self.xi = self.xi_median * self.cfg.xi_scale
        self._save_dictionary()

    def _save_dictionary(self) -> None:
        if self.run is None or self.run.writer is None or self.run.rank != 0:
            return
        self.run.writer.write(
            dumps.RELAX_DICTIONARY,
            {"W": self.weight.cpu()},
            metadata={"fit_step": str(self.fit_step), "xi": str(self.xi)},
        )
        self.run.writer.write(
            dumps.RELAX_DICTIONARY_FIT,
            {"xi": self.xi, "xi_median": self.xi_median, "fits": self.fits},
        )

    def _max_len(self, ctx: LossContext) -> int:
        if self.cfg.max_completion_length:
            return int(self.cfg.max_completion_length)
        args = getattr(ctx.trainer, "args", None)
        return int(getattr(args, "max_completion_length", None) or ctx.completion_len)

    # ---- dumps -------------------------------------------------------------------------------------

    def _record(self, step, ctx, dsd, spectrum, adv, a, lengths, masked, gids) -> None:
        gids = group_ids_of(ctx, dsd.shape[0]) if gids is None else gids
        n = dsd.shape[0]
        sids = ctx.extras.get("sample_ids")
        cols = {
            "step": [step + 1] * n,
            "micro_step": [self.micro] * n,
            "index": list(range(n)),
            "sample_id": sids.tolist() if sids is not None else [-1] * n,  # joins diagnostics/rollouts
            "group_id": gids.tolist(),
            "advantage": adv.tolist(),
            "a": a.tolist(),
            "length": lengths.long().tolist(),
            "dsd": dsd.tolist(),
            "masked": masked.tolist(),
            "xi": [float(self.xi)] * n,
        }
        self.rows.extend(dict(zip(cols, vals)) for vals in zip(*cols.values()))
        values = spectrum.float().cpu()
        self.summaries.append(self._summary(step + 1, self.micro, values))
        if self._full_step(step + 1):
            self.spectra.append({"step": step + 1, "micro_step": self.micro, "values": values})

    def _full_step(self, step: int) -> bool:
        """Whether the full spectra of (1-based) `step` are kept: step 1 and every `full_spectra_every` steps."""
        every = int(self.cfg.full_spectra_every)
        return every > 0 and (step == 1 or step % every == 0)

    @staticmethod
    def _summary(step: int, micro_step: int, values: torch.Tensor) -> dict[str, Any]:
        """fp16 quantiles (SUMMARY_LEVELS) and mean over the micro-batch's trajectories of each sorted |s_j|."""
        sv = values.abs().sort(dim=1, descending=True).values.double()
        levels = torch.tensor(SUMMARY_LEVELS, dtype=torch.float64)
        return {
            "step": step,
            "micro_step": micro_step,
            "n": int(sv.shape[0]),
            "quantiles": torch.quantile(sv, levels, dim=0).to(torch.float16),  # (Q, m)
            "mean": sv.mean(0).to(torch.float16),  # (m,)
        }

    def flush(self) -> None:
        """Write the buffered per-trajectory rows, spectrum summaries and full spectra as shards now (checkpoints
        call this)."""
        rows, spectra, summaries = self.rows, self.spectra, self.summaries
        self.rows, self.spectra, self.summaries = [], [], []
        if not rows or self.run is None or self.run.writer is None:
            return
        step = rows[-1]["step"]  # a shard holds the recorded steps since the last flush, up to this one
        w = self.run.writer
        w.write(dumps.RELAX_TRAJECTORIES, rows, step=step)
        meta = {"step": str(step), "spectrum": self.cfg.spectrum}
        if summaries:
            m = max(r["mean"].shape[0] for r in summaries)
            pad = lambda t: torch.nn.functional.pad(t, (0, m - t.shape[-1]), value=float("nan"))  # noqa: E731
            w.write(
                dumps.RELAX_SPECTRA_SUMMARY,
                {
                    "step": torch.tensor([r["step"] for r in summaries]),
                    "micro_step": torch.tensor([r["micro_step"] for r in summaries]),
                    "n": torch.tensor([r["n"] for r in summaries]),
                    "levels": torch.tensor(SUMMARY_LEVELS, dtype=torch.float32),
                    "quantiles": torch.stack([pad(r["quantiles"]) for r in summaries]),
                    "mean": torch.stack([pad(r["mean"]) for r in summaries]),
                },
                step=step,
                metadata={**meta, "levels": ",".join(map(str, SUMMARY_LEVELS))},
            )
        if spectra:
            keep = {(r["step"], r["micro_step"]) for r in spectra}
            full = [r for r in rows if (r["step"], r["micro_step"]) in keep]
            w.write(
                dumps.RELAX_SPECTRA,
                {
                    "singular_values": torch.cat([r["values"] for r in spectra]),
                    "step": torch.tensor([r["step"] for r in full]),
                    "micro_step": torch.tensor([r["micro_step"] for r in full]),
                    "index": torch.tensor([r["index"] for r in full]),
                    "dsd": torch.tensor([r["dsd"] for r in full]),
                },
                step=step,
                metadata=meta,
            )
