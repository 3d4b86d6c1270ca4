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
import zarr

from pipeline.boundary import OUTSIDE, band_codes, decode_codes
from pipeline.geometry import Window
from pipeline.metrics import (
    MASK_NODATA,
    PROBABILITY_LEVELS,
    boundary_counts,
    class_indices,
    prediction_indices,
    probability_histograms,
    trimap_confusions,
)
from workers.reader import read_label_window

__all__ = ["ChunkCounts", "open_mask", "open_probabilities", "label_array", "chunk_counts", "dask_scheduler"]


@dataclass(frozen=True)
class ChunkCounts:
    """Per-chunk counts over a (rows, cols) chunk grid, and their exact totals (integer sums)."""

    confusion: np.ndarray | None  # (rows, cols, C, C) int64, None without labels
    predicted: np.ndarray  # (rows, cols, C) int64: pixels per predicted class
    valid: np.ndarray  # (rows, cols) int64: pixels with a prediction
    total_confusion: np.ndarray | None  # (C, C)
    boundary: np.ndarray | None = None  # (rows, cols, 3, C): |Gb|, |Pb|, |Gb & Pb| per class
    total_boundary: np.ndarray | None = None  # (3, C)
    trimap: np.ndarray | None = None  # (N, C, C): confusion inside the trimap band of width 1..N
    histograms: np.ndarray | None = None  # (2, C, 256): probability levels over truth / other pixels
    boundary_width: int | None = None


