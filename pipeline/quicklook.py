"""Decimated views of a scene for reports: image RGB, mask colours, TP/FP/FN error maps.

Nothing reads a scene whole. Rasters are read with rasterio's ``out_shape``
(GDAL nearest decimation); the mask is sampled at exactly the pixels GDAL
picks, ``floor((i + 0.5) * size / out)``, so image, labels and mask line up
pixel for pixel. The mask overlay may come from a Zarr overview level
(mode-downsampled, smoother); the error maps always compare the sampled
full-resolution pixels, so every coloured pixel is a real TP, FP or FN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.metrics import MASK_NODATA
from pipeline.palette import class_colours

__all__ = [
    "TP_COLOUR",
    "FP_COLOUR",
    "FN_COLOUR",
    "WRONG_COLOUR",
    "TN_COLOUR",
    "UNSCORED_COLOUR",
    "display_shape",
    "sample_positions",
    "rgb_bands",
    "read_image_rgb",
    "read_labels",
    "read_mask_samples",
    "read_mask_raster",
    "stretch",
    "mask_rgb",
    "overlay",
    "error_rgb",
    "class_error_rgb",
    "label_lookup",
]

TP_COLOUR = (150, 206, 150)
FP_COLOUR = (214, 39, 40)
FN_COLOUR = (31, 119, 180)
WRONG_COLOUR = (214, 39, 40)
TN_COLOUR = (246, 246, 246)
UNSCORED_COLOUR = (190, 190, 190)


def display_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The shape of a view of at most ``max_side`` pixels on its longer side (never upsampled)."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def sample_positions(start: int, size: int, out: int) -> np.ndarray:
    """Source indexes GDAL's nearest decimation reads for ``out`` samples of ``size`` pixels from ``start``."""
    return start + np.floor((np.arange(out) + 0.5) * (size / out)).astype(np.int64)


def rgb_bands(descriptions: tuple, count: int) -> list[int]:
    """Bands for a colour view: those described red, green, blue; else 3, 2, 1; else band 1 as grey."""
    names = [(d or "").strip().lower() for d in descriptions]
    if all(c in names for c in ("red", "green", "blue")):
        return [names.index(c) + 1 for c in ("red", "green", "blue")]
    return [3, 2, 1] if count >= 3 else [1]


def _rio_window(window: Window | None):
    from rasterio.windows import Window as RioWindow

    return None if window is None else RioWindow(window.col_off, window.row_off, window.width, window.height)


