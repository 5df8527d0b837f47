"""The Activation Replay finding as a command: how far RL moved logit-lens distributions, by base entropy.

For a (base, RL) pair and a prompt set, at every input position t and decoder layer l (layer outputs):

    p_l(t) = softmax(W_U · RMSNorm_final(h_l(t)))      with each model's own norm and LM head
    H_l(t) = entropy of p_l^base(t);   shift_l(t) = KL(p_l^base(t) ‖ p_l^rl(t))   (full vocabulary, nats)

Positions are bucketed by H_l(t) and the mean shift is reported per layer and bucket (Xing et al., arXiv
2511.19972, §3: low-entropy positions shift most). Bucketing: `relative` (default) uses
H_l(t) / max_t' H_l(t') within the prompt, edges 0, .2, .4, .6, .8, 1 — the bucket under rho = 0.4 is exactly
what learnable replay selects; `quantile` uses per-layer quantiles; `absolute` uses `edges` in nats.

    python -m rlx.replay.analysis run_dir=runs/grpo_tiny/DIR           # rl = DIR/final, base from run_info.json
    python -m rlx.replay.analysis base=PATH rl=PATH task.name=arithmetic out=DIR

Writes, through `DiagnosticsWriter` (registered in `<dir>/diagnostics/manifest.jsonl`):
`replay_kl_buckets.parquet` (`rlx.dumps.REPLAY_KL_BUCKETS`, instrument `activation_replay`, read by
analysis.measures.activation_shift) and `replay_kl_positions.parquet` (`rlx.dumps.REPLAY_KL_POSITIONS`, one
row per position and layer). Both are standalone dumps: `analysis.loader.Run` opens an `out=DIR` that holds
only them. Schema: docs/activation_replay.md.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlx import dumps
from rlx.errors import UserError, exit_on_user_error
from rlx.replay.hooks import decoder_parts
from rlx.replay.logit_lens import kl_entropies, rms_norm
from rlx.replay.streams import eligible_positions, layer_streams

SCHEMA_VERSION = dumps.REPLAY_KL_BUCKETS.version
INSTRUMENT = dumps.REPLAY_KL_BUCKETS.instrument


@dataclass
class KLAnalysisConfig:
    """Options of `python -m rlx.replay.analysis key=value ...`."""

    base: str | None = None
    """Base (pre-RL) model directory; default with run_dir: run_info.json's base_model."""
    rl: str | None = None
    """RL model directory; default with run_dir: <run_dir>/final."""
    run_dir: str | None = None
    """A training run: models, prompts (its task's held-out split) and output location default from it."""
    out: str | None = None
    """Directory to write diagnostics/ under (default: the run_dir, or runs/replay_kl/<base>_vs_<rl> without one)."""
    task: dict[str, Any] = field(default_factory=dict)
    """Task overrides (`task.name=countdown`); prompts are its held-out split. Default: the run's task."""
    prompts: str | None = None
    """A .jsonl (field `prompt`) or .txt (one prompt per line) file instead of the task's prompts."""
    num_prompts: int = 64
    """Prompts to analyse."""
    batch_size: int = 16
    """Prompts per forward."""
    positions: str = "auto"
    """auto | prompt | visual | all (see replay.positions); auto = prompt tokens minus special tokens."""
    bucketing: str = "relative"
    """relative (H / per-prompt max) | quantile (per-layer quantiles) | absolute (edges in nats)."""
    num_buckets: int = 5
    """Buckets for relative/quantile bucketing."""
    edges: list[float] = field(default_factory=list)
    """absolute: bucket edges in nats (e.g. [0, 1, 2, 3]); the last bucket is open-ended."""
    rho: float = 0.4
    """Marks positions with H <= rho * max as `selected` (what learnable replay would use)."""
    fp32: bool = True
    """Logit lens in float32."""
    chunk: int = 16384
    """Vocabulary chunk for the full-vocabulary KL."""
    dtype: str = "float32"
    """Model dtype (float32 | bfloat16)."""


