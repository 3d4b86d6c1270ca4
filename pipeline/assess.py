"""Evaluating an existing mask (satseg's Zarr or any GeoTIFF) against a label raster, with Dask."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from pipeline import __version__
from pipeline.evaluate import chunk_counts, label_array, open_mask
from pipeline.metrics import MASK_NODATA, SegmentationMetrics, segmentation_metrics
from pipeline.plan import plan_scene
from pipeline.report import classes_table, scenes_table, tiles_table, write_table
from schemas.errors import InputFileError, MismatchError, SpecError
from schemas.store import OutputLayout
from workers.reader import SceneInfo, check_labels_match, open_scene

__all__ = ["Assessment", "assess_mask"]


@dataclass
class Assessment:
    name: str
    class_names: list[str]
    metrics: SegmentationMetrics
    reports: Path | None
    job_id: str


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").exists() or (path / "mask" / "zarr.json").exists())


def _check_store_georeference(pred: Path, labels: SceneInfo) -> None:
    """A Zarr mask must share the labels' CRS and transform (when it records them)."""
    import rasterio
    import xarray as xr

    mask = xr.open_zarr(pred, decode_coords="all")["mask"]
    crs = mask.rio.crs
    if crs is not None and labels.crs is not None and crs != rasterio.crs.CRS.from_wkt(labels.crs):
        raise MismatchError(f"{labels.path}: label CRS differs from mask {pred}; evaluate against labels on the mask's grid")
    if crs is not None and not np.allclose(tuple(mask.rio.transform())[:6], labels.transform, rtol=0, atol=1e-6):
        raise MismatchError(f"{labels.path}: label transform differs from mask {pred}; evaluate against labels on the mask's grid")


def _open_prediction(pred: Path, labels: SceneInfo, chunk: int) -> tuple[da.Array, list[str] | None]:
    if _is_zarr(pred):
        arr = zarr.open_array(str(pred), path="mask", mode="r")
        if tuple(arr.shape) != (labels.height, labels.width):
            raise MismatchError(
                f"{labels.path}: label shape {labels.height}x{labels.width} differs from mask {pred} "
                f"{arr.shape[0]}x{arr.shape[1]}; evaluate against labels on the mask's grid"
            )
        if arr.attrs.get("satseg_job_id") is not None and arr.attrs.get("satseg_complete") is not True:
            raise MismatchError(
                f"{pred}: mask is not complete (its job was interrupted); rerun the job to finish it, then evaluate"
            )
        _check_store_georeference(pred, labels)
        names = arr.attrs.get("class_names")
        if isinstance(names, str):
            import json

            names = json.loads(names)
        return open_mask(pred), names
    if not pred.exists():
        raise InputFileError(f"{pred}: prediction not found; give a satseg mask (.zarr) or a GeoTIFF")
    info = open_scene(pred, role="prediction")
    check_labels_match(info, labels)
    chunks = da.core.normalize_chunks((chunk, chunk), (info.height, info.width))
    values = label_array(str(pred), (info.height, info.width), chunks)  # windowed reads; nodata reads as -1
    return da.where((values < 0) | (values > 254), MASK_NODATA, values).astype(np.uint8), None


def assess_mask(
    pred: str | Path,
    labels: str | Path,
    *,
    class_names: list[str] | None = None,
    ignore_index: int = 255,
    out: str | Path | None = None,
    chunk: int = 2048,
) -> Assessment:
    """Metrics of ``pred`` against ``labels``; with ``out``, the reports are written there too."""
    pred, labels = Path(pred), Path(labels)
    t0 = time.perf_counter()
    label_info = open_scene(labels, role="label")
    mask, stored = _open_prediction(pred, label_info, chunk)
    names = list(class_names or stored or [])
    if not names:
        raise SpecError(f"{pred}: no class names stored with the mask; pass --classes a,b,c")
    lab = label_array(str(labels), mask.shape, mask.chunks)
    with dask.config.set(scheduler="threads"):
        counts = chunk_counts(mask, lab, len(names), ignore_index=ignore_index)
    metrics = segmentation_metrics(counts.total_confusion)
    job_id = "eval-" + hashlib.sha256(f"{pred.resolve()}|{labels.resolve()}|{names}|{ignore_index}".encode()).hexdigest()[:8]
    name = pred.name.split(".")[0] or "mask"
    reports = None
    if out is not None:
        layout = OutputLayout(Path(out))
        chunk_px = max(mask.chunks[0] + mask.chunks[1])  # nominal chunk, also when the scene is shorter
        plan = plan_scene(mask.shape[0], mask.shape[1], tile=32, overlap=0, chunk=chunk_px, mode="crop")
        seconds = time.perf_counter() - t0
        row = {
            "scene": name, "image": None, "labels": str(labels), "mask": str(pred), "height": mask.shape[0],
            "width": mask.shape[1], "num_classes": len(names), "class_names": names, "crs": label_info.crs,
            "valid_pixels": int(counts.valid.sum()), "chunk_size": chunk_px, "seconds": seconds,
            "evaluate_seconds": seconds, "satseg_version": __version__, "finished_at": datetime.now(timezone.utc),
        }
        write_table(tiles_table(name, plan, label_info, counts), layout.report_file("tiles", job_id, name))
        write_table(classes_table(name, names, metrics, counts.predicted.sum(axis=(0, 1))), layout.report_file("classes", job_id, name))
        write_table(scenes_table(row, metrics), layout.report_file("scenes", job_id, name))
        reports = layout.reports
    return Assessment(name, names, metrics, reports, job_id)
