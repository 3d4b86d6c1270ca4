"""Evaluation with Dask: every count of mask x labels per chunk, tree-reduced.

Integer counts make the reduction exact in any order, so the scene's metrics
equal the whole-scene computation (ARCHITECTURE.md, invariant 7). Boundary and trimap bands need
pixels beyond the chunk: each chunk task reads its own halo (clipped to the
scene, ``OUTSIDE`` beyond it) from the rasters, so no task waits on or holds a
neighbour's block. (Dask's ``map_overlap`` does the same by sharing neighbour
blocks between tasks, and was measured to hold blocks in proportion to the
scene: 0.44 GiB at 17 Mpx, 0.89 GiB at 268 Mpx. Reading the halo keeps memory
flat.) On a Ray cluster the Dask graph runs on Ray through ``ray.util.dask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from pipeline.core.boundary import CONVENTIONS, OUTSIDE, band_codes, decode_codes
from pipeline.core.geometry import Window
from pipeline.core.metrics import (
    PROBABILITY_LEVELS,
    boundary_counts,
    class_indices,
    prediction_indices,
    probability_histograms,
    trimap_confusions,
)
from workers.reader import read_label_window

__all__ = [
    "ChunkCounts",
    "Raster",
    "geotiff_raster",
    "zarr_raster",
    "array_raster",
    "mask_raster",
    "probabilities_raster",
    "chunk_counts",
    "CountSpec",
    "chunk_windows",
    "block_counts",
    "reduce_counts",
    "dask_scheduler",
]


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
    chunks: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # the chunk grid the counts are over


@dataclass(frozen=True)
class Raster:
    """A raster read window by window: a GeoTIFF band, a Zarr array, or a small array in memory (tests).

    Reads are int64 with -1 where the raster has no data; a Zarr array with
    leading axes (probabilities: class, y, x) reads every leading index.
    Small and picklable: Dask tasks (also on Ray) open the file themselves.
    """

    shape: tuple[int, ...]
    chunks: tuple[int, int]  # the raster's own block size in (y, x): the default chunking
    path: str | None = None
    component: str | None = None  # Zarr: the array's path in its store ("" for a store that is one array)
    nodata: float | None = None  # Zarr: the value that means no data
    values: np.ndarray | None = None
    band: int = 1

    @property
    def height(self) -> int:
        return self.shape[-2]

    @property
    def width(self) -> int:
        return self.shape[-1]

    def read(self, window: Window, *, raw: bool = False) -> np.ndarray:
        """Pixels of ``window`` (inside the raster); int64 with nodata as -1 unless ``raw``."""
        rows, cols = slice(window.row_off, window.row_stop), slice(window.col_off, window.col_stop)
        lead = (slice(None),) * (len(self.shape) - 2)
        if self.values is not None:
            data = self.values[(*lead, rows, cols)]
        elif self.component is None:
            return read_label_window(self.path, window, self.band)
        else:
            arr = zarr.open_array(self.path, path=self.component or None, mode="r")
            data = arr[(*lead, rows, cols)]
        if raw:
            return np.asarray(data)
        out = np.asarray(data).astype(np.int64)
        if self.nodata is not None:
            out[data == self.nodata] = -1
        return out


def geotiff_raster(path: str | Path, shape: tuple[int, int], chunk: int, band: int = 1) -> Raster:
    return Raster(tuple(shape), (chunk, chunk), path=str(path), band=band)


def zarr_raster(path: str | Path, component: str = "", nodata: float | None = None) -> Raster:
    arr = zarr.open_array(str(path), path=component or None, mode="r")
    return Raster(tuple(arr.shape), tuple(arr.chunks[-2:]), path=str(path), component=component, nodata=nodata)


def array_raster(values: np.ndarray, chunk: int, nodata: float | None = None) -> Raster:
    return Raster(tuple(values.shape), (chunk, chunk), values=np.asarray(values), nodata=nodata)


def mask_raster(store: str | Path) -> Raster:
    """A satseg mask store's class mask (255 = nodata), chunked as stored."""
    from pipeline.core.metrics import MASK_NODATA
    from workers.mask_store import MASK

    return zarr_raster(store, MASK, MASK_NODATA)


def probabilities_raster(store: str | Path) -> Raster:
    """A satseg mask store's class probabilities (C, H, W) uint8."""
    from workers.mask_store import PROBABILITIES

    return zarr_raster(store, PROBABILITIES)


