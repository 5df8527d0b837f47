"""The one harness every training benchmark runs on: whole runs of the real training path, interleaved, with
an A-vs-A control, gated on CPU time.

What one *run* is
    A fresh Python process (`python -m benchmarks.harness --child SPEC OUT`) that imports torch/transformers/
    TRL/rlx, then starts its clocks and calls `rlx.train.run_training(cfg)`, the function `python rlx/train.py`
    calls: the config checks, run-directory claim, `rlx.trainers.build.build_trainer` (policy, data, rewards,
    instruments, metrics.jsonl callback, guard), the in-training evaluation callback when `eval.every > 0`,
    `trainer.train()` (step 1 with its one-off work, every diagnostics write and flush, TensorBoard, the
    end-of-run checkpoint, every instrument's `on_train_end`) and the save of `final/`. The clocks stop when it
    returns. The `trl` arm is plain `trl.GRPOTrainer` built directly from the same resolved config (same model
    weights loaded the same way, same prompts, reward functions and GRPOConfig, TensorBoard on), trained and
    saved the same way. Every run sets `eval.before_after=false` (a held-out evaluation outside training,
    identical in every rlx arm and absent from plain TRL); `eval.every` has its own benchmark.

Why one process per run (and not the arms side by side in one process)
    Timing whole runs means timing step 1 and the run's set-up, and those are exactly where a shared process
    lies: the first run in a process pays lazy initialisation (kernel dispatch tables, allocator growth, import
    side effects) that later runs do not, and rlx state that outlives a run (registered instruments' module-level
    caches, the `TENSORBOARD_LOGGING_DIR` a run exports, hooks left on a module, garbage from the previous
    trainer) would be charged to whichever arm runs next. A fresh process per run gives every run the same
    starting state. The import time (identical in every arm, not part of a run) is measured but left out of
    the timed span. Side by side still holds where it matters for ratios: the arms are interleaved round by
    round, so load drift on a shared machine hits every arm alike.

What is measured and gated
    Per run: CPU time of the timed span (`time.process_time()` of the run's process, all its threads, plus
    `RUSAGE_CHILDREN` of anything it started) and wall time; per optimizer step, the CPU and wall time from one
    `on_step_begin` to the next (the last step ends at `on_train_end`, after every instrument's end-of-run
    flush), so logging, writes and checkpoints between steps count. Arms run in rotated order every round
    (round r starts with arm r mod n), `--rounds` >= 5 by default. The base arm is run twice per round, as
    itself and as `<base>~` (a control with the identical config): the control's ratio to the base is the noise
    floor printed next to every ratio. A budget's ratio is the median over rounds of the per-round ratio
    arm / base (pairs run minutes apart, so slow drift cancels); the gate is on CPU time, the wall ratio is
    printed beside it. Beside it, not gated: the best-of-rounds ratio min(arm) / min(base), each arm's fastest
    run (interference only adds time), with the same statistic of the control. `python -m benchmarks.<bench>`
    exits 1 when a gated ratio is over its limit.

Results go to `runs/bench/<bench>.json` (or `--json PATH`): settings, every run's numbers and the budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROUNDS = 5
DEFAULT_STEPS = 30
CONTROL_SUFFIX = "~"

# ---------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One configuration: `kind` rlx (rlx.train.run_training) or trl (plain trl.GRPOTrainer), plus overrides."""

    name: str
    overrides: tuple[str, ...] = ()
    kind: str = "rlx"
    tree: str | None = None
    """Source tree the run executes in (a git worktree of another commit, benchmarks/bench_versions.py); None:
    this repository."""


@dataclass(frozen=True)
class Budget:
    """A ratio arm / base and its limit (None: reported, not gated).

    metric `run`: whole-run CPU time. metric `step`: the median CPU time of the arm's steps selected by
    `arm_steps` over the median of the base's steps selected by `base_steps` (predicates on the 1-based
    optimizer step; step 1 is never selected: it carries one-off work the `run` metric already counts).
    """

    label: str
    arm: str
    limit: float | None
    metric: str = "run"
    arm_steps: Callable[[int], bool] | None = None
    base_steps: Callable[[int], bool] | None = None
    steps_desc: str = ""
    moonshot: float | None = None
    base: str | None = None
    """The denominator arm (default: the bench's base arm)."""


