"""Querying reports with DuckDB: each report table becomes a view of the same name."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path
from typing import NamedTuple

import duckdb

from schemas.errors import SpecError, first_line
from schemas.store import REPORT_TABLES, ScheduleLayout

__all__ = ["QueryResult", "resolve_reports", "connect_reports", "run_query", "format_rows", "MAX_ROWS", "QUERY_SECONDS"]

MAX_ROWS = 10_000
"""Rows a query returns at most (the rest are counted as more); raise it with --max-rows."""
QUERY_SECONDS = 120.0
"""How long a query may run before DuckDB is interrupted; change it with --timeout."""
QUERY_MEMORY = "1GB"
"""DuckDB's memory limit for a query (report tables are small; this stops a runaway join)."""
MAX_SQL_CHARS = 100_000


def resolve_reports(path: str | Path) -> Path:
    """Accept a reports folder or a job output folder holding ``reports/``."""
    path = Path(path)
    if (path / "reports").is_dir():
        path = path / "reports"
    if not path.is_dir():
        raise SpecError(f"{path}: no reports folder here; pass --reports OUT/reports of a finished job")
    return path


def _report_roots(reports: Path) -> list[Path]:
    """The folders a query may read: ``reports``, and a schedule's job folders (one per tick) beside it."""
    jobs = ScheduleLayout(reports.parent).jobs
    return [reports, jobs] if jobs.is_dir() else [reports]


def _table_globs(reports: Path, table: str) -> list[str]:
    """File globs of ``table``: under ``reports``, and under each tick's job when ``reports`` is a schedule's."""
    patterns = [f"{table}/*/*.parquet", f"*/reports/{table}/*/*.parquet"]  # reports, then each tick's job's
    pairs = zip(_report_roots(reports), patterns)
    return [str(root / pattern) for root, pattern in pairs if next(root.glob(pattern), None) is not None]


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def connect_reports(reports: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per report table found under ``reports`` (and a schedule's jobs).

    Confined: files outside the report folders cannot be read, no file can be
    written or attached, and the settings are locked, so a query cannot undo it.
    """
    reports = resolve_reports(reports).resolve()  # the views' paths and the allowed folders must agree
    con = duckdb.connect(":memory:")
    found = 0
    for table in REPORT_TABLES:
        globs = _table_globs(reports, table)
        if not globs:
            continue
        files = ", ".join(_sql_text(g) for g in globs)
        try:
            con.execute(  # partition values stay text: a job id of 12 digits is still an id, not a number
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}], hive_partitioning = true, "
                "hive_types_autocast = false, union_by_name = true)"
            )
        except duckdb.Error as err:  # a file that is no Parquet (or a damaged one) among the reports
            raise SpecError(
                f"{reports}: a {table} report is unreadable ({first_line(err)[:300]}); remove or restore that file"
            ) from None
        found += 1
    if not found:
        raise SpecError(f"{reports}: no report tables found; run a job with --out pointing here first")
    roots = ", ".join(_sql_text(str(root.resolve()) + "/") for root in _report_roots(reports))
    con.execute(f"SET memory_limit = '{QUERY_MEMORY}'")
    con.execute("SET temp_directory = ''")  # nothing spills to disk: a query writes no file at all
    con.execute(f"SET allowed_directories = [{roots}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


class QueryResult(NamedTuple):
    columns: list[str]
    rows: list[tuple]
    more: bool = False  # rows beyond ``max_rows`` were left out


def run_query(
    reports: str | Path, sql: str, *, max_rows: int = MAX_ROWS, timeout: float = QUERY_SECONDS
) -> QueryResult:
    """Columns and rows of ``sql``, one SELECT statement, over the report views; anything else is refused.

    Bounded: at most ``max_rows`` rows (``more`` says whether there were others), `QUERY_MEMORY` of memory,
    and ``timeout`` seconds, after which DuckDB is interrupted; each bound is one line when it is hit.
    """
    if len(sql) > MAX_SQL_CHARS:
        raise SpecError(f"the query is {len(sql)} characters; satseg query takes at most {MAX_SQL_CHARS}")
    con = connect_reports(reports)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise SpecError(f"query failed: {first_line(err)}; tables are {', '.join(REPORT_TABLES)}") from None
    kinds = [s.type.name for s in statements]
    if kinds != ["SELECT"]:
        raise SpecError(
            f"satseg query runs one SELECT statement over the reports, nothing else (got {', '.join(kinds) or 'none'}); "
            "write a single SELECT (WITH ... SELECT is fine)"
        )
    timer = threading.Timer(timeout, con.interrupt)
    timer.start()
    try:
        cur = con.execute(sql)
        rows = cur.fetchmany(max_rows + 1) if cur.description is not None else []
    except duckdb.InterruptException:
        raise SpecError(f"query stopped after {timeout:g} s; narrow it (WHERE, LIMIT) or pass a longer --timeout") from None
    except duckdb.OutOfMemoryException:
        raise SpecError(f"query needs more than {QUERY_MEMORY} of memory; narrow it (WHERE, fewer columns, LIMIT)") from None
    except duckdb.Error as err:
        raise SpecError(f"query failed: {first_line(err)[:300]}; tables are {', '.join(REPORT_TABLES)}") from None
    finally:
        timer.cancel()
    if cur.description is None:
        return QueryResult([], [])
    return QueryResult([d[0] for d in cur.description], rows[:max_rows], len(rows) > max_rows)


def _plain(v):
    if isinstance(v, float):
        return round(v, 6)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """Rows as csv, json (one object per row) or an aligned text table."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_plain(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        return json.dumps([{c: _plain(v) for c, v in zip(columns, r)} for r in rows], indent=2, default=str)
    cells = [[str(c) for c in columns]] + [["" if v is None else f"{_plain(v)}" for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