def _read_padded(raster: Raster, window: Window, depth: int) -> np.ndarray:
    """``window`` grown by ``depth`` on every side: pixels from the raster, ``OUTSIDE`` beyond its edge."""
    r0, c0 = max(0, window.row_off - depth), max(0, window.col_off - depth)
    r1, c1 = min(raster.height, window.row_stop + depth), min(raster.width, window.col_stop + depth)
    data = raster.read(Window(r0, c0, r1 - r0, c1 - c0))
    pad = ((r0 - (window.row_off - depth), window.row_stop + depth - r1), (c0 - (window.col_off - depth), window.col_stop + depth - c1))
    return np.pad(data, pad, mode="constant", constant_values=OUTSIDE)


@dataclass(frozen=True)
class CountSpec:
    """What one chunk's counts are: the class list, how values map to classes, the bands, the histograms.

    Small and picklable: a chunk task (Dask's, or a Ray task in a job's loop)
    takes it with the chunk's window and computes :func:`block_counts`.
    """

    num_classes: int
    labels: bool = True
    probabilities: bool = False
    pred_values: list[int] | None = None
    label_values: list[int] | None = None
    ignore_index: int | None = 255
    boundary_width: int = 3
    trimap_max: int = 10
    boundary_convention: str = "neutral"  # how no-class pixels shape boundary bands (pipeline.core.boundary.CONVENTIONS)

    def __post_init__(self):
        if self.boundary_convention not in CONVENTIONS:
            raise ValueError(f"unknown boundary convention {self.boundary_convention!r}; choose one of {', '.join(CONVENTIONS)}")

    @property
    def depth(self) -> int:
        """The halo a chunk reads beyond its edges for the boundary and trimap bands."""
        return max(self.boundary_width, self.trimap_max, 1) if self.labels else 0

    @property
    def per_chunk_size(self) -> int:
        """Counts kept per chunk: confusion, predicted, boundary (with labels), else predicted only."""
        c = self.num_classes
        return c * c + c + 3 * c if self.labels else c

    @property
    def size(self) -> int:
        """Length of one chunk's flat count vector: the per-chunk part, then the parts only totals are kept of."""
        c = self.num_classes
        if not self.labels:
            return c
        return self.per_chunk_size + self.trimap_max * c * c + (2 * c * PROBABILITY_LEVELS if self.probabilities else 0)


def chunk_windows(shape: tuple[int, int], chunks: tuple[int, int]) -> tuple[list[Window], tuple[tuple[int, ...], tuple[int, ...]]]:
    """The chunk windows of a raster, row-major, and the chunk sizes along each axis (Dask's convention)."""
    sizes = da.core.normalize_chunks(chunks, shape)
    windows = []
    r0 = 0
    for h in sizes[0]:
        c0 = 0
        for w in sizes[1]:
            windows.append(Window(r0, c0, h, w))
            c0 += w
        r0 += h
    return windows, sizes


def block_counts(window: Window, pred: Raster, labels: Raster | None, probabilities: Raster | None, spec: CountSpec) -> np.ndarray:
    """Every count of one chunk, flattened (``spec.size`` int64): confusion, predicted, boundary, trimap, histograms."""
    c = spec.num_classes
    depth = spec.depth

    def pred_indices(raw: np.ndarray) -> np.ndarray:
        if spec.pred_values is not None:
            idx = class_indices(raw, c, ignore_index=None, label_values=spec.pred_values)
        else:
            idx = prediction_indices(raw, c)
        idx[raw == OUTSIDE] = OUTSIDE
        return idx

    if labels is None:
        p = pred_indices(pred.read(window))
        return np.bincount(p[p >= 0].astype(np.int64), minlength=c).astype(np.int64)
    p_pad = pred_indices(_read_padded(pred, window, depth))
    raw = _read_padded(labels, window, depth)
    t_pad = class_indices(raw, c, ignore_index=spec.ignore_index, label_values=spec.label_values)
    t_pad[raw == OUTSIDE] = OUTSIDE
    inner = (slice(depth, depth + window.height), slice(depth, depth + window.width))
    truth, pred_idx = t_pad[inner], p_pad[inner]
    both = (truth >= 0) & (pred_idx >= 0)
    conf = np.bincount(truth[both].astype(np.int64) * c + pred_idx[both], minlength=c * c)
    predicted = np.bincount(pred_idx[pred_idx >= 0].astype(np.int64), minlength=c)
    codes = band_codes(
        t_pad, p_pad, width=spec.boundary_width, trimap_max=spec.trimap_max, depth=depth, convention=spec.boundary_convention,
    )
    truth_band, pred_band, distance = decode_codes(codes)
    parts = [conf, predicted, boundary_counts(truth, pred_idx, truth_band, pred_band, c).ravel()]
    parts.append(trimap_confusions(truth, pred_idx, distance, c, spec.trimap_max).ravel())
    if probabilities is not None:
        parts.append(probability_histograms(truth, pred_idx, probabilities.read(window, raw=True), c).ravel())
    return np.concatenate(parts).astype(np.int64)


