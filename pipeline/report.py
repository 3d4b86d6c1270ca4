"""Report assembly: tiles, classes and scenes tables from counts and metrics (pure), and writing them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.evaluate import ChunkCounts
from pipeline.metrics import SegmentationMetrics, segmentation_metrics
from pipeline.plan import ScenePlan
from schemas.reports import CLASSES, SCENES, TILES
from workers.reader import SceneInfo

__all__ = ["tiles_table", "classes_table", "scenes_table", "write_table"]


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _list(a: np.ndarray) -> list[float | None]:
    return [_num(float(v)) for v in a]


def tiles_table(scene: str, plan: ScenePlan, info: SceneInfo, counts: ChunkCounts) -> pa.Table:
    """One row per output chunk: where it is, how many pixels, and how good."""
    rows = []
    for r, c in plan.grid:
        win = plan.grid.window(r, c)
        minx, miny, maxx, maxy = info.bounds(win)
        row = {
            "scene": scene,
            "chunk_row": r,
            "chunk_col": c,
            "row_off": win.row_off,
            "col_off": win.col_off,
            "height": win.height,
            "width": win.width,
            "minx": minx,
            "miny": miny,
            "maxx": maxx,
            "maxy": maxy,
            "valid_pixels": int(counts.valid[r, c]),
            "predicted_pixels": counts.predicted[r, c].tolist(),
            "confusion": None,
            "labelled_pixels": None,
            "pixel_accuracy": None,
            "mean_iou": None,
            "iou": None,
        }
        if counts.confusion is not None:
            m = segmentation_metrics(counts.confusion[r, c])
            row.update(
                confusion=m.confusion.ravel().tolist(),
                labelled_pixels=m.valid_pixels,
                pixel_accuracy=_num(m.pixel_accuracy),
                mean_iou=_num(m.mean_iou),
                iou=_list(m.iou),
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=TILES)


def classes_table(scene: str, class_names: list[str], metrics: SegmentationMetrics | None, predicted: np.ndarray) -> pa.Table:
    """One row per class of one scene; metric columns are null without labels."""
    rows = []
    for i, name in enumerate(class_names):
        row = {"scene": scene, "class_index": i, "class_name": name, "predicted_pixels": int(predicted[i])}
        if metrics is not None:
            m = metrics.confusion
            row.update(
                truth_pixels=int(m[i].sum()),
                true_positives=int(m[i, i]),
                iou=_num(float(metrics.iou[i])),
                dice=_num(float(metrics.dice[i])),
                accuracy=_num(float(metrics.class_accuracy[i])),
                precision=_num(float(metrics.precision[i])),
                recall=_num(float(metrics.recall[i])),
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CLASSES)


def scenes_table(row: dict, metrics: SegmentationMetrics | None) -> pa.Table:
    """The one-row scenes table of a scene: provenance, sizes, timings and every scalar metric."""
    row = dict(row)
    if metrics is not None:
        row.update({k: _num(v) for k, v in metrics.scalars().items()})
        row["labelled_pixels"] = metrics.valid_pixels
        row["confusion"] = metrics.confusion.ravel().tolist()
    return pa.Table.from_pylist([row], schema=SCENES)


def write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file atomically, so a crash never leaves a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
