"""Querying reports with DuckDB: each report table becomes a view of the same name.

The footprints of the tiles and scenes tables read as DuckDB ``GEOMETRY``
values in lon/lat (OGC:CRS84). DuckDB's core has a few ``ST_`` functions
(``ST_AsText``, ``ST_AsGeoJSON``, ``ST_GeomFromWKB``, ``ST_CRS``); the rest
(``ST_Area``, ``ST_Intersects``, ``ST_Transform``...) are in its spatial
extension, which a query loads when it is installed for this DuckDB and which
is never downloaded here (queries are confined: no network, no files).
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from pathlib import Path
from typing import NamedTuple

import duckdb

from schemas.errors import SpecError, first_line
from schemas.store import REPORT_TABLES, ScheduleLayout

__all__ = [
    "QueryResult", "resolve_reports", "connect_reports", "report_views", "spatial_available", "run_query", "format_rows",
    "MAX_ROWS", "QUERY_SECONDS", "SPATIAL_HOW",
]

MAX_ROWS = 10_000
"""Rows a query returns at most (the rest are counted as more); raise it with --max-rows."""
QUERY_SECONDS = 120.0
"""How long a query may run before DuckDB is interrupted; change it with --timeout."""
QUERY_MEMORY = "1GB"
"""DuckDB's memory limit for a query (report tables are small; this stops a runaway join)."""
MAX_SQL_CHARS = 100_000
SPATIAL_HOW = (
    "install it once for this DuckDB with internet access: "
    "python -c \"import duckdb; duckdb.sql('INSTALL spatial')\" (README: Spatial SQL)"
)
"""How to get DuckDB's spatial extension; satseg itself never downloads it."""


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


def _table_files(reports: Path, table: str) -> list[str]:
    """The files of ``table``: under ``reports``, and under each tick's job when ``reports`` is a schedule's.

    Named one by one, never by a pattern: a folder's name may hold ``[``, ``*`` or ``?``, which a DuckDB glob reads as
    a pattern (and an escaped one would fall outside the folders a query may read).
    """
    patterns = [f"{table}/*/*.parquet", f"*/reports/{table}/*/*.parquet"]  # reports, then each tick's job's
    return [str(f) for root, pattern in zip(_report_roots(reports), patterns) for f in sorted(root.glob(pattern))]


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _load_spatial(con: duckdb.DuckDBPyConnection) -> bool:
    """Load DuckDB's spatial extension if it is installed for this DuckDB (never download it); whether it loaded."""
    con.execute("SET autoinstall_known_extensions = false")
    try:
        installed = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'spatial'").fetchone()
        if installed and installed[0]:
            con.execute("LOAD spatial")
            return True
    except duckdb.Error:  # installed for another DuckDB, or damaged: queries run without it
        pass
    return False


def spatial_available() -> bool:
    """Whether `satseg query` has DuckDB's spatial extension (ST_Area, ST_Intersects, ST_Transform...) here."""
    with duckdb.connect(":memory:") as con:
        return _load_spatial(con)


SCENE_CRS_TABLES = ("objects", "object_misses")
"""Tables whose geometry is in each scene's own CRS (GeoParquet ``crs`` per file), not one CRS for all rows."""


def _scene_crs_source(files: list[str]) -> str:
    """A SELECT over a scene-CRS table: files of one CRS are read together; when there are several CRSs, each group's
    geometry is cast to a GEOMETRY without CRS (one DuckDB column holds one CRS), so scenes in different zones still
    share a view (each file keeps its CRS for geopandas)."""
    import pyarrow.parquet as pq

    groups: dict[str, list[str]] = {}
    for path in files:
        try:
            geo = json.loads((pq.read_schema(path).metadata or {}).get(b"geo", b"{}"))
            crs = json.dumps(geo["columns"]["geometry"].get("crs"), sort_keys=True) if geo else None
        except (OSError, ValueError, KeyError):  # unreadable: read_parquet says so in one line
            crs = ""
        groups.setdefault(crs, []).append(path)
    read = "read_parquet([{}], hive_partitioning = true, hive_types_autocast = false, union_by_name = true)"
    if len(groups) <= 1:
        return "SELECT * FROM " + read.format(", ".join(_sql_text(f) for f in files))
    return " UNION ALL BY NAME ".join(
        ("SELECT * FROM " if crs is None else "SELECT * REPLACE (geometry::GEOMETRY AS geometry) FROM ")  # None: no
        + read.format(", ".join(_sql_text(f) for f in group))  # geometry (misses of schema 4 and before)
        for crs, group in groups.items()
    )


def report_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The report tables ``con`` has a view of, in `REPORT_TABLES` order: only those found in its folder."""
    names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    return [t for t in REPORT_TABLES if t in names]


def connect_reports(reports: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per report table found under ``reports`` (and a schedule's jobs).

    Confined: files outside the report folders cannot be read, no file can be
    written or attached, and the settings are locked, so a query cannot undo it.
    DuckDB's spatial extension is loaded first when it is installed here.
    """
    reports = resolve_reports(reports).resolve()  # the views' paths and the allowed folders must agree
    con = duckdb.connect(":memory:")
    _load_spatial(con)
    found = 0
    for table in REPORT_TABLES:
        files = _table_files(reports, table)
        if not files:
            continue
        listed = ", ".join(_sql_text(f) for f in files)
        try:
            con.execute(  # partition values stay text: a job id of 12 digits is still an id, not a number
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listed}], hive_partitioning = true, "
                "hive_types_autocast = false, union_by_name = true)"
                if table not in SCENE_CRS_TABLES else f"CREATE VIEW {table} AS {_scene_crs_source(files)}"
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
    tables = ", ".join(report_views(con))
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise SpecError(f"query failed: {first_line(err)}; tables here are {tables}") from None
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
        raise SpecError(_query_error(err, tables, sql)) from None
    finally:
        timer.cancel()
    if cur.description is None:
        return QueryResult([], [])
    return QueryResult([d[0] for d in cur.description], rows[:max_rows], len(rows) > max_rows)


def _query_error(err: duckdb.Error, tables: str, sql: str) -> str:
    """One line for a failed query: what DuckDB said, and the fix when satseg knows it."""
    text = first_line(err)
    missing = re.search(r'name "?([A-Za-z_0-9]+)"? is not in the catalog, but it exists in the spatial extension', text)
    if missing:
        spelt = re.search(re.escape(missing.group(1)), sql, re.IGNORECASE)  # as the query spells it: ST_Area
        return (
            f"query failed: {spelt.group(0) if spelt else missing.group(1)} needs DuckDB's spatial extension, which is not installed for "
            f"DuckDB {duckdb.__version__}; {SPATIAL_HOW}, or use the core ST_AsText, ST_AsGeoJSON, ST_GeomFromWKB"
        )
    if "Cannot cast GEOMETRY with CRS" in text:
        return (
            f"query failed: {text[:200]}; reports written before satseg report schema 4 hold footprints in each "
            "scene's own CRS, which cannot share a column: rerun those jobs with this satseg, or leave geometry out"
        )
    return f"query failed: {text[:300]}; tables here are {tables}"


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