def reduce_counts(blocks: list, spec: CountSpec, sizes: tuple[tuple[int, ...], tuple[int, ...]], *, split_every: int = 8) -> ChunkCounts:
    """Per-chunk counts and exact totals from every chunk's flat vector (row-major), by a Dask tree reduction.

    ``blocks`` are arrays, or Dask arrays of shape (``spec.size``,) still to be computed.
    """
    c = spec.num_classes
    ny, nx = len(sizes[0]), len(sizes[1])
    small = spec.per_chunk_size
    flat = da.stack([b if isinstance(b, da.Array) else da.from_array(np.asarray(b), chunks=-1) for b in blocks])
    per_chunk, totals = dask.compute(flat[:, :small], flat[:, small:].sum(axis=0, split_every=split_every))
    per_chunk = per_chunk.reshape(ny, nx, small)
    if not spec.labels:
        return ChunkCounts(None, per_chunk, per_chunk.sum(axis=2), None, chunks=sizes)
    conf = per_chunk[..., : c * c].reshape(ny, nx, c, c)
    predicted = per_chunk[..., c * c : c * c + c]
    boundary = per_chunk[..., c * c + c :].reshape(ny, nx, 3, c)
    trimap = totals[: spec.trimap_max * c * c].reshape(spec.trimap_max, c, c)
    hist = totals[spec.trimap_max * c * c :].reshape(2, c, PROBABILITY_LEVELS) if spec.probabilities else None
    return ChunkCounts(
        conf, predicted, predicted.sum(axis=2), conf.sum(axis=(0, 1)), boundary, boundary.sum(axis=(0, 1)), trimap, hist,
        spec.boundary_width, sizes,
    )


def chunk_counts(
    pred: Raster,
    labels: Raster | None,
    num_classes: int,
    *,
    chunks: tuple[int, int] | None = None,
    ignore_index: int | None = 255,
    label_values: list[int] | None = None,
    pred_values: list[int] | None = None,
    probabilities: Raster | None = None,
    boundary_width: int = 3,
    trimap_max: int = 10,
    boundary_convention: str = "neutral",
    split_every: int = 8,
) -> ChunkCounts:
    """Per-chunk counts of ``pred`` against ``labels``, one independent Dask task per chunk; totals by tree reduction.

    ``pred`` holds class indices (255 or any value outside the classes: no
    prediction), or label values when ``pred_values`` maps them (a foreign
    mask). ``labels`` hold label values (``label_values[i]`` is class i's;
    default: the index). ``probabilities`` (C, H, W) uint8 add the PR
    histograms. ``chunks`` defaults to the prediction's own chunks.
    ``boundary_convention``: "neutral" or "reference" (``pipeline.core.boundary``).
    """
    if labels is not None and (labels.height, labels.width) != (pred.height, pred.width):
        raise ValueError(f"labels {labels.shape} and prediction {pred.shape} differ in shape")
    spec = CountSpec(
        num_classes, labels is not None, probabilities is not None and labels is not None, pred_values, label_values,
        ignore_index, boundary_width, trimap_max, boundary_convention,
    )
    windows, sizes = chunk_windows((pred.height, pred.width), chunks or pred.chunks)
    task = dask.delayed(block_counts, pure=True)
    blocks = [da.from_delayed(task(w, pred, labels, probabilities, spec), shape=(spec.size,), dtype=np.int64) for w in windows]
    return reduce_counts(blocks, spec, sizes, split_every=split_every)


def dask_scheduler(use_ray: bool):
    """The Dask scheduler: Ray's when a Ray cluster is up (one cluster, both engines)."""
    if use_ray:
        from ray.util.dask import ray_dask_get

        return ray_dask_get
    return "threads"
