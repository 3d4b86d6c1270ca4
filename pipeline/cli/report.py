"""`satseg report`: one self-contained HTML page of a run (quicklooks, error maps, metrics, curves, worst tiles)."""

from __future__ import annotations

import argparse

HELP = "write one self-contained HTML report of a run: quicklooks, error maps, metrics, curves, worst tiles, throughput"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a job (its --out), holding reports/ and masks/")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--job", help="job id, when RUN_DIR holds reports of several jobs")


def main(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    path = write_report(args.run_dir, args.out, job_id=args.job)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained; open it in any browser)")
    return 0
