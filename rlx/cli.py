"""The `rlx` command: `rlx train|eval|report|summary|final-responses|recipes|configs ...` (also `python -m rlx ...`).

Each command is the matching entry point (`rlx/train.py`, `rlx/evaluate.py`, `python -m analysis`,
`python -m rlx.alignment.final_responses`) with the same arguments; `rlx COMMAND --help` says what they are.
"""

from __future__ import annotations

import difflib
import os
import sys

from rlx._entry import prepare_process
from rlx.config.describe import configs_text, recipes_text
from rlx.errors import UserError, exit_on_user_error

COMMANDS = {
    "train": "train a recipe: rlx train recipe=NAME key.sub=value ...",
    "eval": "evaluate a policy: rlx eval run_dir=DIR | model=PATH task=NAME output=DIR ...",
    "report": "one HTML report comparing runs: rlx report RUN_DIR [RUN_DIR ...] --out report.html",
    "summary": "a text summary of one run: rlx summary RUN_DIR",
    "final-responses": "final model's greedy held-out responses (alignment D'): rlx final-responses RUN_DIR [n=256]",
    "recipes": "list the recipes, one line each",
    "configs": "list the accelerate configs shipped with rlx (for accelerate launch --config_file)",
}


def eval_help() -> str:
    import rlx.evaluate

    return "usage: rlx eval run_dir=DIR | model=PATH task=NAME output=DIR [key.sub=value ...]\n" + (
        rlx.evaluate.__doc__ or ""
    ).replace("python rlx/evaluate.py", "rlx eval")


def main_help() -> str:
    width = max(map(len, COMMANDS))
    cmds = "\n".join(f"  {c:<{width}}  {h}" for c, h in COMMANDS.items())
    return f"""usage: rlx COMMAND [args ...]      (rlx COMMAND --help for each)

RL post-training of language models (GRPO, DPO, PPO, SFT) with interpretability instruments.

commands:
{cmds}

Multi-GPU and multi-node: accelerate launch --config_file PATH -m rlx.train recipe=NAME ... ('rlx configs')."""


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


@exit_on_user_error
def _run(cmd: str, rest: list[str]) -> int:
    if cmd == "train":
        from rlx.train import main as train_main

        train_main(rest)  # handles --help itself
    elif cmd == "eval":
        if _wants_help(rest):
            print(eval_help())
            return 0
        from rlx.evaluate import main as eval_main

        eval_main(rest)
    elif cmd in ("report", "summary"):
        from analysis.__main__ import main as analysis_main

        return analysis_main([cmd, *rest])
    elif cmd == "final-responses":
        from rlx.alignment.final_responses import main as final_main

        final_main(rest)  # handles --help itself
    elif cmd == "recipes":
        print(recipes_text())
    elif cmd == "configs":
        print(configs_text())
    else:
        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"unknown command '{cmd}'{hint}: expected one of {', '.join(COMMANDS)}. See rlx --help."
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    prepare_process(__file__)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(main_help())
            return 0
        return _run(argv[0], argv[1:])
    except BrokenPipeError:  # `rlx recipes | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
