"""The final model's responses on its task's held-out prompts: the target set D' of gradient alignment.

    python -m rlx.alignment.final_responses RUN_DIR [n=256] [batch_size=64] [max_new_tokens=N]
    rlx final-responses RUN_DIR [n=256] ...

Loads RUN_DIR/final (the trained policy) and RUN_DIR/config.yaml (its task), generates one greedy response for
each of the first `n` held-out prompts and writes RUN_DIR/final_responses.jsonl, one row per prompt:
{"index", "prompt", "prompt_ids", "response", "completion_ids", "answer", "reward"} (answer and reward are
null on a task without a verifiable answer). `prompt_ids` are the ids
the model was prompted with (as TRL builds them); `completion_ids` are the generated ids up to and including
the first EOS, so the file scores exactly the tokens the model produced. A later run uses the file as D' with
`diagnostics.grad_alignment.target=final:RUN_DIR` (docs/gradient_alignment.md, "The target set D'").
`max_new_tokens` defaults to eval.max_new_tokens, else trainer.max_completion_length, else the task's budget.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from rlx._entry import prepare_process

    prepare_process(__file__)

import json
import os
from pathlib import Path
from typing import Any

from rlx.errors import UserError, exit_on_user_error

FILENAME = "final_responses.jsonl"
DEFAULT_N = 256
USAGE = "usage: python -m rlx.alignment.final_responses RUN_DIR [n=256] [batch_size=64] [max_new_tokens=N]"


def responses_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILENAME


def check_run_dir(run_dir: str | Path) -> Path:
    """RUN_DIR as a finished run: a directory with config.yaml and final/; a `UserError` otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: expected a run directory written by rlx train.")
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} has no config.yaml: expected a run directory written by rlx train.")
    if not (run_dir / "final").is_dir():
        raise UserError(
            f"{run_dir} has no final/ model (did training finish?): final responses need the trained policy. "
            "Let the run finish (or resume it), then run this again."
        )
    return run_dir


def greedy_responses(
    model: Any,
    tokenizer: Any,
    task: Any,
    n: int,
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One greedy response for each of the first `n` held-out prompts of `task` (rows as in the file)."""
    from rlx.generation import generate_greedy_ids

    ds = task.eval_dataset()
    ds = ds.select(range(min(n, len(ds))))
    prompts = list(ds["prompt"])
    verifiable = "answer" in ds.column_names  # e.g. ultrafeedback has preferences, no verifiable answer
    answers = list(ds["answer"]) if verifiable else [None] * len(prompts)
    prompt_ids, response_ids = generate_greedy_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        desc="final responses",
    )
    rows = []
    for i, (p, a, pi, ri) in enumerate(zip(prompts, answers, prompt_ids, response_ids)):
        text = tokenizer.decode(ri, skip_special_tokens=True)
        rows.append(
            {
                "index": i,
                "prompt": p,
                "prompt_ids": pi,
                "response": text,
                "completion_ids": ri,
                "answer": a,
                "reward": float(task.score(text, a)) if verifiable else None,
            }
        )
    return rows


def write_final_responses(
    run_dir: str | Path,
    n: int = DEFAULT_N,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate and write RUN_DIR/final_responses.jsonl (atomically); returns its path."""
    import torch

    from rlx.config.loader import load_config
    from rlx.models import load_causal_lm, load_tokenizer_for
    from rlx.tasks import get_task

    run_dir = check_run_dir(run_dir)
    if n < 1:
        raise UserError(f"n={n}: expected the number of held-out prompts to answer, an integer >= 1.")
    cfg = load_config([f"recipe={run_dir / 'config.yaml'}"])
    task = get_task(cfg.task)
    budget = (
        max_new_tokens
        or cfg.eval.max_new_tokens
        or cfg.trainer.get("max_completion_length")
        or task.max_completion_length
    )
    final = str(run_dir / "final")
    tokenizer = load_tokenizer_for(final)
    model = load_causal_lm(final, cfg)
    if torch.cuda.is_available():
        model = model.to("cuda")
    rows = greedy_responses(model, tokenizer, task, n, int(budget), batch_size, progress)
    out = responses_path(run_dir)
    tmp = out.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, out)
    scored = [r["reward"] for r in rows if r["reward"] is not None]
    acc = f", greedy accuracy {sum(x >= 1.0 for x in scored) / len(scored):.3f}" if scored else ""
    print(
        f"{len(rows)} greedy responses of {final} on {task.name}'s held-out prompts "
        f"(max_new_tokens={budget}{acc})"
    )
    print(f"wrote {out}")
    return out


def parse_run_args(
    argv: list[str], usage: str, choices: dict[str, dict[str, str]] | None = None
) -> dict[str, Any]:
    """RUN_DIR [n=N] [batch_size=B] [max_new_tokens=M] [key=choice ...] -> keyword arguments.

    `choices` adds keys that take one of a fixed set of values, {key: {value: what it means}}.
    """
    ints = ("n", "batch_size", "max_new_tokens")
    choices = choices or {}
    run_dir, kw = None, {}
    for a in argv:
        k, eq, v = a.partition("=")
        if not eq:
            if run_dir is not None:
                raise UserError(f"two run directories given ({run_dir}, {a}): expected one. {usage}")
            run_dir = a
        elif k in choices:
            if v not in choices[k]:
                expected = " or ".join(f"{c} ({what})" for c, what in choices[k].items())
                raise UserError(f"{k}={v}: expected {expected}. {usage}")
            kw[k] = v
        elif k in ints:
            try:
                kw[k] = int(v)
            except ValueError:
                raise UserError(f"{k}={v}: expected an integer. {usage}") from None
        else:
            raise UserError(
                f"unknown argument '{a}': expected one of {', '.join([*choices, *ints])}. {usage}"
            )
    if run_dir is None:
        raise UserError(f"no run directory given. {usage}")
    return {"run_dir": run_dir, **kw}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """RUN_DIR [n=N] [batch_size=B] [max_new_tokens=M] -> keyword arguments of `write_final_responses`."""
    return parse_run_args(argv, USAGE)


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return None
    return write_final_responses(**parse_args(argv))


if __name__ == "__main__":
    main()
