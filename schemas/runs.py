"""The ``runs`` table: one row per schedule tick, Parquet, Hive-partitioned by schedule name.

Files live at ``OUT/reports/runs/schedule=<name>/<run_id>.parquet``; as with
``job_id`` in the report tables, the ``schedule`` column comes from the
partition folder, not from the files. ``job_id`` is the job's content id (the
``job_id`` partition of its tiles, classes and scenes tables), so runs join
the other tables; ``submission_id`` is the Ray Jobs id when the tick's job was
submitted to a cluster.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["RUNS_SCHEMA_VERSION", "RUNS"]

RUNS_SCHEMA_VERSION = 1

_ts = pa.timestamp("us", tz="UTC")

RUNS = pa.schema(
    [
        ("run_id", pa.string()),  # the tick time, e.g. 20261127T020000Z
        ("tick", _ts),
        ("started", _ts),
        ("finished", _ts),
        ("scenes_found", pa.int32()),
        ("scenes_submitted", pa.int32()),
        ("scenes_skipped", pa.int32()),  # already done with the same model and checkpoint, or in flight
        ("scenes_failed", pa.int32()),  # unreadable, or submitted and not done when the tick ended
        ("job_id", pa.string()),
        ("submission_id", pa.string()),
        ("status", pa.string()),  # done, failed, or idle (nothing to run)
        ("message", pa.string()),
        ("model_key", pa.string()),
        ("job_out", pa.string()),
        ("host", pa.string()),
        ("satseg_version", pa.string()),
    ],
    metadata={"satseg_table": "runs", "satseg_schema_version": str(RUNS_SCHEMA_VERSION)},
)
