"""`satseg query`: SQL over the report tables with DuckDB."""

from __future__ import annotations

import argparse

HELP = "run SQL over the Parquet reports; tables: scenes, classes, tiles, curves, aggregates, runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help='SQL, e.g. "SELECT scene, mean_iou FROM scenes ORDER BY mean_iou"')
    p.add_argument("--reports", default="satseg-output/reports", help="reports folder, or a job output folder (default satseg-output/reports)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")


def main(args: argparse.Namespace) -> int:
    from pipeline.query import format_rows, run_query

    columns, rows = run_query(args.reports, args.sql)
    print(format_rows(columns, rows, args.format))
    return 0
