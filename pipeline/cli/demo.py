"""`satseg demo`: generate data, train a small model (cached), run a real job, print a summary."""

from __future__ import annotations

import argparse

from pipeline.cli.summary import print_job_summary

HELP = "generate a scene, train a small model once, run a full tiling job, and summarise"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="demo folder (default demo-output)")
    p.add_argument("--address", help="Ray cluster address (default: a local instance)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def main(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    from pipeline.report import write_report

    result = run_demo(args.out, show_progress=not args.quiet, address=args.address)
    print_job_summary(result)
    report = write_report(result.layout.root)
    print(f"report:  {report} (open it in a browser)")
    return 0
