"""Report tables (Parquet, Hive-partitioned by job id): their pyarrow schemas.

`satseg query` registers each table as a DuckDB view of the same name. The
``job_id`` column comes from the partition folder, not from the files.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["SCHEMA_VERSION", "TILES", "CLASSES", "SCENES", "TABLE_SCHEMAS"]

SCHEMA_VERSION = 1

_f64 = pa.float64()
_i64 = pa.int64()

TILES = pa.schema(
    [
        ("scene", pa.string()),
        ("chunk_row", pa.int32()),
        ("chunk_col", pa.int32()),
        ("row_off", _i64),
        ("col_off", _i64),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("minx", _f64),
        ("miny", _f64),
        ("maxx", _f64),
        ("maxy", _f64),
        ("valid_pixels", _i64),
        ("predicted_pixels", pa.list_(_i64)),
        ("confusion", pa.list_(_i64)),
        ("labelled_pixels", _i64),
        ("pixel_accuracy", _f64),
        ("mean_iou", _f64),
        ("iou", pa.list_(_f64)),
    ],
    metadata={"satseg_table": "tiles", "satseg_schema_version": str(SCHEMA_VERSION)},
)

CLASSES = pa.schema(
    [
        ("scene", pa.string()),
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("truth_pixels", _i64),
        ("predicted_pixels", _i64),
        ("true_positives", _i64),
        ("iou", _f64),
        ("dice", _f64),
        ("accuracy", _f64),
        ("precision", _f64),
        ("recall", _f64),
    ],
    metadata={"satseg_table": "classes", "satseg_schema_version": str(SCHEMA_VERSION)},
)

SCENES = pa.schema(
    [
        ("scene", pa.string()),
        ("image", pa.string()),
        ("labels", pa.string()),
        ("mask", pa.string()),
        ("height", _i64),
        ("width", _i64),
        ("bands", pa.list_(pa.int32())),
        ("num_classes", pa.int32()),
        ("class_names", pa.list_(pa.string())),
        ("crs", pa.string()),
        ("valid_pixels", _i64),
        ("labelled_pixels", _i64),
        ("pixel_accuracy", _f64),
        ("mean_accuracy", _f64),
        ("mean_iou", _f64),
        ("mean_dice", _f64),
        ("frequency_weighted_iou", _f64),
        ("mean_precision", _f64),
        ("mean_recall", _f64),
        ("kappa", _f64),
        ("confusion", pa.list_(_i64)),
        ("model", pa.string()),
        ("checkpoint", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("tile_size", pa.int32()),
        ("overlap", pa.int32()),
        ("chunk_size", pa.int32()),
        ("stitch", pa.string()),
        ("window", pa.string()),
        ("tiles_lattice", _i64),
        ("tiles_computed", _i64),
        ("tiles_reused", _i64),
        ("chunks_resumed", _i64),
        ("seconds", _f64),
        ("predict_seconds", _f64),
        ("model_seconds", _f64),
        ("actor_busy_seconds", _f64),
        ("evaluate_seconds", _f64),
        ("megapixels_per_second", _f64),
        ("satseg_version", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"satseg_table": "scenes", "satseg_schema_version": str(SCHEMA_VERSION)},
)

TABLE_SCHEMAS = {"tiles": TILES, "classes": CLASSES, "scenes": SCENES}