def _parse(argv: list[str]) -> KLAnalysisConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(KLAnalysisConfig)
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"cannot parse argument '{arg}': expected key=value (e.g. base=PATH rl=PATH).")
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([arg]))
        except OmegaConfBaseException as e:
            keys = ", ".join(KLAnalysisConfig.__dataclass_fields__)
            raise UserError(f"bad argument '{arg}': {e}. Valid keys: {keys}.") from None
    return OmegaConf.to_object(base)


def _resolve(cfg: KLAnalysisConfig) -> tuple[str, str, Any, Path]:
    """(base path, rl path, task config or None, output dir)."""
    run_cfg = None
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        info_path = run_dir / "run_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        cfg.rl = cfg.rl or info.get("final_model") or str(run_dir / "final")
        cfg.base = cfg.base or info.get("base_model")
        if (run_dir / "config.yaml").exists():
            from omegaconf import OmegaConf

            from rlx.config.schema import RunConfig

            run_cfg = OmegaConf.merge(
                OmegaConf.structured(RunConfig), OmegaConf.load(run_dir / "config.yaml")
            )
    if not cfg.base or not cfg.rl:
        raise UserError(
            "the analysis needs both models: give base=PATH rl=PATH, or run_dir=DIR of a training run "
            "(rl = DIR/final, base = run_info.json's base_model)."
        )
    for p in (cfg.base, cfg.rl):
        if not Path(p).exists():
            raise UserError(f"model directory {p!r} does not exist; pass a local HF-format model directory.")
    task_cfg = None
    if cfg.prompts is None:
        from omegaconf import OmegaConf

        from rlx.config.schema import TaskConfig

        task_cfg = run_cfg.task if run_cfg is not None else OmegaConf.structured(TaskConfig)
        task_cfg = OmegaConf.merge(task_cfg, cfg.task)
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.run_dir:
        out = Path(cfg.run_dir)
    else:
        out = Path("runs", "replay_kl", f"{Path(cfg.base).name}_vs_{Path(cfg.rl).name}")
    return cfg.base, cfg.rl, task_cfg, out


def _load_prompts(cfg: KLAnalysisConfig, task_cfg: Any) -> list[Any]:
    if cfg.prompts is not None:
        path = Path(cfg.prompts)
        if not path.exists():
            raise UserError(f"prompts file {path} not found; give a .jsonl (field `prompt`) or .txt file.")
        if path.suffix == ".jsonl":
            prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        else:
            prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        from rlx.tasks import get_task

        prompts = list(get_task(task_cfg).eval_dataset()["prompt"])
    return prompts[: cfg.num_prompts]


@torch.no_grad()
def position_shift(
    base: torch.nn.Module,
    rl: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eligible: torch.Tensor,
    fp32: bool = True,
    chunk: int = 16384,
) -> list[dict[str, torch.Tensor]]:
    """Per layer l (outputs of decoder layer l): rows, cols of eligible positions and their base/RL entropy,
    KL(base‖RL) and top-1 agreement, all (N,)."""
    pb, pr = decoder_parts(base), decoder_parts(rl)
    layers = range(pb.depth)
    _, hb = layer_streams(base, input_ids, attention_mask, outputs=layers)
    _, hr = layer_streams(rl, input_ids, attention_mask, outputs=layers)
    rows, cols = eligible.nonzero(as_tuple=True)
    out = []
    for layer in layers:
        xb = rms_norm(pb.norm, hb[layer][rows, cols], fp32)
        xr = rms_norm(pr.norm, hr[layer][rows, cols], fp32)
        stats = kl_entropies(xb, pb.head, xr, pr.head, chunk)
        out.append({"rows": rows, "cols": cols, **stats})
    return out


