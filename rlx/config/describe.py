"""A config as text: the recipe list, `rlx train --help`, and the trainer arguments `print_config=true` shows.

Used by `rlx/cli.py` (the `rlx` command) and `rlx/train.py` (`python rlx/train.py --help | print_config=true`),
neither of which the other needs to import for it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Any


def recipes_text() -> str:
    from rlx.config.loader import RECIPES_DIR, available_recipes, recipe_summary

    names = available_recipes()
    width = max(map(len, names), default=0)
    lines = [f"  {n:<{width}}  {recipe_summary(n)}" for n in names]
    return f"recipes ({RECIPES_DIR}):\n" + "\n".join(lines)


def configs_text() -> str:
    from rlx.config.loader import ACCELERATE_CONFIGS_DIR

    paths = sorted(ACCELERATE_CONFIGS_DIR.glob("*.yaml"))
    return "accelerate configs (accelerate launch --config_file PATH -m rlx.train recipe=...):\n" + "\n".join(
        f"  {p}" for p in paths
    )


def train_help() -> str:
    return f"""usage: rlx train [recipe=NAME] [key.sub=value ...]
       python -m rlx.train ... | python rlx/train.py ... | accelerate launch [--config_file PATH] -m rlx.train ...

Trains one recipe (default grpo_tiny) with any key=value overrides on top, e.g.
  rlx train recipe=grpo_tiny trainer.max_steps=50 trainer.learning_rate=1e-5 seed=1 output_dir=runs/try

Every key, with its value for this recipe, and the arguments the TRL trainer receives:
  rlx train recipe=NAME print_config=true
Each key is documented in rlx/config/schema.py; trainer.* are the fields of TRL's GRPOConfig, DPOConfig,
SFTConfig (or rlx's PPOConfig) for the recipe's algo. A recipe=path/to/file.yaml works too.

{recipes_text()}"""


def _plain(value: Any) -> Any:
    """A trainer-argument value as YAML can print it (enums by value, library objects by str)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def effective_trainer_args(cfg) -> tuple[str, dict[str, Any]]:
    """The TRL config class for `cfg.algo` and every field of it that rlx or the recipe sets, as the trainer gets it.

    Built the way the build functions build it (rlx's defaults, the algo's defaults, then `trainer.*`), without
    creating the run directory: fields that TRL's `__post_init__` derives are read back from the built object.
    """
    from rlx.run import RunContext
    from rlx.tasks import get_task
    from rlx.trainers.catalog import trainer_spec
    from rlx.trainers.construction import default_trainer_args, make_trainer_config

    run_dir = Path(cfg.output_dir or Path("runs", cfg.recipe or "run", "<timestamp>")).absolute()
    run = RunContext(cfg=cfg, run_dir=run_dir)
    task = get_task(cfg.task)
    algo_defaults = trainer_spec(cfg.algo).trainer_defaults(task)
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    try:
        args = make_trainer_config(cfg, run, task)
    finally:  # make_trainer_config points TensorBoard at the run dir for the run it is about to start
        if saved is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = saved
    # What rlx and the recipe pass, and plain values that __post_init__ derived (e.g. generation_batch_size).
    passed = {*default_trainer_args(cfg, run), *algo_defaults}
    out = {}
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        raw = getattr(args, f.name)
        value = _plain(raw)
        derived = value != _plain(default) and value not in (None, "", [], {})
        plain = isinstance(raw, (bool, int, float, str, list, dict, enum.Enum))
        if f.name in passed or (derived and plain):
            out[f.name] = value
    return type(args).__name__, out


def trainer_args_text(cfg) -> str:
    import yaml

    cls, args = effective_trainer_args(cfg)
    header = (
        f"# trainer arguments: the {cls} the trainer receives (rlx defaults, then the recipe and overrides).\n"
        f"# Only fields that differ from TRL's defaults or that rlx sets; any {cls} field can be set as trainer.NAME.\n"
    )
    return header + yaml.safe_dump({"effective_trainer_args": args}, sort_keys=True, default_flow_style=None)
