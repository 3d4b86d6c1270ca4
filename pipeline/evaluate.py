"""Evaluating an existing mask against labels, with Dask: any pair of GeoTIFFs or Zarr arrays.

A satseg mask store, and a COG exported from one, hold class indices and
carry their class names, which name the classes when no --classes or --job is
given (and must agree with them when given); a store also carries its
probabilities. Any other prediction (a GeoTIFF, a foreign Zarr array) holds
label values, mapped to classes by the same value -> class table as the labels.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dask
import numpy as np

from pipeline import __version__
from pipeline.core.boundary import boundary_width_for
from pipeline.counting import Raster, chunk_counts, geotiff_raster, mask_raster, probabilities_raster, zarr_raster
from pipeline.core.metrics import SceneScores, SegmentationMetrics, scene_scores
from pipeline.core.geometry import ChunkGrid
from pipeline.cog import cog_classes
from pipeline.report_tables import write_scene_reports
from schemas.errors import InputFileError, MismatchError, SpecError
from schemas.rasters import RemotePath, raster_path, recorded_path
from schemas.store import OutputLayout, is_zarr_node
from workers.mask_store import MASK, NO_TRANSFORM, is_mask_store, open_mask_store, zarr_georeference, zarr_mask
from workers.reader import SceneInfo, grid_difference, open_scene

__all__ = ["Evaluation", "ClassTable", "parse_classes", "evaluate_mask"]



@dataclass(frozen=True)
class ClassTable:
    """Class names in index order, and the label value of each (None: the value is the index)."""

    names: list[str]
    values: list[int] | None = None


def parse_classes(text: str) -> ClassTable:
    """``a,b,c`` (values 0, 1, 2) or ``10=tree,20=shrub`` (label value = name)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SpecError("--classes is empty; give names (a,b,c) or value=name pairs (10=tree,20=shrub)")
    if all("=" not in t for t in items):
        return ClassTable(items)
    try:
        pairs = [(int(v), n.strip()) for v, n in (t.split("=", 1) for t in items)]
    except ValueError:
        raise SpecError(f"--classes {text!r}: give value=name pairs with integer values, e.g. 10=tree,20=shrub") from None
    values = [v for v, _ in pairs]
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise SpecError(f"--classes {text!r}: label value {dup[0]} is given twice; give each value one class")
    return ClassTable([n for _, n in pairs], values)


@dataclass
class Evaluation:
    name: str
    class_names: list[str]
    metrics: SegmentationMetrics
    reports: Path | None
    job_id: str
    scores: SceneScores | None = None


@dataclass
class _Raster:
    """A 2-D raster to evaluate: lazily read values, georeference if any, and satseg's extras."""

    path: Path
    raster: Raster
    info: SceneInfo
    class_names: list[str] | None = None  # set for satseg masks: values are class indices
    probabilities: Raster | None = None
    georeferenced: bool = True


def _open_zarr(path: Path, role: str) -> _Raster:
    root = path.parent if path.name == MASK and is_mask_store(path.parent) else path  # STORE.zarr/mask: its store
    if is_mask_store(root):  # a satseg mask: class indices, refused unless its job finished
        store = open_mask_store(root, then="evaluate")
        crs = store.crs.to_wkt() if store.crs else None
        info = SceneInfo(str(path), *store.array.shape, 1, "uint8", crs, store.transform, None)
        probs = probabilities_raster(root) if store.has_probabilities else None
        return _Raster(path, mask_raster(root), info, store.class_names, probs, crs is not None)
    arr, name = zarr_mask(path, role)
    if arr.ndim != 2:
        raise InputFileError(f"{path}: {role} array has {arr.ndim} dimensions, not 2; give a single-band mask")
    attrs = dict(arr.attrs)
    crs, transform = zarr_georeference(path, name)
    crs = crs.to_wkt() if crs else None
    info = SceneInfo(str(path), arr.shape[0], arr.shape[1], 1, str(arr.dtype), crs, transform if crs else NO_TRANSFORM, None)
    nodata = attrs.get("nodata", attrs.get("_FillValue"))
    if not isinstance(nodata, (int, float)) or (isinstance(nodata, float) and np.isnan(nodata)):
        nodata = None
    return _Raster(path, zarr_raster(path, name or "", nodata), info, None, None, crs is not None)


def _open_raster(path: Path | RemotePath, role: str, chunk: int) -> _Raster:
    if isinstance(path, Path) and is_zarr_node(path):
        return _open_zarr(path, role)
    info = open_scene(path, role=role)  # a missing or unreadable file: one line
    satseg = cog_classes(path) if role == "prediction" else None  # a COG `satseg export --cog` wrote: class indices
    return _Raster(path, geotiff_raster(path, (info.height, info.width), chunk), info, satseg[0] if satseg else None)


