"""Windowed GeoTIFF reads: scene metadata, and one reflect-padded window at a time.

The scene is never read whole: a window outside the scene is filled by
reflection (numpy's "reflect" mode) from the pixels next to the edge, read
through the same index arithmetic whichever chunk asks, so every chunk sees
the same padded scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window as RioWindow

from pipeline.geometry import Window, reflect_index
from schemas.errors import InputFileError, MismatchError

__all__ = ["SceneInfo", "WindowData", "open_scene", "check_labels_match", "read_image_window", "read_label_window"]


@dataclass(frozen=True)
class SceneInfo:
    """What planning needs to know about a raster, from its metadata only."""

    path: str
    height: int
    width: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None

    @property
    def affine(self) -> "rasterio.Affine":
        return rasterio.Affine(*self.transform)

    def bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of a pixel window in the scene CRS."""
        a = self.affine
        xs, ys = [], []
        for r, c in ((window.row_off, window.col_off), (window.row_stop, window.col_stop)):
            x, y = a @ (c, r)
            xs.append(x)
            ys.append(y)
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass
class WindowData:
    """One read window: normalised bands and which pixels hold data."""

    window: Window
    image: np.ndarray  # (bands, h, w) float32, 0 where invalid
    valid: np.ndarray  # (h, w) bool: inside the scene and not nodata


def open_scene(path: str | Path, *, role: str = "image") -> SceneInfo:
    """Metadata of a raster; a missing or unreadable file raises `InputFileError`."""
    path = str(path)
    if not Path(path).exists():
        raise InputFileError(f"{path}: {role} file not found; check the path")
    try:
        with rasterio.open(path) as src:
            return SceneInfo(
                path=path,
                height=src.height,
                width=src.width,
                count=src.count,
                dtype=src.dtypes[0],
                crs=src.crs.to_wkt() if src.crs else None,
                transform=tuple(src.transform)[:6],
                nodata=src.nodata,
            )
    except RasterioIOError:
        raise InputFileError(f"{path}: not a readable raster; give a GeoTIFF (or another GDAL raster)") from None


def check_labels_match(image: SceneInfo, labels: SceneInfo) -> None:
    """Labels must share the image's shape, CRS and transform, pixel for pixel."""
    fix = "resample or crop the labels onto the image grid"
    if labels.count < 1:
        raise MismatchError(f"{labels.path}: label raster has no band; {fix}")
    if (labels.height, labels.width) != (image.height, image.width):
        raise MismatchError(
            f"{labels.path}: label shape {labels.height}x{labels.width} differs from image "
            f"{image.height}x{image.width} ({image.path}); {fix}"
        )
    if labels.crs != image.crs:
        raise MismatchError(f"{labels.path}: label CRS differs from the image's ({image.path}); {fix}")
    if not np.allclose(labels.transform, image.transform, rtol=0, atol=1e-9 * max(1.0, max(map(abs, image.transform)))):
        raise MismatchError(f"{labels.path}: label transform differs from the image's ({image.path}); {fix}")


def check_bands(scene: SceneInfo, bands: Sequence[int]) -> None:
    """Every requested band (1-based) must exist in the scene."""
    missing = [b for b in bands if not 1 <= b <= scene.count]
    if missing:
        raise InputFileError(
            f"{scene.path}: band {missing[0]} does not exist (the file has {scene.count}); "
            f"choose bands between 1 and {scene.count}"
        )


def _padded_read(src, window: Window, indexes, masks: bool) -> tuple[np.ndarray, np.ndarray | None]:
    rows = reflect_index(np.arange(window.row_off, window.row_stop), src.height)
    cols = reflect_index(np.arange(window.col_off, window.col_stop), src.width)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    rw = RioWindow(c0, r0, c1 - c0, r1 - r0)
    data = src.read(indexes, window=rw)
    take = np.ix_(rows - r0, cols - c0)
    data = data[(slice(None), *take)]
    mask = None
    if masks:
        m = src.read_masks(indexes, window=rw)
        mask = np.all(m[(slice(None), *take)] > 0, axis=0)
    return data, mask


def _in_scene(window: Window, height: int, width: int) -> np.ndarray:
    rows = np.arange(window.row_off, window.row_stop)
    cols = np.arange(window.col_off, window.col_stop)
    return ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]


def read_image_window(
    path: str,
    window: Window,
    bands: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> WindowData:
    """Read ``window`` (may extend outside the scene), normalise, and mark nodata."""
    try:
        with rasterio.open(path) as src:
            raw, mask = _padded_read(src, window, list(bands), masks=True)
            in_scene = _in_scene(window, src.height, src.width)
    except RasterioIOError as err:
        raise InputFileError(f"{path}: read failed ({err}); check the file is complete") from None
    data = raw.astype(np.float32)
    valid = mask & np.all(np.isfinite(data), axis=0)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    data = (data - m) / s
    data[:, ~valid] = 0.0
    return WindowData(window=window, image=data, valid=valid & in_scene)


def read_label_window(path: str, window: Window, band: int = 1) -> np.ndarray:
    """Read a label window inside the scene as int64 (label nodata becomes -1)."""
    with rasterio.open(path) as src:
        rw = RioWindow(window.col_off, window.row_off, window.width, window.height)
        data = src.read(band, window=rw).astype(np.int64)
        mask = src.read_masks(band, window=rw)
    data[mask == 0] = -1
    return data