def _bucket(df, cfg: KLAnalysisConfig):
    import numpy as np
    import pandas as pd

    if cfg.bucketing == "relative":
        edges = np.linspace(0.0, 1.0, cfg.num_buckets + 1)
        b = np.clip(
            np.searchsorted(edges, df["relative_entropy"].to_numpy(), side="right") - 1,
            0,
            cfg.num_buckets - 1,
        )
        df["bucket"] = b
        df["bucket_lo"], df["bucket_hi"] = edges[b], edges[b + 1]
    elif cfg.bucketing == "quantile":
        df["bucket"] = (
            df.groupby("layer")["base_entropy"]
            .transform(lambda s: pd.qcut(s.rank(method="first"), cfg.num_buckets, labels=False))
            .astype(int)
        )
        g = df.groupby(["layer", "bucket"])["base_entropy"]
        df["bucket_lo"], df["bucket_hi"] = g.transform("min"), g.transform("max")
    elif cfg.bucketing == "absolute":
        if not cfg.edges:
            raise UserError("bucketing=absolute needs edges=[e0,e1,...] in nats, e.g. edges=[0,1,2,3].")
        edges = np.asarray(list(cfg.edges) + [np.inf], dtype=float)
        b = np.clip(
            np.searchsorted(edges, df["base_entropy"].to_numpy(), side="right") - 1, 0, len(edges) - 2
        )
        df["bucket"] = b
        df["bucket_lo"], df["bucket_hi"] = edges[b], edges[b + 1]
    else:
        raise UserError(f"bucketing={cfg.bucketing!r}: expected relative, quantile or absolute.")
    return df


