"""`satseg report`: one self-contained HTML page of a run, or of two runs compared."""

from __future__ import annotations

import argparse

HELP = "write one self-contained HTML report of a run (or compare two runs): panels, metrics, curves, worst tiles, throughput"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a job (its --out), holding reports/ and masks/")
    p.add_argument("other", metavar="RUN_B", nargs="?",
                   help="a second job folder: one page comparing RUN_DIR (A) with it (B), for the scenes both hold")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html, or RUN_DIR/compare-<RUN_B>.html)")
    p.add_argument("--job", help="job id, when RUN_DIR holds reports of several jobs (one RUN_DIR only)")


def main(args: argparse.Namespace) -> int:
    from schemas.errors import SpecError

    if args.other is not None:
        from pipeline.report_compare import write_comparison

        if args.job is not None:
            raise SpecError("--job picks a job of one RUN_DIR; to compare, give two folders that each hold one job")
        path = write_comparison(args.run_dir, args.other, args.out)
    else:
        from pipeline.report import write_report

        path = write_report(args.run_dir, args.out, job_id=args.job)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained; open it in any browser)")
    return 0
