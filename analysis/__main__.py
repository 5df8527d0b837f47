"""`python -m analysis report RUN_DIR [RUN_DIR ...] --out report.html` | `python -m analysis summary RUN_DIR`."""

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
    args = p.parse_args(argv)

    from analysis.loader import Run
    from analysis.report import summary_text, write_report

    if args.cmd == "report":
        path = write_report(args.run_dirs, args.out, strict=not args.lenient)
        print(f"report written to {path.resolve()}")
    else:
        print(summary_text(Run(args.run_dir, strict=not args.lenient)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
