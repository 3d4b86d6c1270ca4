"""The object report tables: ``objects`` and ``object_misses`` (GeoParquet, a polygon per row), ``object_metrics``.

Columns are in ``schemas/reports.py``. The objects table is GeoParquet 1.1 with
``geometry`` in the scene's own CRS (PROJJSON in the file's ``geo`` metadata, so
geopandas reads it with its CRS; ``crs`` is null for a scene without
georeference, whose polygons are in pixel units). Both are written in
row groups while polygons are made, so no table of every polygon is ever held.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.objects import ObjectScores
from schemas.reports import OBJECT_METRICS, OBJECTS
from schemas.store import replacing

__all__ = ["objects_geo_metadata", "ObjectsWriter", "open_objects_table", "object_metrics_table", "boxes"]

_BOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


def _crs_json(crs) -> dict | None:
    """PROJJSON of a CRS (WKT text or a rasterio/pyproj CRS), as GeoParquet stores it; None without a CRS."""
    if not crs:
        return None
    from pyproj import CRS

    return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs).to_json_dict()


def objects_geo_metadata(crs, multipart: bool) -> bytes:
    """GeoParquet 1.1 ``geo`` metadata of an object table: WKB in the scene CRS, exteriors counter-clockwise.

    4-connected components are one Polygon each; with ``multipart`` a row may be a MultiPolygon: 8-connected parts
    touching at corners, or an instance raster's id whose pixels of one class do not touch.
    """
    column = {
        "encoding": "WKB",
        "geometry_types": ["MultiPolygon", "Polygon"] if multipart else ["Polygon"],
        "orientation": "counterclockwise",
        "crs": _crs_json(crs),
        "covering": {"bbox": {k: ["bbox", k] for k in _BOX_FIELDS}},
    }
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()


def boxes(bounds: np.ndarray) -> pa.StructArray:
    """A ``bbox`` covering column from (n, 4) xmin, ymin, xmax, ymax."""
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    return pa.StructArray.from_arrays([pa.array(b[:, i]) for i in range(4)], names=list(_BOX_FIELDS))


def _nullable(values: np.ndarray | None, n: int, type_: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    if values is None:
        return pa.nulls(n, type_)
    mask = None if valid is None else ~np.asarray(valid, dtype=bool)
    return pa.array(values, type=type_, mask=mask)


class ObjectsWriter:
    """Rows of a GeoParquet object table (``objects`` or ``object_misses``), appended in batches (numpy columns) and
    written as row groups."""

    def __init__(self, writer: pq.ParquetWriter, scene: str, class_names: list[str]):
        self._writer = writer
        self._scene = scene
        self._names = np.asarray(class_names, dtype=object)
        self.rows = 0

    def append(self, columns: dict[str, np.ndarray | list | None]) -> None:
        """One batch: a column per field of the table's schema (``scene``, ``class_name`` and ``bbox`` are derived),
        ``geometry`` as WKB and ``bounds`` (n, 4). Objects: ``truth_id``, ``iou``, ``matched`` and
        ``mean_probability`` may be None (no labels, no probabilities); ``truth_id`` < 0 is no match."""
        n = len(columns["geometry"])
        if not n:
            return
        cls = np.asarray(columns["class_index"], dtype=np.int64)
        arrays = {
            "scene": pa.array([self._scene] * n, pa.string()),
            "class_name": pa.array(self._names[cls], pa.string()),
            "geometry": pa.array(columns["geometry"], pa.binary()),
            "bbox": boxes(columns["bounds"]),
        }
        schema = self._writer.schema
        if "matched" in schema.names:  # the objects table: match columns only with labels
            truth = columns.get("truth_id")
            arrays.update({
                "truth_id": _nullable(truth, n, pa.int64(), None if truth is None else np.asarray(truth) >= 0),
                "iou": _nullable(columns.get("iou"), n, pa.float64()),
                "matched": _nullable(columns.get("matched"), n, pa.bool_()),
                "mean_probability": _nullable(columns.get("mean_probability"), n, pa.float64()),
            })
        for field in schema:
            if field.name not in arrays:
                arrays[field.name] = pa.array(np.asarray(columns[field.name]), type=field.type)
        self._writer.write_table(pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema))
        self.rows += n


@contextmanager
def open_objects_table(
    path: Path, scene: str, class_names: list[str], crs, multipart: bool, schema: pa.Schema = OBJECTS,
) -> Iterator[ObjectsWriter]:
    """An `ObjectsWriter` whose file appears whole, under ``path``, only when the block ends without an error.

    ``schema``: ``OBJECTS`` (the default) or ``OBJECT_MISSES``; both are GeoParquet in the scene's CRS.
    """
    schema = schema.with_metadata({**schema.metadata, b"geo": objects_geo_metadata(crs, multipart)})
    with replacing(path, "path") as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            yield ObjectsWriter(writer, scene, class_names)


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def object_metrics_table(
    scene: str, class_names: list[str], scores: ObjectScores, connectivity: int, truth: str,
) -> pa.Table:
    """A row per class (level ``class``) and the ``all``, ``things`` and ``stuff`` rows of one scene."""
    rows = []
    common = {"scene": scene, "connectivity": connectivity, "truth": truth}
    for i, name in enumerate(class_names):
        rows.append({
            **common, "level": "class", "class_index": i, "class_name": name,
            "kind": "thing" if scores.things[i] else "stuff",
            "truth_segments": int(scores.truth_segments[i]), "predicted_segments": int(scores.predicted_segments[i]),
            "true_positives": int(scores.true_positives[i]), "false_positives": int(scores.false_positives[i]),
            "false_negatives": int(scores.false_negatives[i]), "ignored_predictions": int(scores.ignored_predictions[i]),
            "iou_sum": float(scores.iou_sum[i]),
            **{k: _num(getattr(scores, k)[i]) for k in ("pq", "sq", "rq", "precision", "recall", "f1")},
        })
    for level in ("all", "things", "stuff"):
        s = scores.summary(level)
        pick = {"all": np.ones_like(scores.things), "things": scores.things, "stuff": ~scores.things}[level]
        rows.append({
            **common, "level": level, "classes": s["classes"],
            "truth_segments": int(scores.truth_segments[pick].sum()),
            "predicted_segments": int(scores.predicted_segments[pick].sum()),
            "true_positives": s["true_positives"], "false_positives": s["false_positives"],
            "false_negatives": s["false_negatives"], "ignored_predictions": int(scores.ignored_predictions[pick].sum()),
            "iou_sum": float(scores.iou_sum[pick].sum()),
            **{k: _num(s[k]) for k in ("pq", "sq", "rq", "precision", "recall", "f1")},
        })
    return pa.Table.from_pylist(rows, schema=OBJECT_METRICS)