@dataclass
class Bench:
    name: str
    title: str
    base: Arm
    arms: list[Arm]
    budgets: list[Budget]
    recipe: str = "grpo_tiny"
    notes: list[str] = field(default_factory=list)


def all_steps(step: int) -> bool:
    return step > 1


def arm_order(arms: Sequence[str], round_index: int) -> list[str]:
    """Rotated order: round r starts with arm r mod n, so every arm takes every position equally often."""
    k = round_index % len(arms)
    return list(arms[k:]) + list(arms[:k])


def width_overrides(width: int | None) -> list[str]:
    """The embedded model at another width (MLP 4x, 4 heads, 2 KV heads as the default shape)."""
    if not width:
        return []
    return [f"model.embedded.hidden_size={width}", f"model.embedded.intermediate_size={4 * width}"]


def length_overrides(length: int | None) -> list[str]:
    """Completions of exactly `length` tokens (max and min new tokens), whatever the policy would stop at, and
    `coin_reward` for training (the task's reward of a forced-length answer is 0 in every group)."""
    if not length:
        return []
    return [
        f"trainer.max_completion_length={length}",
        f"trainer.generation_kwargs.min_new_tokens={length}",
        "task.reward=[benchmarks.harness:coin_reward]",
    ]


def coin_reward(prompts, completions, **kw) -> list[float]:
    """0 or 1 from a hash of the completion: rewards with variance in every group whatever the policy writes.

    For cost measurements whose completions are forced to a length (`--length`), where the task's own reward
    would be 0 everywhere and the advantage-dependent work (ReLaX's A > 0 rows) would vanish.
    """
    import zlib

    return [float(zlib.crc32(str(c).encode()) & 1) for c in completions]


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure; tests/test_benchmarks.py)
# ---------------------------------------------------------------------------------------------------------


