"""A run: its resolved config, its directory (decided once, on rank 0) and its diagnostics writer."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlx.diagnostics import DiagnosticsWriter
from rlx.errors import UserError
from rlx.instruments.base import Instrument, InstrumentSet, registered_instruments


@dataclass
class RunContext:
    """Everything an instrument may need about the run it belongs to."""

    cfg: Any
    """The resolved `RunConfig`."""
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    writer: DiagnosticsWriter | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def decide_run_dir(cfg: Any) -> Path:
    """`output_dir` if given, else runs/<recipe>/<timestamp>; chosen on rank 0 and broadcast to all ranks."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    chosen = [None]
    if state.is_main_process:
        if cfg.output_dir:
            chosen[0] = str(Path(cfg.output_dir).absolute())
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            chosen[0] = str(Path("runs", cfg.recipe or "run", stamp).absolute())
    if state.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    run_dir = Path(chosen[0])
    # Checked on every rank (same answer on a shared filesystem), so all of them stop together.
    previous = [name for name in ("metrics.jsonl", "final", "run_info.json") if (run_dir / name).exists()]
    if previous:
        raise UserError(
            f"output_dir {run_dir} already holds a run ({', '.join(previous)}); rlx never appends to or overwrites "
            "a finished run. Choose a new output_dir (or omit it for runs/<recipe>/<timestamp>), or delete that one."
        )
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    state.wait_for_everyone()
    return run_dir


def make_run_context(cfg: Any, run_dir: Path) -> RunContext:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return RunContext(
        cfg=cfg, run_dir=run_dir, rank=rank, world_size=world, writer=DiagnosticsWriter(run_dir, rank, world)
    )


def build_instruments(cfg: Any, run: RunContext) -> InstrumentSet:
    """Instantiate the instruments a config switches on, in a fixed order (identical on every rank)."""
    registry = registered_instruments()
    chosen: list[Instrument] = []
    for name in cfg.regularizers.enabled:
        if name not in registry or not registry[name].changes_loss:
            known = sorted(n for n, c in registry.items() if c.changes_loss)
            raise UserError(
                f"unknown regularizer '{name}' in regularizers=[...]: expected some of {', '.join(known)}."
            )
        chosen.append(registry[name](getattr(cfg.regularizers, name, None), run))
    for name in sorted(n for n, c in registry.items() if not c.changes_loss):
        inst_cls = registry[name]
        section = getattr(cfg.diagnostics, name, None)
        if getattr(inst_cls, "always_on", None) and inst_cls.always_on(cfg):
            chosen.append(inst_cls(section, run))
        elif section is not None and getattr(section, "enabled", False):
            chosen.append(inst_cls(section, run))
    return InstrumentSet(chosen)