def _read_zarr_block(store: str, component: str, block_info=None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    arr = zarr.open_array(store, path=component, mode="r")
    return arr[tuple(slice(a, b) for a, b in loc)]


def _zarr_array(store: str | Path, component: str) -> da.Array:
    """A stored Zarr array as a Dask array with its own chunks; each block opens the store by path.

    (Blocks are read by path, not from a pickled zarr array, which does not
    survive Ray's serialisation when Dask runs on Ray.)
    """
    arr = zarr.open_array(str(store), path=component, mode="r")
    chunks = da.core.normalize_chunks(arr.chunks, arr.shape)
    return da.map_blocks(
        _read_zarr_block, str(store), component, dtype=arr.dtype, chunks=chunks, meta=np.empty((0,) * arr.ndim, arr.dtype)
    )


def open_mask(store: str | Path) -> da.Array:
    """The stored class mask as a Dask array with the store's chunks."""
    return _zarr_array(store, "mask")


def open_probabilities(store: str | Path) -> da.Array:
    """The stored class probabilities (C, H, W) uint8 as a Dask array with the store's chunks."""
    return _zarr_array(store, "probabilities")


def _read_labels_block(path: str, band: int, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return read_label_window(path, Window(r0, c0, r1 - r0, c1 - c0), band)


def label_array(path: str, shape: tuple[int, int], chunks: tuple) -> da.Array:
    """A label raster as a lazy Dask array; each block is one windowed read."""
    return da.map_blocks(_read_labels_block, path, 1, dtype=np.int64, chunks=chunks, meta=np.empty((0, 0), np.int64))


def _predicted_block(mask: np.ndarray, num_classes: int) -> np.ndarray:
    m = mask[mask != MASK_NODATA].astype(np.int64)
    counts = np.bincount(m[m < num_classes], minlength=num_classes)[:num_classes]
    return counts.astype(np.int64)[None, None]


def _codes_block(truth: np.ndarray, pred: np.ndarray, *, width: int, trimap_max: int, halo: int) -> np.ndarray:
    codes = band_codes(truth, pred, width=width, trimap_max=trimap_max, depth=halo)
    return np.pad(codes, halo)  # map_overlap trims the halo back off


def _counts_block(pred, truth, codes, *rest, num_classes: int, trimap_max: int) -> np.ndarray:
    """Every count of one chunk, flattened: confusion, predicted, boundary, trimap, histograms."""
    c = num_classes
    both = (truth >= 0) & (pred >= 0)
    conf = np.bincount(truth[both].astype(np.int64) * c + pred[both], minlength=c * c)
    predicted = np.bincount(pred[pred >= 0].astype(np.int64), minlength=c)
    truth_band, pred_band, distance = decode_codes(codes)
    parts = [conf, predicted, boundary_counts(truth, pred, truth_band, pred_band, c).ravel()]
    parts.append(trimap_confusions(truth, pred, distance, c, trimap_max).ravel())
    if rest:
        parts.append(probability_histograms(truth, pred, rest[0], c).ravel())
    return np.concatenate(parts).astype(np.int64)[None, None]


def chunk_counts(
    mask: da.Array,
    labels: da.Array | None,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    label_values: list[int] | None = None,
    probabilities: da.Array | None = None,
    boundary_width: int = 3,
    trimap_max: int = 10,
    split_every: int = 8,
) -> ChunkCounts:
    """Per-chunk counts of ``mask`` (class indices, 255 nodata) against ``labels``; totals by Dask tree reduction.

    Boundary and trimap bands read a halo of the neighbouring chunks
    (``map_overlap``; beyond the scene edge is outside), so every total equals
    the whole-scene computation. ``probabilities`` (C, H, W) uint8, chunked
    like the mask in H and W, add the PR histograms.
    """
    c = num_classes
    ny, nx = len(mask.chunks[0]), len(mask.chunks[1])
    grid = ((1,) * ny, (1,) * nx)
    if labels is None:
        predicted = da.map_blocks(
            _predicted_block, mask, c, dtype=np.int64, chunks=(*grid, (c,)), new_axis=[2]
        )
        pred = dask.compute(predicted)[0]
        return ChunkCounts(None, pred, pred.sum(axis=2), None)
    truth = labels.map_blocks(class_indices, c, ignore_index=ignore_index, label_values=label_values, dtype=np.int16)
    pred = mask.map_blocks(prediction_indices, c, dtype=np.int16)
    depth = max(boundary_width, trimap_max, 1)
    # Padding by the halo first keeps map_overlap working on scenes narrower than the halo;
    # the padding is outside the scene, as is the boundary map_overlap adds.
    padded = [da.pad(a, depth, mode="constant", constant_values=OUTSIDE) for a in (truth, pred)]
    codes = da.map_overlap(
        _codes_block, *padded, depth=depth, boundary=OUTSIDE, dtype=np.uint16,
        width=boundary_width, trimap_max=trimap_max, halo=depth,
    )[depth:-depth, depth:-depth]
    if codes.chunks != mask.chunks:  # chunks thinner than the halo were merged for the overlap
        codes = codes.rechunk(mask.chunks)
    small = c * c + c + 3 * c
    size = small + trimap_max * c * c + (2 * c * PROBABILITY_LEVELS if probabilities is not None else 0)
    args = [pred, "ij", truth, "ij", codes, "ij"]
    if probabilities is not None:
        args += [probabilities, "kij"]
    flat = da.blockwise(
        _counts_block, "ijz", *args, new_axes={"z": size}, concatenate=True, dtype=np.int64,
        num_classes=c, trimap_max=trimap_max,
    )
    per_chunk = flat[..., :small]
    totals = flat[..., small:].sum(axis=(0, 1), split_every=split_every)
    per_chunk, totals = dask.compute(per_chunk, totals)
    conf = per_chunk[..., : c * c].reshape(ny, nx, c, c)
    predicted = per_chunk[..., c * c : c * c + c]
    boundary = per_chunk[..., c * c + c :].reshape(ny, nx, 3, c)
    trimap = totals[: trimap_max * c * c].reshape(trimap_max, c, c)
    hist = totals[trimap_max * c * c :].reshape(2, c, PROBABILITY_LEVELS) if probabilities is not None else None
    total_conf = conf.sum(axis=(0, 1))
    return ChunkCounts(
        conf, predicted, predicted.sum(axis=2), total_conf, boundary, boundary.sum(axis=(0, 1)), trimap, hist, boundary_width
    )


def dask_scheduler(use_ray: bool):
    """The Dask scheduler: Ray's when a Ray cluster is up (one cluster, both engines)."""
    if use_ray:
        from ray.util.dask import ray_dask_get

        return ray_dask_get
    return "threads"
