"""rlx GRPO step vs plain TRL GRPOTrainer step on the same tiny model and batch, instruments off.

    python -m benchmarks.run grpo_step [--rounds 3] [--steps 16]

Both arms are built in this process from the same resolved `grpo_tiny` config (same model dir, tokenizer,
GRPOConfig, dataset and reward); the rlx arm is `RLXGRPOTrainer` with an empty instrument set, the
baseline is `trl.GRPOTrainer`. Arms alternate round by round; each round trains `--steps` optimizer
steps from the same seed, the first step of each round is excluded. A step is timed from
`on_step_begin` to `on_step_end`. Limit (issue 2): rlx / TRL <= 1.02 (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

MAX_RATIO = 1.02


def _steps_timed(make_trainer, steps: int) -> list[float]:
    from transformers import TrainerCallback, set_seed

    class Timer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    set_seed(0)
    timer = Timer()
    timer.times = []
    trainer = make_trainer(steps)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.run grpo_step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    from trl import GRPOTrainer

    from rlx.config.loader import load_config
    from rlx.instruments.base import InstrumentSet
    from rlx.models import load_tokenizer_for, resolve_model_dir
    from rlx.run import RunContext
    from rlx.tasks import get_task
    from rlx.trainers.build import make_trainer_config
    from rlx.trainers.grpo import RLXGRPOTrainer

    cfg = load_config(["recipe=grpo_tiny", "trainer.report_to=[]", "trainer.logging_steps=1000"])
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer_for(model_dir)
    task = get_task(cfg.task)
    dataset = task.train_dataset()
    work = tempfile.mkdtemp(prefix="bench_grpo_")

    def build(cls, steps, **extra):
        run = RunContext(cfg=cfg, run_dir=__import__("pathlib").Path(work))
        c = load_config(
            [
                "recipe=grpo_tiny",
                f"trainer.max_steps={steps}",
                "trainer.report_to=[]",
                "trainer.logging_steps=1000",
            ]
        )
        args_ = make_trainer_config(c, run, max_completion_length=task.max_completion_length)
        return cls(
            model=model_dir,
            reward_funcs=task.reward_funcs,
            args=args_,
            train_dataset=dataset,
            processing_class=tokenizer,
            **extra,
        )

    arms = {
        "trl": lambda s: build(GRPOTrainer, s),
        "rlx": lambda s: build(RLXGRPOTrainer, s, instruments=InstrumentSet([])),
    }
    per_round: list[float] = []
    means: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for name in arms if r % 2 == 0 else list(arms)[::-1]:
            times = _steps_timed(arms[name], args.steps)
            means[name].append(statistics.mean(times))
        per_round.append(means["rlx"][-1] / means["trl"][-1])
        print(
            f"round {r + 1}: trl {means['trl'][-1] * 1e3:.1f} ms/step  rlx {means['rlx'][-1] * 1e3:.1f} ms/step  ratio {per_round[-1]:.3f}"
        )
    ratio = statistics.median(per_round)
    ok = ratio <= MAX_RATIO
    print(
        f"rlx / TRL GRPO step time: {ratio:.3f} (median of {args.rounds} rounds; limit {MAX_RATIO}) -> {'PASS' if ok else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"ratio": ratio, "per_round": per_round, "ms_per_step": means, "limit": MAX_RATIO},
                fh,
                indent=1,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