def spread(xs: Sequence[float]) -> dict[str, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0, "min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios num[r] / den[r] (rounds where either is missing or den is 0 are skipped)."""
    return [a / b for a, b in zip(num, den) if a is not None and b]


def noise_floor(control_ratios: Sequence[float]) -> float:
    """Largest deviation from 1 of the A-vs-A control's per-round ratios: two identical arms differed this much."""
    return max((abs(r - 1.0) for r in control_ratios), default=float("nan"))


def judge(ratios: Sequence[float], limit: float | None, control: Sequence[float]) -> dict[str, Any]:
    """Median ratio with its spread, the control's noise floor, and the verdict.

    PASS when the median is <= limit, FAIL when above, REPORTED when there is no limit, NO DATA (not passed
    when gated) when no round gave a ratio. `conclusive` is False
    when the control's noise floor is as large as the margin being tested (limit - 1): then neither verdict
    says much and the run should be repeated on a quieter machine (the exit code still follows the median).
    """
    s = spread(ratios)
    c = spread(control)
    floor = noise_floor(control)
    if not s["n"]:  # e.g. a step budget whose steps the run never reached: not checked, so not passed
        verdict, ok = "NO DATA", limit is None
    elif limit is None:
        verdict, ok = "REPORTED", True
    else:
        ok = s["median"] <= limit
        verdict = "PASS" if ok else "FAIL"
    conclusive = limit is None or not (floor == floor) or floor < abs(limit - 1.0)
    return {
        "ratio": s["median"],
        "min": s["min"],
        "max": s["max"],
        "per_round": list(ratios),
        "control": c["median"],
        "control_min": c["min"],
        "control_max": c["max"],
        "control_per_round": list(control),
        "noise_floor": floor,
        "limit": limit,
        "verdict": verdict,
        "pass": ok,
        "conclusive": conclusive,
    }


def best_of_rounds(num: Sequence[float | None], den: Sequence[float | None]) -> float:
    """min(num) / min(den): the ratio of the two arms' least-disturbed runs. Interference on a shared machine only
    adds time, so each arm's fastest round is its steadiest estimate; reported beside the median of per-round ratios
    with the same statistic of the A-vs-A control (not gated). NaN when either side has no value."""
    a, b = [x for x in num if x is not None], [x for x in den if x is not None and x > 0]
    return min(a) / min(b) if a and b else float("nan")


def exit_code(budgets: Sequence[dict[str, Any]]) -> int:
    """1 when any gated budget failed, else 0."""
    return int(any(b["limit"] is not None and not b["pass"] for b in budgets))


def step_median(run: dict[str, Any], select: Callable[[int], bool], key: str = "cpu") -> float | None:
    vals = [s[key] for s in run["steps"] if select(s["step"])]
    return statistics.median(vals) if vals else None


def evaluate_budget(
    budget: Budget, base: str, runs: dict[str, list[dict[str, Any]]], key: str = "cpu"
) -> dict[str, Any]:
    """Per-round ratios of one budget and of the control (same metric, base's selection) -> judge().

    `base` is the bench's base arm, whose control `<base>~` gives the noise floor; a budget may divide by
    another arm (`budget.base`), and the noise floor is still the base arm's A-vs-A control.
    """
    control = base + CONTROL_SUFFIX
    den_arm = budget.base or base
    if budget.metric == "run":

        def value(arm: str, _sel=None) -> list[float]:
            return [r[key] for r in runs[arm]]

        num, den, ctl, den0 = value(budget.arm), value(den_arm), value(control), value(base)
    elif budget.metric == "step":
        a_sel, b_sel = budget.arm_steps or all_steps, budget.base_steps or all_steps
        num = [step_median(r, a_sel, key) for r in runs[budget.arm]]
        den = [step_median(r, b_sel, key) for r in runs[den_arm]]
        den0 = [step_median(r, b_sel, key) for r in runs[base]]
        ctl = [step_median(r, b_sel, key) for r in runs[control]]
    else:  # pragma: no cover - specs are written in this package
        raise ValueError(f"unknown metric {budget.metric}")
    out = judge(paired_ratios(num, den), budget.limit if key == "cpu" else None, paired_ratios(ctl, den0))
    out["best"], out["best_control"] = best_of_rounds(num, den), best_of_rounds(ctl, den0)
    return {"label": budget.label, "arm": budget.arm, "base": den_arm, "metric": budget.metric, **out}


# ---------------------------------------------------------------------------------------------------------
# The child: one whole run in this process
# ---------------------------------------------------------------------------------------------------------


def _cpu() -> float:
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _clock_callback():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """(wall, cpu) at each on_step_begin and at on_train_end; added after the trainer's own callbacks."""

        def __init__(self):
            self.begins: list[tuple[int, float, float]] = []
            self.train: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.train.append((time.perf_counter(), _cpu()))

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append((int(state.global_step) + 1, time.perf_counter(), _cpu()))

        def on_train_end(self, args, state, control, **kw):
            self.train.append((time.perf_counter(), _cpu()))

        def steps(self) -> list[dict[str, float]]:
            marks = self.begins + [(-1, *self.train[-1])]
            return [
                {"step": s, "wall": marks[i + 1][1] - w, "cpu": marks[i + 1][2] - c}
                for i, (s, w, c) in enumerate(self.begins)
            ]

    return StepClock()


def _plain_trl_run(cfg, clock) -> Path:
    """Plain trl.GRPOTrainer on the inputs rlx would build for `cfg` (no instruments, callbacks or guard)."""
    from accelerate import PartialState
    from transformers import set_seed
    from trl import GRPOTrainer

    from rlx.models import load_causal_lm, load_tokenizer_for, resolve_model_dir
    from rlx.run import decide_run_dir, make_run_context
    from rlx.tasks import get_task
    from rlx.trainers.build import make_trainer_config, rollout_prompts

    if cfg.algo != "grpo" or cfg.regularizers.enabled:
        raise SystemExit("the trl arm is plain GRPO: algo=grpo without regularizers")
    PartialState()
    run_dir = decide_run_dir(cfg)
    run = make_run_context(cfg, run_dir)
    set_seed(cfg.seed)
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer_for(model_dir)
    task = get_task(cfg.task)
    policy = load_causal_lm(model_dir, cfg)
    args = make_trainer_config(cfg, run, max_completion_length=task.max_completion_length)
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=task.reward_funcs,
        args=args,
        train_dataset=rollout_prompts(cfg, task, tokenizer, policy, args),
        processing_class=tokenizer,
    )
    trainer.add_callback(clock)
    trainer.train()
    trainer.save_model(str(run_dir / "final"))
    tokenizer.save_pretrained(run_dir / "final")
    return run_dir


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def prepare(specs: list[dict[str, Any]]) -> None:
    """Build (or find cached) the warm-started embedded model of every spec, so no timed run trains one."""
    from rlx._entry import prepare_process

    prepare_process(__file__)
    from rlx.config.loader import load_config
    from rlx.models import resolve_model_dir

    for spec in specs:
        cfg = load_config([f"recipe={spec['recipe']}", *spec["overrides"]])
        print(f"model for {' '.join(spec['overrides']) or 'the recipe defaults'}: {resolve_model_dir(cfg)}")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One whole run as described by `spec` (kind, recipe, steps, overrides, run_dir); returns its numbers."""
    from rlx._entry import prepare_process

    prepare_process(__file__)
    w0, c0 = time.perf_counter(), _cpu()
    import torch  # noqa: F401  (imports are not part of a run: every arm pays them alike)
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import rlx
    import rlx.train  # noqa: F401
    import rlx.trainers.build as build_mod
    from rlx.config.loader import load_config

    import_wall, import_cpu = time.perf_counter() - w0, _cpu() - c0
    cfg = load_config(
        [
            f"recipe={spec['recipe']}",
            f"trainer.max_steps={spec['steps']}",
            "eval.before_after=false",
            f"output_dir={spec['run_dir']}",
            *spec["overrides"],
        ]
    )
    clock = _clock_callback()
    w0, c0 = time.perf_counter(), _cpu()
    if spec["kind"] == "trl":
        run_dir = _plain_trl_run(cfg, clock)
    else:
        real = build_mod.build_trainer

        def build_trainer(cfg, run):  # the real builder; the clock is added after the trainer's callbacks
            built = real(cfg, run)
            built.trainer.add_callback(clock)
            return built

        build_mod.build_trainer = build_trainer
        try:
            run_dir = rlx.train.run_training(cfg)
        finally:
            build_mod.build_trainer = real
    wall, cpu = time.perf_counter() - w0, _cpu() - c0
    tb, te = clock.train[0], clock.train[-1]
    info_path = Path(run_dir) / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return {
        "wall": wall,
        "cpu": cpu,
        "train_wall": te[0] - tb[0],
        "train_cpu": te[1] - tb[1],
        "import_wall": import_wall,
        "import_cpu": import_cpu,
        "steps": clock.steps(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "diagnostics_bytes": _dir_bytes(Path(run_dir) / "diagnostics"),
        "metrics_bytes": _dir_bytes(Path(run_dir) / "metrics.jsonl"),
        "eval_cost": info.get("eval_cost"),
        "rlx_file": rlx.__file__,
    }


# ---------------------------------------------------------------------------------------------------------
# The parent: rounds of arms, each run in a fresh process
# ---------------------------------------------------------------------------------------------------------

RunFn = Callable[[Arm, int, dict[str, Any]], dict[str, Any]]


def run_in_subprocess(arm: Arm, round_index: int, settings: dict[str, Any]) -> dict[str, Any]:
    work = Path(settings["workdir"])
    tag = f"{arm.name.replace(CONTROL_SUFFIX, '_control')}_r{round_index}"
    spec = {
        "kind": arm.kind,
        "recipe": settings["recipe"],
        "steps": settings["steps"],
        "overrides": [*settings["overrides"], *arm.overrides],
        "run_dir": str(work / tag),
    }
    spec_path, out_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.out.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    root = Path(arm.tree) if arm.tree else REPO
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if arm.tree:  # that tree's rlx and benchmarks, ahead of the installed (editable) rlx
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.harness", "--child", str(spec_path), str(out_path)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"run {tag} exited {proc.returncode}:\n{tail}")
    res = json.loads(out_path.read_text())
    ran = res.get("rlx_file")  # absent when the tree's harness predates the field
    if ran and not Path(ran).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"run {tag} imported rlx from {ran}, not from its tree {root}")
    res["process_wall"] = time.perf_counter() - w0
    res["process_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not settings.get("keep"):
        shutil.rmtree(work / tag, ignore_errors=True)
    return res


def prepare_in_subprocess(arms: Sequence[Arm], settings: dict[str, Any]) -> None:
    """Warm start (or find) every arm's model before any run is timed, in a process of its own."""
    work = Path(settings["workdir"])
    specs = [
        {"recipe": settings["recipe"], "overrides": [*settings["overrides"], *a.overrides]} for a in arms
    ]
    path = work / "prepare.json"
    path.write_text(json.dumps(specs))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--prepare", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"preparing the models failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


