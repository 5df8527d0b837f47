"""A run: its resolved config, its directory (decided once, on rank 0) and its diagnostics writer."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlx import checkpoint as ckpt
from rlx.errors import UserError
from rlx.instruments.base import Instrument, InstrumentSet
from rlx.instruments.catalog import registered_instruments
from rlx.storage import DiagnosticsWriter
from rlx.trainers.catalog import trainer_names, trainer_spec


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
    """`output_dir` if given, else runs/<recipe>/<timestamp>; chosen on rank 0 and broadcast to all ranks.

    Creates nothing: the directory is claimed (`claim_run_dir`) only once the trainer has been built.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    chosen = [None]
    if state.is_main_process:
        resume = cfg.trainer.get("resume_from_checkpoint")
        if cfg.output_dir:
            chosen[0] = str(Path(cfg.output_dir).absolute())
        elif isinstance(resume, str) and resume.lower() not in ("true", "false", "latest", ""):
            chosen[0] = str(Path(resume).absolute().parent)  # a checkpoint path names its run
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            chosen[0] = str(Path("runs", cfg.recipe or "run", stamp).absolute())
    if state.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    run_dir = Path(chosen[0])
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"output_dir {run_dir} is a file, not a directory. Choose a directory path for the run."
        )
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        raise UserError(
            f"output_dir {run_dir} cannot be written: {existing} is read-only for this user. "
            "Choose an output_dir on a writable file system."
        )
    return run_dir


def check_run_dir(cfg: Any, run_dir: Path) -> Path | None:
    """Refuse a directory another live run holds or a finished/killed run's directory (unless resuming it).

    Returns the checkpoint to resume from, or None. Reads only; checked on every rank (shared file system).
    """
    holder = ckpt.lock_holder(run_dir)
    if holder is not None:
        raise UserError(
            f"output_dir {run_dir} is in use by another rlx run: {ckpt.describe_holder(holder)}. "
            "Wait for it to finish, or choose another output_dir."
        )
    resume = ckpt.resolve_resume(cfg.trainer.get("resume_from_checkpoint"), run_dir)
    if (run_dir / "final").exists():
        raise UserError(
            f"output_dir {run_dir} holds a finished run (final/ exists); rlx never appends to or overwrites it. "
            "Choose a new output_dir (or omit it for runs/<recipe>/<timestamp>)."
        )
    if resume is None:
        previous = [
            name for name in ("metrics.jsonl", "run_info.json", ckpt.LOCK_NAME) if (run_dir / name).exists()
        ]
        if previous:
            done = ckpt.complete_checkpoints(run_dir)
            hint = (
                f"It stopped after its checkpoint at step {done[-1][0]}: continue it with "
                "trainer.resume_from_checkpoint=true, or choose a new output_dir."
                if done
                else "It has no complete checkpoint. Choose a new output_dir, or delete that one."
            )
            raise UserError(
                f"output_dir {run_dir} already holds a run that did not finish ({', '.join(previous)}). {hint}"
            )
        if (run_dir / "config.yaml").exists():
            raise UserError(
                f"{run_dir / 'config.yaml'} exists and rlx did not write it for this run; rlx never overwrites it. "
                "Move it away, or choose another output_dir."
            )
    return resume


