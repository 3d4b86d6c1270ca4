"""Report tables (Parquet, Hive-partitioned by job id): their pyarrow schemas.

`satseg query` registers each table as a DuckDB view of the same name. The
``job_id`` column comes from the partition folder, not from the files. The
``tiles`` and ``scenes`` tables are GeoParquet 1.1 with one CRS for every row,
whatever zone each scene lies in: ``geometry`` is the footprint (of a chunk, of
a scene) as a WKB polygon in longitude/latitude (OGC:CRS84, the GeoParquet
default, so no ``crs`` key), densified along its edges so it follows the
reprojected outline, and ``bbox`` is its covering column. Beside it, each row
keeps its scene's own CRS (``crs`` as WKT, ``epsg`` when it has a code) and
the footprint in that CRS (``geometry_native``, plain WKB, so it is no
geometry column of the file). A scene without georeference has a null
``geometry`` and a ``geometry_native`` in pixel units.

Counts (confusion matrices, boundary bands, probability histograms) are
stored beside the ratios, so every metric can be recomputed exactly from the
tables. List columns indexed by class follow the class order of the scene;
``trimap_iou[k]`` is for band width ``k + 1``.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION", "TILES", "CLASSES", "SCENES", "CURVES", "AGGREGATES", "OBJECTS", "OBJECT_METRICS", "OBJECT_MISSES",
    "TABLE_SCHEMAS",
]

SCHEMA_VERSION = 5  # 3: scenes.nodata_collisions, scenes.boundary_convention; 4: footprints in lon/lat, native beside;
# 5: object_misses.geometry (GeoParquet), first_row, first_col; scenes.refine, refine_options
"""Version 4 moved ``tiles.geometry`` from the scene CRS to lon/lat; files of versions 1-3 keep the scene CRS there."""

_f64 = pa.float64()
_i64 = pa.int64()

_BBOX = pa.struct([("xmin", _f64), ("ymin", _f64), ("xmax", _f64), ("ymax", _f64)])
# A footprint: lon/lat polygon (GeoParquet's geometry column), its covering box, and the same polygon in the scene CRS.
_FOOTPRINT = [
    ("geometry", pa.binary()),
    ("bbox", _BBOX),
    ("geometry_native", pa.binary()),
    ("epsg", pa.int32()),
]

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
        *_FOOTPRINT,
        ("crs", pa.string()),  # the scene CRS as WKT, as in the scenes table
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
        *_FOOTPRINT,
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
        ("refine", pa.string()),  # none, slic or crf (satseg run); null from satseg evaluate
        ("refine_options", pa.string()),  # the refinement's options as applied, JSON
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

# Objects of a job with `things` (pipeline/objects.py): one row per object, GeoParquet 1.1 with ``geometry`` in the
# scene's own CRS (named in the file's `geo` metadata: each scene's file has its own), pixel-exact or simplified.
OBJECTS = pa.schema(
    [
        ("scene", pa.string()),
        ("object_id", _i64),  # the id in the mask store's `instances` raster
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("pixels", _i64),
        ("area", _f64),  # map units squared: pixels x pixel area (the pixel-exact polygon's area)
        ("perimeter", _f64),  # map units: every ring of the pixel-exact polygon
        ("mean_probability", _f64),  # of its class over its pixels, with stored probabilities
        ("first_row", _i64),  # its first pixel in row-major order, which ranks the ids
        ("first_col", _i64),
        ("row_off", _i64),  # its pixel box
        ("col_off", _i64),
        ("height", _i64),
        ("width", _i64),
        ("chunks", pa.int32()),  # chunks holding its pixels
        ("truth_id", _i64),  # the true object it matches (IoU > 0.5), with labels
        ("iou", _f64),  # best IoU with a true object of its class (0: none overlaps), with labels
        ("matched", pa.bool_()),
        ("geometry", pa.binary()),
        ("bbox", _BBOX),  # of the stored geometry, scene CRS
    ],
    metadata={"satseg_table": "objects", "satseg_schema_version": str(SCHEMA_VERSION)},
)

# Object metrics of a scene: a row per class (level "class"), and rows "all", "things", "stuff" (means over the
# classes with a segment; counts pooled). Counts sit beside the ratios, so every score can be recomputed.
OBJECT_METRICS = pa.schema(
    [
        ("scene", pa.string()),
        ("level", pa.string()),
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("kind", pa.string()),  # thing or stuff
        ("classes", pa.int32()),  # summary rows: classes with a segment
        ("truth_segments", _i64),
        ("predicted_segments", _i64),
        ("true_positives", _i64),
        ("false_positives", _i64),
        ("false_negatives", _i64),
        ("ignored_predictions", _i64),  # unmatched and more than half on void: neither TP nor FP
        ("iou_sum", _f64),
        ("pq", _f64),
        ("sq", _f64),
        ("rq", _f64),
        ("precision", _f64),
        ("recall", _f64),
        ("f1", _f64),
        ("connectivity", pa.int8()),
        ("truth", pa.string()),  # components (of the labels) or instances (an instance raster's ids)
    ],
    metadata={"satseg_table": "object_metrics", "satseg_schema_version": str(SCHEMA_VERSION)},
)

# True objects no prediction matches, one row each, GeoParquet like `objects`: each one's pixel-exact polygon, to find and
# draw them.
OBJECT_MISSES = pa.schema(
    [
        ("scene", pa.string()),
        ("truth_id", _i64),  # the labels' component id (ranked like object ids), or the instance raster's id
        ("class_index", pa.int32()),
        ("class_name", pa.string()),
        ("pixels", _i64),  # scored pixels (where the mask has data)
        ("iou", _f64),  # best IoU with a prediction of its class
        ("first_row", _i64),
        ("first_col", _i64),
        ("row_off", _i64),
        ("col_off", _i64),
        ("height", _i64),
        ("width", _i64),
        ("geometry", pa.binary()),
        ("bbox", _BBOX),  # of the geometry, scene CRS
    ],
    metadata={"satseg_table": "object_misses", "satseg_schema_version": str(SCHEMA_VERSION)},
)

TABLE_SCHEMAS = {
    "tiles": TILES, "classes": CLASSES, "scenes": SCENES, "curves": CURVES, "aggregates": AGGREGATES,
    "objects": OBJECTS, "object_metrics": OBJECT_METRICS, "object_misses": OBJECT_MISSES,
}