def _check_same_grid(pred: _Raster, labels: _Raster) -> None:
    """A raster without georeference (a foreign Zarr array) is matched by its shape alone."""
    difference = grid_difference(pred.info, labels.info, shape_only=not (pred.georeferenced and labels.georeferenced))
    if difference is not None:
        raise MismatchError(f"{labels.path}: label {difference} (mask {pred.path}); evaluate against labels on the mask's grid")


def evaluate_mask(
    pred: str | Path,
    labels: str | Path,
    *,
    class_names: list[str] | None = None,
    classes: ClassTable | None = None,
    ignore_index: int | None = 255,
    out: str | Path | None = None,
    chunk: int = 2048,
    boundary_width: int = 3,
    boundary_ratio: float | None = None,
    trimap_max_width: int = 10,
    boundary_convention: str = "neutral",
) -> Evaluation:
    """Metrics of ``pred`` against ``labels``; with ``out``, the reports are written there too."""
    pred, labels = Path(pred), raster_path(labels)  # labels may be remote or virtual (s3://, https://, /vsi*/), kept as given
    t0 = time.perf_counter()
    if not pred.exists():
        raise InputFileError(f"{pred}: prediction not found; give a mask (.zarr store or array, or a GeoTIFF)")
    if out is not None:
        OutputLayout(Path(out)).check_folder()  # before any work
    label_raster = _open_raster(labels, "label", chunk)
    pred_raster = _open_raster(pred, "prediction", chunk)
    _check_same_grid(pred_raster, label_raster)
    table = classes or (ClassTable(list(class_names)) if class_names else None)
    if table is None and pred_raster.class_names:
        table = ClassTable(list(pred_raster.class_names))
    if table is None:
        raise SpecError(f"{pred}: no class names stored with the mask; pass --classes a,b,c (or 10=tree,20=shrub) or --job")
    if pred_raster.class_names and list(pred_raster.class_names) != table.names:
        raise MismatchError(
            f"{pred}: mask classes {pred_raster.class_names} differ from the given {table.names}; drop --classes or fix it"
        )
    if table.values is not None and ignore_index in table.values:
        raise SpecError(f"label value {ignore_index} is both a class and the ignore index; change --ignore-index or the classes")
    c = len(table.names)
    height, width_px = pred_raster.info.height, pred_raster.info.width
    # satseg masks hold class indices; any other mask holds label values, mapped like the labels
    pred_values = table.values if pred_raster.class_names is None else None
    probs = pred_raster.probabilities
    width = boundary_width_for(height, width_px, pixels=boundary_width, ratio=boundary_ratio)
    with dask.config.set(scheduler="threads"):
        counts = chunk_counts(
            pred_raster.raster, label_raster.raster, c, ignore_index=ignore_index, label_values=table.values,
            pred_values=pred_values, probabilities=probs, boundary_width=width, trimap_max=trimap_max_width,
            boundary_convention=boundary_convention,
        )
    scores = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap, counts.histograms)
    key = f"{pred.resolve()}|{labels if isinstance(labels, RemotePath) else labels.resolve()}|{table}|{ignore_index}|{width}|{trimap_max_width}"
    if boundary_convention != "neutral":  # neutral keeps the ids it always had
        key += f"|{boundary_convention}"
    job_id = "eval-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    name = pred.name.split(".")[0] or "mask"
    reports = None
    if out is not None:
        layout = OutputLayout(Path(out))
        chunk_px = max(counts.chunks[0] + counts.chunks[1])  # nominal chunk, also when the scene is shorter
        seconds = time.perf_counter() - t0
        georef = label_raster.info if label_raster.georeferenced else pred_raster.info
        row = {
            "scene": name, "image": None, "labels": recorded_path(labels), "mask": recorded_path(pred), "height": height,
            "width": width_px, "num_classes": c, "class_names": table.names, "crs": georef.crs,
            "valid_pixels": int(counts.valid.sum()), "chunk_size": chunk_px, "seconds": seconds, "boundary_width": width,
            "boundary_convention": boundary_convention,
            "probabilities": f"{pred}/probabilities" if probs is not None else None,
            "label_values": table.values, "mask_label_values": pred_values is not None, "ignore_index": ignore_index,
            "evaluate_seconds": seconds, "satseg_version": __version__, "finished_at": datetime.now(timezone.utc),
        }
        write_scene_reports(layout, job_id, ChunkGrid(height, width_px, chunk_px), georef, table.names, scores, counts, row)
        reports = layout.reports
    return Evaluation(name, table.names, scores.metrics, reports, job_id, scores)
