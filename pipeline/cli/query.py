"""`satseg query`: SQL over the report tables with DuckDB."""

from __future__ import annotations

import argparse

HELP = "run SQL over the Parquet reports; tables: scenes, classes, tiles, curves, aggregates (runs: a schedule's folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help='SQL, e.g. "SELECT scene, mean_iou FROM scenes ORDER BY mean_iou"')
    p.add_argument("--reports", default="satseg-output/reports", help="reports folder, or a job output folder (default satseg-output/reports)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    p.add_argument("--max-rows", type=int, default=None, help="most rows printed (default 10000); the rest are counted")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the query is stopped (default 120)")


def main(args: argparse.Namespace) -> int:
    import sys

    from pipeline.query import MAX_ROWS, QUERY_SECONDS, format_rows, run_query
    from schemas.errors import SpecError

    max_rows = MAX_ROWS if args.max_rows is None else args.max_rows
    timeout = QUERY_SECONDS if args.timeout is None else args.timeout
    if max_rows < 1 or not timeout > 0:
        raise SpecError("--max-rows must be at least 1 and --timeout above 0")
    result = run_query(args.reports, args.sql, max_rows=max_rows, timeout=timeout)
    print(format_rows(result.columns, result.rows, args.format))
    if result.more:
        print(f"satseg: only the first {max_rows} rows are shown; add LIMIT, narrow the query, or raise --max-rows",
              file=sys.stderr)
    return 0
