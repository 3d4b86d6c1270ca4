"""Report tables (Parquet, Hive-partitioned by job id): their pyarrow schemas.

`satseg query` registers each table as a DuckDB view of the same name. The
``job_id`` column comes from the partition folder, not from the files. The
``tiles`` table is GeoParquet 1.1: ``geometry`` holds each chunk's footprint
(WKB polygon in the scene CRS) and ``bbox`` is its covering column.

Counts (confusion matrices, boundary bands, probability histograms) are
stored beside the ratios, so every metric can be recomputed exactly from the
tables. List columns indexed by class follow the class order of the scene;
``trimap_iou[k]`` is for band width ``k + 1``.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["SCHEMA_VERSION", "TILES", "CLASSES", "SCENES", "CURVES", "AGGREGATES", "TABLE_SCHEMAS"]

SCHEMA_VERSION = 3  # 3: scenes.nodata_collisions, scenes.boundary_convention

_f64 = pa.float64()
_i64 = pa.int64()

# The scalar metrics of a scene or an aggregate, as `SegmentationMetrics.scalars()` names them.
_SCALAR_METRICS = [
    (name, _f64)
    for name in (
        "pixel_accuracy", "mean_accuracy", "mean_iou", "mean_dice", "frequency_weighted_iou", "mean_precision",
        "mean_recall", "kappa",
    )
]

TILES = pa.schema(
    [
        ("scene", pa.string()),
        ("chunk_row", pa.int32()),
        ("chunk_col", pa.int32()),
        ("row_off", _i64),
        ("col_off", _i64),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("geometry", pa.binary()),
        ("bbox", pa.struct([("xmin", _f64), ("ymin", _f64), ("xmax", _f64), ("ymax", _f64)])),
        ("valid_pixels", _i64),
        ("predicted_pixels", pa.list_(_i64)),
        ("confusion", pa.list_(_i64)),
        ("labelled_pixels", _i64),
        ("pixel_accuracy", _f64),
        ("mean_iou", _f64),
        ("iou", pa.list_(_f64)),
        ("boundary_iou", pa.list_(_f64)),
        ("mean_boundary_iou", _f64),
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
        ("boundary_truth_pixels", _i64),
        ("boundary_predicted_pixels", _i64),
        ("boundary_intersection", _i64),
        ("boundary_iou", _f64),
        ("average_precision", _f64),
        ("trimap_iou", pa.list_(_f64)),
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
        *_SCALAR_METRICS,
        ("mean_boundary_iou", _f64),
        ("boundary_width", pa.int32()),
        ("boundary_convention", pa.string()),  # neutral (satseg's) or reference (the boundary IoU paper's code)
        ("mean_average_precision", _f64),
        ("trimap_miou", pa.list_(_f64)),
        ("confusion", pa.list_(_i64)),
        ("probabilities", pa.string()),
        ("label_values", pa.list_(_i64)),  # label value of each class, when the labels are coded by a mapping
        ("mask_label_values", pa.bool_()),  # true when the mask holds label values too (a foreign mask)
        ("ignore_index", _i64),
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
        ("nodata_collisions", _i64),  # input pixels holding data where a band equals its nodata value
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

CURVES = pa.schema(
    [
        ("scene", pa.string()),
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("threshold", _f64),  # a pixel is called the class when its stored probability >= threshold
        ("precision", _f64),
        ("recall", _f64),
        ("true_positives", _i64),
        ("false_positives", _i64),
    ],
    metadata={"satseg_table": "curves", "satseg_schema_version": str(SCHEMA_VERSION)},
)

# One row per aggregate of a job's scenes: "micro" pools the counts of every scene (then takes
# the metric), "macro" is the mean over scenes of each scene's metric.
AGGREGATES = pa.schema(
    [
        ("aggregate", pa.string()),
        ("scenes", pa.int32()),
        ("class_names", pa.list_(pa.string())),
        ("labelled_pixels", _i64),
        *_SCALAR_METRICS,
        ("mean_boundary_iou", _f64),
        ("mean_average_precision", _f64),
        ("iou", pa.list_(_f64)),
        ("dice", pa.list_(_f64)),
        ("boundary_iou", pa.list_(_f64)),
        ("average_precision", pa.list_(_f64)),
        ("confusion", pa.list_(_i64)),
    ],
    metadata={"satseg_table": "aggregates", "satseg_schema_version": str(SCHEMA_VERSION)},
)

TABLE_SCHEMAS = {"tiles": TILES, "classes": CLASSES, "scenes": SCENES, "curves": CURVES, "aggregates": AGGREGATES}