def measure(
    bench: Bench,
    settings: dict[str, Any],
    run_fn: RunFn = run_in_subprocess,
    verbose: bool = True,
    prepare_fn: Callable[[Sequence[Arm], dict[str, Any]], None] | None = prepare_in_subprocess,
) -> dict[str, Any]:
    """Every round runs every arm once (control included) in rotated order; returns runs per arm."""
    control = replace(bench.base, name=bench.base.name + CONTROL_SUFFIX)
    arms = {a.name: a for a in [bench.base, control, *bench.arms]}
    if prepare_fn is not None:
        prepare_fn([bench.base, *bench.arms], settings)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in arms}
    for r in range(settings["rounds"]):
        for name in arm_order(list(arms), r):
            res = run_fn(arms[name], r, settings)
            res["round"] = r
            runs[name].append(res)
            if verbose:
                print(
                    f"  round {r + 1}/{settings['rounds']} {name:<14} cpu {res['cpu']:7.1f} s  wall "
                    f"{res['wall']:7.1f} s  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    return runs


def analyse(bench: Bench, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    arms = {
        name: {
            "cpu": spread([r["cpu"] for r in rs]),
            "wall": spread([r["wall"] for r in rs]),
            "train_cpu": spread([r["train_cpu"] for r in rs]),
            "step_cpu": spread([s["cpu"] for r in rs for s in r["steps"] if s["step"] > 1]),
            "first_step_cpu": spread([s["cpu"] for r in rs for s in r["steps"] if s["step"] == 1]),
            "max_rss_mb": spread([r["max_rss_mb"] for r in rs]),
            "diagnostics_bytes": spread([r["diagnostics_bytes"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    for name, rs in runs.items():
        costs = [r["eval_cost"] for r in rs if r.get("eval_cost")]
        if costs:  # eval.every: the evaluations' own clocks (rlx/eval_loop.py), from run_info.json
            arms[name]["eval_cost"] = {
                k: spread([c[k] for c in costs if c.get(k) is not None])
                for k in ("evaluations", "cpu_seconds", "cpu_fraction")
            }
    budgets = []
    for b in bench.budgets:
        res = evaluate_budget(b, bench.base.name, runs, "cpu")
        wall = evaluate_budget(b, bench.base.name, runs, "wall")
        res["wall"] = {k: wall[k] for k in ("ratio", "min", "max", "control", "noise_floor")}
        res["moonshot"] = b.moonshot
        res["steps_desc"] = b.steps_desc
        budgets.append(res)
    return {"arms": arms, "budgets": budgets}


def report(bench: Bench, analysis: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [
        f"{bench.title}",
        f"{settings['rounds']} rounds x {len(analysis['arms'])} arms, {settings['steps']} steps per run, recipe "
        f"{settings['recipe']}{' ' + ' '.join(settings['overrides']) if settings['overrides'] else ''}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load {settings['load_before']:.1f} -> "
        f"{settings.get('load_after', float('nan')):.1f}",
        f"{'arm':<16}{'run CPU s  min / median / max':>32}{'wall s  min / median / max':>30}"
        f"{'step CPU ms (median)':>22}{'step 1 CPU s':>14}",
    ]
    for name, a in analysis["arms"].items():
        c, w = a["cpu"], a["wall"]
        lines.append(
            f"{name:<16}{c['min']:>12.1f} / {c['median']:6.1f} / {c['max']:6.1f}"
            f"{w['min']:>14.1f} / {w['median']:6.1f} / {w['max']:6.1f}"
            f"{1e3 * a['step_cpu']['median']:>22.0f}{a['first_step_cpu']['median']:>14.2f}"
        )
    for name, a in analysis["arms"].items():
        if "eval_cost" in a:
            e = a["eval_cost"]
            lines.append(
                f"{name}: {e['evaluations']['median']:.0f} evaluations per run, {e['cpu_seconds']['median']:.1f} s CPU "
                f"= {100 * e['cpu_fraction']['median']:.1f}% of the training loop's CPU (eval_cost in run_info.json)"
            )
    for b in analysis["budgets"]:
        what = "whole-run CPU" if b["metric"] == "run" else f"step CPU, {b['steps_desc']}"
        limit = f"limit {b['limit']}" if b["limit"] is not None else "no limit"
        if b.get("moonshot"):
            limit += f", moonshot {b['moonshot']}"
        lines.append(
            f"{b['label']:<34} {b['ratio']:.3f} [{b['min']:.3f}, {b['max']:.3f}] ({what})  wall "
            f"{b['wall']['ratio']:.3f} [{b['wall']['min']:.3f}, {b['wall']['max']:.3f}]  | control "
            f"{b['control']:.3f} [{b['control_min']:.3f}, {b['control_max']:.3f}], noise floor "
            f"±{100 * b['noise_floor']:.1f}%  | best of rounds {b.get('best', float('nan')):.3f} (control "
            f"{b.get('best_control', float('nan')):.3f})  | {limit} -> {b['verdict']}"
            + ("" if b["conclusive"] else "  (noise floor >= margin: inconclusive, rerun on a quiet machine)")
        )
    return "\n".join(lines)


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds (default 5)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per run (default 30)")
    ap.add_argument(
        "--width", type=int, default=None, help="embedded model width (default: the recipe's, 128)"
    )
    ap.add_argument(
        "--length", type=int, default=None, help="completion length forced to exactly this many tokens"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every arm"
    )
    ap.add_argument("--json", default=None, help="results file (default runs/bench/<bench>.json)")
    ap.add_argument("--workdir", default=None, help="where run directories go (default: a temporary dir)")
    ap.add_argument("--keep", action="store_true", help="keep every run directory")


def settings_from(args: argparse.Namespace, recipe: str) -> dict[str, Any]:
    return {
        "recipe": recipe,
        "rounds": args.rounds,
        "steps": args.steps,
        "overrides": [*width_overrides(args.width), *length_overrides(args.length), *args.set],
        "keep": args.keep,
        "width": args.width,
        "length": args.length,
    }


def run_bench(
    bench: Bench,
    settings: dict[str, Any],
    json_path: str | None,
    run_fn: RunFn | None = None,
    prepare_fn: Callable[[Sequence[Arm], dict[str, Any]], None] | None | str = "subprocess",
) -> dict[str, Any]:
    """Measure, analyse, print the report and write the results JSON; returns the results."""
    run_fn = run_fn or run_in_subprocess
    prepare_fn = prepare_in_subprocess if prepare_fn == "subprocess" else prepare_fn
    settings = dict(settings, recipe=bench.recipe)
    settings["load_before"] = os.getloadavg()[0]
    settings["cpus"] = os.cpu_count()
    settings["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    print(f"=== {bench.title}", flush=True)
    tmp = None
    if not settings.get("workdir"):
        tmp = tempfile.mkdtemp(prefix=f"bench_{bench.name}_")
        settings["workdir"] = tmp
    Path(settings["workdir"]).mkdir(parents=True, exist_ok=True)
    try:
        runs = measure(bench, settings, run_fn, prepare_fn=prepare_fn)
    finally:
        if tmp and not settings.get("keep"):
            shutil.rmtree(tmp, ignore_errors=True)
    settings["load_after"] = os.getloadavg()[0]
    analysis = analyse(bench, runs)
    print(report(bench, analysis, settings), flush=True)
    for note in bench.notes:
        print(note)
    result = {
        "bench": bench.name,
        "title": bench.title,
        "settings": settings,
        "git": _git_head(),
        "arms": {
            a.name: {"kind": a.kind, "overrides": list(a.overrides), "tree": a.tree}
            for a in [bench.base, *bench.arms]
        },
        **analysis,
        "runs": runs,
        "pass": exit_code(analysis["budgets"]) == 0,
    }
    out = Path(json_path) if json_path else REPO / "runs" / "bench" / f"{bench.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=_jsonable))
    print(f"results: {out}")
    return result


def _jsonable(x: Any) -> Any:
    if callable(x):
        return getattr(x, "__name__", repr(x))
    return asdict(x) if hasattr(x, "__dataclass_fields__") else str(x)


def _git_head() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


def bench_main(
    make: Callable[[argparse.Namespace], Bench],
    argv: list[str] | None,
    doc: str,
    prog: str,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Entry of a training benchmark module: parse, run, print, write JSON, exit 1 on a failed budget."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    common_args(ap)
    if extra_args:
        extra_args(ap)
    args = ap.parse_args(argv)
    bench = make(args)
    settings = settings_from(args, bench.recipe)
    settings["workdir"] = args.workdir
    result = run_bench(bench, settings, args.json)
    return exit_code(result["budgets"])


def _child_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = child(spec)
    Path(out_path).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[1] == "--prepare":
        prepare(json.loads(Path(sys.argv[2]).read_text()))
        sys.exit(0)
    print(
        "usage: the training benchmarks call this module (python -m benchmarks.run --list)", file=sys.stderr
    )
    sys.exit(2)