def bucket_table(positions, cfg: KLAnalysisConfig, base_name: str, rl_name: str):
    """Aggregate the per-position table: one row per (layer, bucket), plus layer = -1 for all layers."""
    import pandas as pd

    def agg(frame: pd.DataFrame, layer: int) -> list[dict[str, Any]]:
        rows = []
        for bucket, g in frame.groupby("bucket"):
            n = len(g)
            rows.append(
                {
                    "schema_version": SCHEMA_VERSION,
                    "layer": layer,
                    "bucket": int(bucket),
                    "bucketing": cfg.bucketing,
                    "bucket_lo": float(g["bucket_lo"].min()),
                    "bucket_hi": float(g["bucket_hi"].max()),
                    "entropy_lo": float(g["base_entropy"].min()),
                    "entropy_hi": float(g["base_entropy"].max()),
                    "n_positions": n,
                    "kl_mean": float(g["kl"].mean()),
                    "kl_sem": float(g["kl"].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                    "base_entropy_mean": float(g["base_entropy"].mean()),
                    "top1_agree": float(g["top1_agree"].mean()),
                    "base_model": base_name,
                    "rl_model": rl_name,
                }
            )
        return rows

    rows = []
    for layer, g in positions.groupby("layer"):
        rows += agg(g, int(layer))
    if cfg.bucketing != "quantile":  # quantile buckets are per-layer, pooling them would mix ranges
        rows += agg(positions, -1)
    return pd.DataFrame(rows)


def format_table(table) -> str:
    """Layers as rows, buckets as columns: mean KL(base‖RL) in nats; last row: positions x layers per bucket."""
    buckets = sorted(table["bucket"].unique())
    quantile = table.bucketing.iloc[0] == "quantile"
    head = {b: table[table.bucket == b].iloc[0] for b in buckets}
    labels = [f"q{b}" if quantile else f"[{head[b].bucket_lo:.2g},{head[b].bucket_hi:.2g}]" for b in buckets]
    what = "per-layer quantile" if quantile else f"{table.bucketing.iloc[0]} entropy"
    lines = [f"mean KL(base || RL) of logit-lens distributions at input positions, by base {what} bucket"]
    lines.append(f"{'layer':>6} " + " ".join(f"{lab:>13}" for lab in labels))
    for layer in sorted(table["layer"].unique(), key=lambda x: (x < 0, x)):
        t = table[table.layer == layer].set_index("bucket")
        cells = [f"{t.loc[b, 'kl_mean']:13.4g}" if b in t.index else f"{'-':>13}" for b in buckets]
        lines.append(f"{'all' if layer < 0 else layer:>6} " + " ".join(cells))
    n = table[table.layer >= 0].groupby("bucket")["n_positions"].sum()
    lines.append(
        f"{'n':>6} " + " ".join(f"{int(n.get(b, 0)):13d}" for b in buckets) + "  (positions x layers)"
    )
    return "\n".join(lines)


def run_analysis(cfg: KLAnalysisConfig, loaded: tuple[Any, Any, Any] | None = None) -> tuple[Any, Any, Path]:
    """Run the analysis; returns (position table, bucket table, diagnostics dir).

    `loaded` = (base model, RL model, tokenizer) skips loading (then base/rl only name the pair).
    """
    import pandas as pd

    from rlx.generation import left_pad, prompt_token_ids
    from rlx.storage import DiagnosticsWriter

    if loaded is None:
        from rlx.models import load_causal_lm, load_tokenizer_for

        base_path, rl_path, task_cfg, out_dir = _resolve(cfg)
        if cfg.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype={cfg.dtype!r}: expected float32 or bfloat16.")
        dtype = getattr(torch, cfg.dtype)
        tok = load_tokenizer_for(rl_path)
        base = load_causal_lm(base_path, dtype=dtype).eval()
        rl = load_causal_lm(rl_path, dtype=dtype).eval()
    else:
        base, rl, tok = loaded
        base_path, rl_path, task_cfg = cfg.base or "base", cfg.rl or "rl", None
        out_dir = Path(cfg.out or cfg.run_dir or ".")
    prompts = _load_prompts(cfg, task_cfg)
    if not prompts:
        raise UserError("no prompts to analyse; check prompts= or the task's held-out split.")
    ids_all = prompt_token_ids(tok, prompts)
    special = tuple(getattr(tok, "all_special_ids", ()) or ())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    records = []
    for start in range(0, len(ids_all), cfg.batch_size):
        ids, mask = left_pad(ids_all[start : start + cfg.batch_size], pad)
        eligible = eligible_positions(rl, ids, mask, cfg.positions, "learnable", special, True)
        for layer, st in enumerate(position_shift(base, rl, ids, mask, eligible, cfg.fp32, cfg.chunk)):
            rows = st["rows"]
            hmax = torch.full((ids.shape[0],), -torch.inf).scatter_reduce(0, rows, st["entropy_p"], "amax")
            rel = st["entropy_p"] / hmax[rows].clamp_min(1e-12)
            records.append(
                pd.DataFrame(
                    {
                        "prompt_index": (rows + start).numpy(),
                        "position": (st["cols"] - (ids.shape[1] - mask.sum(1))[rows]).numpy(),
                        "token_id": ids[rows, st["cols"]].numpy(),
                        "layer": layer,
                        "base_entropy": st["entropy_p"].numpy(),
                        "rl_entropy": st["entropy_q"].numpy(),
                        "relative_entropy": rel.numpy(),
                        "kl": st["kl"].numpy(),
                        "top1_agree": st["top1_agree"].numpy(),
                        "selected": (st["entropy_p"] <= cfg.rho * hmax[rows]).numpy(),
                    }
                )
            )
    positions = _bucket(pd.concat(records, ignore_index=True), cfg)
    positions.insert(0, "schema_version", SCHEMA_VERSION)
    table = bucket_table(positions, cfg, str(base_path), str(rl_path))
    writer = DiagnosticsWriter(out_dir)
    writer.write(dumps.REPLAY_KL_BUCKETS, table)
    writer.write(dumps.REPLAY_KL_POSITIONS, positions)
    return positions, table, writer.dir


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    cfg = _parse(sys.argv[1:] if argv is None else argv)
    positions, table, out = run_analysis(cfg)
    print(format_table(table))
    sel = positions["selected"]
    print(
        f"\nselected (H <= {cfg.rho} * max) mean KL {positions.loc[sel, 'kl'].mean():.4g} over {int(sel.sum())} "
        f"position-layers; others {positions.loc[~sel, 'kl'].mean():.4g} over {int((~sel).sum())}"
    )
    print(f"wrote {out}/replay_kl_buckets.parquet and replay_kl_positions.parquet")
    return out


if __name__ == "__main__":
    main()
