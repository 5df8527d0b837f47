"""`python -m analysis report RUN_DIR [RUN_DIR ...] --out report.html` | `python -m analysis summary RUN_DIR`
| `python -m analysis passk RUN_DIR` | `python -m analysis alignment-exact RUN_DIR [target=final|online] [n=256]`."""

from __future__ import annotations

import argparse
import sys

from rlx.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m analysis", description="Offline analysis of rlx run directories."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser("report", help="write one self-contained HTML report comparing runs")
    rep.add_argument("run_dirs", nargs="+", help="rlx run directories")
    rep.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    rep.add_argument(
        "--lenient", action="store_true", help="skip unreadable files with a warning instead of failing"
    )
    summ = sub.add_parser("summary", help="print a text summary of one run")
    summ.add_argument("run_dir")
    summ.add_argument("--lenient", action="store_true", help="skip unreadable files with a warning")
    pk = sub.add_parser("passk", help="pass@k curves of one run's in-training evaluation (eval.every)")
    pk.add_argument("run_dir")
    pk.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/passk.png)")
    ae = sub.add_parser(
        "alignment-exact",
        help="gradient alignment against the run's own final responses (the paper's D', exact two-pass form), "
        "recomputed at the steps saved with diagnostics.grad_alignment.exact.enabled=true",
    )
    ae.add_argument("run_dir")
    ae.add_argument(
        "options",
        nargs="*",
        help="target=final (default: D' = this run's final greedy responses, label final_exact) or target=online "
        "(the D' the run used online, to verify the recomputation); n=256 held-out prompts; batch_size=64; "
        "max_new_tokens=N (default as rlx final-responses)",
    )
    args = p.parse_args(argv)
    if args.cmd == "alignment-exact":
        from rlx.alignment.exact import parse_args, replay

        replay(**parse_args([args.run_dir, *args.options]))
        return 0

    from analysis.loader import Run
    from analysis.report import summary_text, write_report

    if args.cmd == "passk":
        return _passk(Run(args.run_dir), args.out)
    if args.cmd == "report":
        path = write_report(args.run_dirs, args.out, strict=not args.lenient)
        print(f"report written to {path.resolve()}")
    else:
        print(summary_text(Run(args.run_dir, strict=not args.lenient)))
    return 0


def _passk(run, out) -> int:
    from pathlib import Path

    from analysis import plots
    from analysis.measures.passk import crossing, passk_curves, replay_curves, replay_gain
    from rlx.errors import UserError

    curves = passk_curves(run)
    if not len(curves):
        raise UserError(
            f"{run.path} has no sampled in-training evaluation (diagnostics/eval/). Train with eval.every=N and "
            "eval.num_samples >= 2."
        )
    c = crossing(curves)
    wide = curves.pivot(index="k", columns="step", values="pass_at_k")
    print(f"pass@k on {int(curves['num_prompts'].iloc[0])} held-out prompts (columns: step)")
    print(wide.to_string(float_format=lambda x: f"{x:.4f}"))
    n = c["n"]
    base_n, policy_n = c[f"base_pass@{n}"], c[f"policy_pass@{n}"]
    print(
        f"base (step {c['base_step']}) vs policy (step {c['policy_step']}): pass@1 {c['base_pass@1']:.4f} -> "
        f"{c['policy_pass@1']:.4f}; pass@{n} {base_n:.4f} -> {policy_n:.4f}; "
        + (f"the base catches up at k = {c['crossing_k']}" if c["crossing_k"] else "no crossing")
    )
    replayed = replay_curves(run)
    if len(replayed):
        gain = replay_gain(curves, replayed)
        for mode, g in gain.groupby("replay"):
            wide = g.pivot(index="k", columns="step", values="with_replay")
            print(f"\nwith Activation Replay ({mode}; eval.replay), columns: step")
            print(wide.to_string(float_format=lambda x: f"{x:.4f}"))
            wide = g.pivot(index="k", columns="step", values="gain")
            print(f"gain (replay {mode} minus plain), columns: step")
            print(wide.to_string(float_format=lambda x: f"{x:+.4f}"))
    path = Path(out) if out else run.path / "passk.png"
    plots.passk_curves(curves, replay=replayed if len(replayed) else None).savefig(path, dpi=110)
    print(f"plot written to {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