def stretch(bands: np.ndarray, valid: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Percentile stretch of (B, h, w) values to uint8 (h, w, 3); invalid pixels black."""
    out = np.zeros((*bands.shape[1:], len(bands)), dtype=np.uint8)
    for i, band in enumerate(bands.astype(np.float64)):
        vals = band[valid]
        if vals.size == 0:
            continue
        lo, hi = np.percentile(vals, [low, high])
        scaled = (band - lo) / (hi - lo) if hi > lo else np.zeros_like(band)
        out[..., i] = np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    out[~valid] = 0
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def read_image_rgb(path: str | Path, out_shape: tuple[int, int], window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decimated colour view of an image (or a window of it): uint8 (h, w, 3) and its valid mask.

    ``path`` as the job reads it: local, remote or virtual, or a STAC item's bands stacked as VRT text.
    """
    from workers.reader import open_raster

    with open_raster(path) as src:
        bands = rgb_bands(src.descriptions, src.count)
        rw = _rio_window(window)
        data = src.read(bands, window=rw, out_shape=(len(bands), *out_shape))
        valid = src.dataset_mask(window=rw, out_shape=out_shape) > 0  # GDAL's, as the job reads it
    shown = valid & np.all(np.isfinite(data), axis=0)  # a NaN band value has no colour
    return stretch(data, shown), valid


def label_lookup(label_values: list[int] | None, num_classes: int) -> np.ndarray:
    """Label value -> class index (-1 for values that count nowhere), for values 0..65535."""
    lut = np.full(65536, -1, dtype=np.int64)
    values = label_values if label_values is not None else list(range(num_classes))
    for index, value in enumerate(values):
        if 0 <= int(value) < lut.size:
            lut[int(value)] = index
    return lut


def read_labels(
    path: str | Path,
    out_shape: tuple[int, int],
    lookup: np.ndarray,
    ignore_index: int | None,
    window: Window | None = None,
) -> np.ndarray:
    """Decimated labels as class indexes; -1 where a pixel counts nowhere (nodata, ignored, unknown value).

    A GeoTIFF is read through GDAL's decimation; a Zarr label array (`satseg evaluate` runs) at the same
    nearest samples as Zarr masks.
    """
    if Path(path).is_dir():
        from workers.mask_store import zarr_mask

        array = zarr_mask(path, "label")[0]
        win = window or Window(0, 0, *array.shape)
        rows = sample_positions(win.row_off, win.height, out_shape[0])
        cols = sample_positions(win.col_off, win.width, out_shape[1])
        raw = np.asarray(array.get_orthogonal_selection((rows, cols))).astype(np.int64)
        valid = np.ones(out_shape, dtype=bool)
    else:
        from workers.reader import open_raster

        with open_raster(path, role="labels") as src:
            rw = _rio_window(window)
            raw = src.read(1, window=rw, out_shape=out_shape).astype(np.int64)
            valid = src.read_masks(1, window=rw, out_shape=out_shape) > 0
    keep = valid & (raw >= 0) & (raw < lookup.size)
    if ignore_index is not None:
        keep &= raw != ignore_index
    out = np.full(out_shape, -1, dtype=np.int64)
    out[keep] = lookup[raw[keep]]
    return out


def read_mask_samples(array, rows: np.ndarray, cols: np.ndarray, factor: int = 1) -> np.ndarray:
    """The mask (or an overview level ``factor`` times coarser) at level-0 pixel ``rows`` x ``cols``."""
    r = np.minimum(rows // factor, array.shape[0] - 1)
    c = np.minimum(cols // factor, array.shape[1] - 1)
    return np.asarray(array.get_orthogonal_selection((r, c)), dtype=np.uint8)


def read_mask_raster(path: str | Path, out_shape: tuple[int, int], window: Window | None = None) -> np.ndarray:
    """A GeoTIFF class mask read decimated (same samples as the other views); nodata and values > 254 become 255."""
    from workers.reader import open_raster

    with open_raster(path, role="mask") as src:
        rw = _rio_window(window)
        raw = src.read(1, window=rw, out_shape=out_shape).astype(np.int64)
        valid = src.read_masks(1, window=rw, out_shape=out_shape) > 0
    return np.where(valid & (raw >= 0) & (raw < MASK_NODATA), raw, MASK_NODATA).astype(np.uint8)


def mask_rgb(mask: np.ndarray, classes: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class colours of a mask: uint8 (h, w, 3) and where it holds a class.

    ``classes``: the class colours, (C, 3) uint8 (`pipeline.palette.mask_colours`), or the class count for the defaults.
    """
    colours = class_colours(classes) if isinstance(classes, int) else np.asarray(classes, dtype=np.uint8)
    num_classes = len(colours)
    has = mask < num_classes
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[has] = colours[mask[has]]
    return rgb, has


def overlay(image: np.ndarray, colours: np.ndarray, where: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``colours`` blended over ``image`` where ``where`` holds."""
    out = image.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * colours[where].astype(np.float32)
    return np.round(out).astype(np.uint8)


def error_rgb(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Green where the class is right (TP), red where wrong (an FP of one class and an FN of another), grey unscored."""
    scored = (truth >= 0) & (truth < num_classes) & (pred < num_classes) & (pred != MASK_NODATA)
    rgb = np.empty((*truth.shape, 3), dtype=np.uint8)
    rgb[:] = UNSCORED_COLOUR
    rgb[scored & (truth == pred)] = TP_COLOUR
    rgb[scored & (truth != pred)] = WRONG_COLOUR
    return rgb


def class_error_rgb(truth: np.ndarray, pred: np.ndarray, num_classes: int, cls: int) -> np.ndarray:
    """One class's view: TP green, FP red, FN blue, TN near white, unscored grey."""
    scored = (truth >= 0) & (truth < num_classes) & (pred < num_classes) & (pred != MASK_NODATA)
    t, p = truth == cls, pred == cls
    rgb = np.empty((*truth.shape, 3), dtype=np.uint8)
    rgb[:] = UNSCORED_COLOUR
    rgb[scored] = TN_COLOUR
    rgb[scored & t & p] = TP_COLOUR
    rgb[scored & ~t & p] = FP_COLOUR
    rgb[scored & t & ~p] = FN_COLOUR
    return rgb
