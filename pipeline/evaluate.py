"""Evaluation with Dask: per-chunk confusion matrices of mask x labels, tree-reduced.

Integer counts make the reduction exact in any order, so the scene's metrics
equal the whole-scene computation (invariant 7). On a Ray cluster the Dask
graph runs on Ray through ``ray.util.dask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from pipeline.geometry import Window
from pipeline.metrics import MASK_NODATA, confusion_matrix
from workers.reader import read_label_window

__all__ = ["ChunkCounts", "open_mask", "label_array", "chunk_counts", "dask_scheduler"]


@dataclass(frozen=True)
class ChunkCounts:
    """Per-chunk counts over a (rows, cols) chunk grid, and their exact totals."""

    confusion: np.ndarray | None  # (rows, cols, C, C) int64, None without labels
    predicted: np.ndarray  # (rows, cols, C) int64: pixels per predicted class
    valid: np.ndarray  # (rows, cols) int64: pixels with a prediction
    total_confusion: np.ndarray | None  # (C, C)


def open_mask(store: str | Path) -> da.Array:
    """The stored class mask as a Dask array with the store's chunks."""
    return da.from_zarr(str(store), component="mask")


def _read_labels_block(path: str, band: int, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return read_label_window(path, Window(r0, c0, r1 - r0, c1 - c0), band)


def label_array(path: str, shape: tuple[int, int], chunks: tuple) -> da.Array:
    """A label raster as a lazy Dask array; each block is one windowed read."""
    return da.map_blocks(_read_labels_block, path, 1, dtype=np.int64, chunks=chunks, meta=np.empty((0, 0), np.int64))


def _confusion_block(mask: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    return confusion_matrix(labels, mask, num_classes, ignore_index=ignore_index)[None, None]


def _predicted_block(mask: np.ndarray, num_classes: int) -> np.ndarray:
    m = mask[mask != MASK_NODATA].astype(np.int64)
    counts = np.bincount(m[m < num_classes], minlength=num_classes)[:num_classes]
    return counts.astype(np.int64)[None, None]


def chunk_counts(
    mask: da.Array,
    labels: da.Array | None,
    num_classes: int,
    *,
    ignore_index: int = 255,
    split_every: int = 8,
) -> ChunkCounts:
    """Per-chunk confusion matrices and prediction counts; totals by Dask tree reduction."""
    ny, nx = len(mask.chunks[0]), len(mask.chunks[1])
    grid = ((1,) * ny, (1,) * nx)
    predicted = da.map_blocks(
        _predicted_block, mask, num_classes, dtype=np.int64, chunks=(*grid, (num_classes,)), new_axis=[2]
    )
    if labels is None:
        pred = dask.compute(predicted)[0]
        return ChunkCounts(None, pred, pred.sum(axis=2), None)
    confusion = da.map_blocks(
        _confusion_block,
        mask,
        labels,
        num_classes,
        ignore_index,
        dtype=np.int64,
        chunks=(*grid, (num_classes,), (num_classes,)),
        new_axis=[2, 3],
    )
    total = confusion.sum(axis=(0, 1), split_every=split_every)
    pred, conf, tot = dask.compute(predicted, confusion, total)
    return ChunkCounts(conf, pred, pred.sum(axis=2), tot)


def dask_scheduler(use_ray: bool):
    """The Dask scheduler: Ray's when a Ray cluster is up (one cluster, both engines)."""
    if use_ray:
        from ray.util.dask import ray_dask_get

        return ray_dask_get
    return "threads"
