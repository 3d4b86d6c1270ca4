"""Zarr v3 mask stores: created once from a lazy georeferenced template, written chunk by chunk.

The store's fill value is the nodata value (255), so a chunk never written
reads back as nodata, not as class 0. Each chunk is written by exactly one
task, aligned to the store's chunks, so no locks are needed (ARCHITECTURE.md, invariant 2).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.geometry import Window
from pipeline.core.metrics import MASK_NODATA
from workers.reader import SceneInfo

__all__ = [
    "create_mask_store",
    "create_probabilities_array",
    "write_mask_chunk",
    "write_probabilities_chunk", "mark_chunk_done", "chunks_done", "set_store_attrs"]


def create_mask_store(store: Path, scene: SceneInfo, chunk: int, attrs: dict) -> None:
    """Create ``store`` with an empty uint8 ``mask`` of the scene's shape, CRS and transform."""
    import dask.array as da  # imported here: chunk-writing workers need only zarr
    import rasterio
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    affine = scene.affine
    cols = np.arange(scene.width) + 0.5
    rows = np.arange(scene.height) + 0.5
    xs = affine.c + cols * affine.a
    ys = affine.f + rows * affine.e
    data = da.full((scene.height, scene.width), MASK_NODATA, dtype=np.uint8, chunks=(chunk, chunk))
    mask = xr.DataArray(data, dims=("y", "x"), coords={"y": ys, "x": xs}, name="mask")
    if scene.crs:
        mask = mask.rio.write_crs(rasterio.crs.CRS.from_wkt(scene.crs))
    mask = mask.rio.write_transform(affine)
    mask.attrs["nodata"] = MASK_NODATA
    mask.attrs.update({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in attrs.items()})
    ds = mask.to_dataset()
    encoding = {"mask": {**mask.encoding, "fill_value": MASK_NODATA, "chunks": (chunk, chunk)}}
    with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3; xarray reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(store, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=True)


def create_probabilities_array(store: Path, class_names: list[str], chunk: int) -> None:
    """Add ``probabilities`` (C, H, W) uint8 to a mask store: p = q / 255, chunked like the mask (all classes per chunk).

    One chunk of it is written by the task that writes the same mask chunk, so
    writes stay chunk-aligned with one writer each.
    """
    mask = zarr.open_array(str(store), path="mask", mode="r")
    root = zarr.open_group(str(store), mode="r+")
    arr = root.create_array(
        "probabilities",
        shape=(len(class_names), *mask.shape),
        chunks=(len(class_names), chunk, chunk),
        dtype="uint8",
        fill_value=0,
        dimension_names=("class", "y", "x"),
        overwrite=True,
    )
    arr.attrs.update({"class_names": json.dumps(class_names), "description": "class probability p = value / 255"})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(store))


def write_probabilities_chunk(store: Path, window: Window, probabilities: np.ndarray) -> None:
    arr = zarr.open_array(str(store), path="probabilities", mode="r+")
    arr[:, window.row_off : window.row_stop, window.col_off : window.col_stop] = probabilities


def write_mask_chunk(store: Path, window: Window, mask: np.ndarray) -> None:
    """Write one chunk's class map into its region of the store."""
    arr = zarr.open_array(str(store), path="mask", mode="r+")
    arr[window.row_off : window.row_stop, window.col_off : window.col_stop] = mask


def set_store_attrs(store: Path, **attrs) -> None:
    """Update the mask array's attributes (e.g. mark it complete)."""
    arr = zarr.open_array(str(store), path="mask", mode="r+")
    arr.attrs.update(attrs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(store))


def mark_chunk_done(markers: Path, key: str) -> None:
    markers.mkdir(parents=True, exist_ok=True)
    (markers / key).touch()


def chunks_done(markers: Path) -> set[str]:
    if not markers.is_dir():
        return set()
    return {p.name for p in markers.iterdir()}