# Keys a resumed run may change: where to resume from, and how long to train.
_RESUMABLE_CHANGES = {
    "trainer.resume_from_checkpoint",
    "trainer.max_steps",
    "trainer.num_train_epochs",
    "output_dir",
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def claim_run_dir(cfg: Any, run_dir: Path, resume: Path | None) -> Iterator[None]:
    """Create (or re-enter) the run directory, hold its lock for the run, write or check config.yaml.

    On resume, `metrics.jsonl` and `diagnostics/` are put back as they were at the checkpoint, so steps after it
    are written once. Rank 0 does the file work; every rank waits for it.
    """
    from accelerate import PartialState

    state = PartialState()
    lock = contextlib.nullcontext()
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = ckpt.run_lock(run_dir)
    with lock:
        if state.is_main_process:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            saved = run_dir / "config.yaml"
            if resume is None:
                if saved.exists():
                    raise UserError(
                        f"{saved} exists and rlx did not write it for this run; move it away first."
                    )
                _write_atomic(saved, OmegaConf.to_yaml(cfg))
            else:
                before = (
                    _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
                    if saved.exists()
                    else {}
                )
                now = _flat(resolved)
                changed = sorted(
                    k for k in set(before) & set(now) if before[k] != now[k] and k not in _RESUMABLE_CHANGES
                )
                if before and changed:
                    raise UserError(
                        f"cannot resume {run_dir} with a different config: {', '.join(changed[:8])} differ from its "
                        "config.yaml. A resumed run is the same run; only trainer.max_steps / num_train_epochs may "
                        "change."
                    )
                added = sorted(set(now) - set(before) - _RESUMABLE_CHANGES) if before else []
                if added:  # keys a newer rlx added since the run started: their defaults apply from here on
                    print(
                        f"note: config keys new since this run started (defaults used): {', '.join(added[:8])}"
                    )
                dropped = ckpt.restore_run_files(run_dir, resume)
                print(
                    f"resuming {run_dir} from {resume.name} (step {ckpt.read_marker(resume)['step']}); "
                    f"{dropped} metrics rows written after it were discarded",
                    flush=True,
                )
        state.wait_for_everyone()
        yield
    state.wait_for_everyone()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_dependencies(cfg: Any) -> None:
    """Every package the run will import later (loggers, DeepSpeed), checked before anything is written."""
    import importlib.util

    report_to = cfg.trainer.get("report_to", ["tensorboard"])
    report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
    packages = {
        "wandb": "wandb",
        "tensorboard": "tensorboard",
        "mlflow": "mlflow",
        "comet_ml": "comet_ml",
        "trackio": "trackio",
        "clearml": "clearml",
        "swanlab": "swanlab",
    }
    for name in report_to:
        if name in ("none", "all"):
            continue
        pkg = packages.get(name, name)
        if importlib.util.find_spec(pkg) is None and not (
            name == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            extra = " (or pip install 'rlx[wandb]')" if name == "wandb" else ""
            raise UserError(
                f"trainer.report_to includes {name!r} but the {pkg} package is not installed. "
                f"pip install {pkg}{extra}, or drop it from trainer.report_to."
            )
    if (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and importlib.util.find_spec("deepspeed") is None
    ):
        raise UserError(
            "this launch uses DeepSpeed but the deepspeed package is not installed: pip install deepspeed."
        )
    if cfg.trainer.get("use_vllm", False) and importlib.util.find_spec("vllm") is None:
        raise UserError(
            "trainer.use_vllm=true but vLLM is not installed: pip install 'rlx[vllm]' (GPU nodes), "
            "or set trainer.use_vllm=false to generate with HF generate."
        )


def check_trainer_numbers(cfg: Any) -> None:
    """Values TRL/HF accept silently or fail on deep inside (a batch of 0, max_steps=-5)."""
    t = cfg.trainer
    max_steps = t.get("max_steps", -1)
    if max_steps is not None and (int(max_steps) == 0 or int(max_steps) < -1):
        raise UserError(
            f"trainer.max_steps={max_steps}: expected a number of optimizer steps > 0, or -1 to train for "
            "trainer.num_train_epochs epochs."
        )
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        v = t.get(key)
        if v is not None and int(v) < 1:
            raise UserError(f"trainer.{key}={v}: expected an integer >= 1.")
    every = cfg.eval.get("every", 0)
    if every is None or int(every) < 0:
        raise UserError(f"eval.every={every}: expected 0 (off) or a number of optimizer steps >= 1.")
    from rlx.tasks import task_class

    if int(every) > 0 and not task_class(cfg.task.name).verifiable:
        raise UserError(
            f"eval.every needs a verifiable task (held-out answers to score); {cfg.task.name} has none. Set eval.every=0."
        )
    check_eval_replay(cfg)
    ro = cfg.diagnostics.rollouts
    if not 0.0 < float(ro.fraction) <= 1.0 or int(ro.every) < 1:
        raise UserError(
            f"diagnostics.rollouts: fraction={ro.fraction}, every={ro.every}: expected 0 < fraction <= 1 and "
            "every >= 1 (diagnostics.rollouts.enabled=false turns the dumps off)."
        )
    strategy = str(t.get("eval_strategy", "no") or "no")
    if strategy not in ("no", "NO") and not trainer_spec(cfg.algo).hf_eval_dataset:
        with_eval = [n for n in trainer_names() if trainer_spec(n).hf_eval_dataset]
        raise UserError(
            f"trainer.eval_strategy={strategy}: HF's loss evaluation needs an eval dataset, which rlx passes only "
            f"to {', '.join(with_eval)} (held-out pairs), not to {cfg.algo}. Use eval.every=N for held-out accuracy "
            "and pass@k during training."
        )
    for key in ("save_steps", "logging_steps"):
        v = t.get(key)
        if v is not None and float(v) <= 0:
            raise UserError(
                f"trainer.{key}={v}: expected a number > 0 (steps, or a fraction of the run if < 1)."
            )


def check_eval_replay(cfg: Any) -> None:
    """`eval.replay`: a known mode, only with eval.every, not under FSDP."""
    from rlx.replay import MODES, normalise_mode

    mode = normalise_mode(cfg.eval.get("replay", "off"))
    if mode not in MODES:
        raise UserError(f"eval.replay={mode!r}: expected one of {', '.join(MODES)}.")
    if mode == "off":
        return
    if int(cfg.eval.get("every", 0) or 0) == 0:
        raise UserError(
            f"eval.replay={mode} runs inside the in-training evaluation: set eval.every=N as well (or evaluate "
            f"a saved model with `python rlx/evaluate.py run_dir=RUN replay={mode}`)."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or cfg.trainer.get("fsdp"):
        raise UserError(
            f"eval.replay={mode} does not run under FSDP: the replay's partial forwards (and, for learnable, "
            "backwards) on the sharded policy cannot keep the ranks in lockstep. Launch with DDP or DeepSpeed, or "
            f"evaluate saved checkpoints with `python rlx/evaluate.py run_dir=RUN replay={mode}`."
        )


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
    defaults = trainer_spec(cfg.algo).default_instruments  # on in every run of the algorithm
    unknown = sorted(set(defaults) - {n for n, c in registry.items() if not c.changes_loss})
    if unknown:
        raise ValueError(f"algo {cfg.algo}'s default_instruments name no diagnostic instrument: {unknown}")
    for name in sorted(n for n, c in registry.items() if not c.changes_loss):
        inst_cls = registry[name]
        section = getattr(cfg.diagnostics, name, None)
        if name in defaults or (section is not None and getattr(section, "enabled", False)):
            chosen.append(inst_cls(section, run))
    return InstrumentSet(chosen)
