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
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioIOError
from rasterio.windows import Window as RioWindow
from rasterio.crs import CRS

from pipeline.core.geometry import Window, reflect_index
from schemas.errors import InputFileError, MismatchError

__all__ = ["SceneInfo", "WindowData", "open_scene", "check_labels_match", "read_image_window", "read_label_window", "check_bands",
           "normalise", "EXACT_IN_FLOAT32"]


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


EXACT_IN_FLOAT32 = frozenset({"uint8", "int8", "uint16", "int16", "float32"})
"""Pixel types that travel as read: float32 holds each of their values exactly, so the model's device
converts and normalises them with the same result as the reader would (and 16-bit pixels are half the bytes)."""


@dataclass
class WindowData:
    """One read window: the bands as stored, which pixels hold data, and how to normalise them.

    Normalisation happens where the pixels are used (on the model's device in
    an actor; :attr:`image` on the host), so only the file's own bytes cross
    Ray's object store.
    """

    window: Window
    pixels: np.ndarray  # (bands, h, w): as stored when EXACT_IN_FLOAT32 holds its type, else float32
    has_data: np.ndarray  # (h, w) bool: not nodata and finite in every selected band (reflected outside the scene)
    scene_shape: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def inside(self) -> Window | None:
        """The part of the window inside the scene (None when it lies wholly outside)."""
        return self.window.intersection(Window(0, 0, *self.scene_shape))

    @property
    def valid(self) -> np.ndarray:
        """(h, w) bool: inside the scene and holding data."""
        out = np.zeros(self.has_data.shape, dtype=bool)
        if self.inside is not None:
            part = self.inside.slices_in(self.window)
            out[part] = self.has_data[part]
        return out

    @property
    def image(self) -> np.ndarray:
        """(bands, h, w) float32 normalised bands, 0 where a pixel has no data."""
        return normalise(
            self.pixels.astype(np.float32), self.has_data, np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        )


def normalise(image, has_data, mean, std):
    """``(image - mean) / std`` per band, in place, then 0 where a pixel has no data; returns ``image``.

    ``image`` is float32 (bands, h, w), numpy or torch on any device, with
    ``mean`` and ``std`` (bands,) of the same library: only IEEE-exact
    elementwise operations, so host and device give the same bits.
    """
    image -= mean[:, None, None]
    image /= std[:, None, None]
    image[:, ~has_data] = 0
    return image


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


def grid_difference(a: SceneInfo, b: SceneInfo, *, shape_only: bool = False) -> str | None:
    """How ``b``'s pixel grid differs from ``a``'s (``"shape HxW differs from HxW"``, ``"CRS differs"``,
    ``"transform differs"``), or None when they match pixel for pixel.

    The one rule for matching two rasters: `satseg run` (image and labels) and
    `satseg evaluate` (mask and labels) both use it. CRSs are compared as
    coordinate systems, not as text; transforms agree to a millionth of a pixel.
    """
    if (a.height, a.width) != (b.height, b.width):
        return f"shape {b.height}x{b.width} differs from {a.height}x{a.width}"
    if shape_only:
        return None
    if (a.crs is None) != (b.crs is None) or (a.crs is not None and CRS.from_wkt(a.crs) != CRS.from_wkt(b.crs)):
        return "CRS differs"
    pixel = max(abs(v) for v in (a.transform[0], a.transform[1], a.transform[3], a.transform[4])) or 1.0
    if not np.allclose(a.transform[:6], b.transform[:6], rtol=0, atol=1e-6 * pixel):
        return "transform differs"
    return None


def check_labels_match(image: SceneInfo, labels: SceneInfo) -> None:
    """Labels must share the image's shape, CRS and transform, pixel for pixel."""
    fix = "resample or crop the labels onto the image grid"
    if labels.count < 1:
        raise MismatchError(f"{labels.path}: label raster has no band; {fix}")
    difference = grid_difference(image, labels)
    if difference is not None:
        raise MismatchError(f"{labels.path}: label {difference} (image {image.path}); {fix}")


def check_bands(scene: SceneInfo, bands: Sequence[int]) -> None:
    """Every requested band (1-based) must exist in the scene."""
    missing = [b for b in bands if not 1 <= b <= scene.count]
    if missing:
        raise InputFileError(
            f"{scene.path}: band {missing[0]} does not exist (the file has {scene.count}); "
            f"choose bands between 1 and {scene.count}"
        )


def _axis_take(index: np.ndarray) -> tuple[int, int, slice | np.ndarray]:
    """Bounding range of reflected indexes, and how to take them from it (a slice when contiguous)."""
    lo, hi = int(index.min()), int(index.max()) + 1
    if hi - lo == len(index) and index[0] == lo and (len(index) < 2 or index[1] > index[0]):
        return lo, hi, slice(None)
    return lo, hi, index - lo


def _valid_mask(src, indexes, data: np.ndarray, rw: RioWindow) -> np.ndarray:
    """Pixels with data in every band: from the nodata value when that is all GDAL knows, else its masks."""
    flags = [src.mask_flag_enums[i - 1] for i in indexes]
    if all(f == [MaskFlags.all_valid] for f in flags):
        return np.ones(data.shape[1:], dtype=bool)
    if all(f == [MaskFlags.nodata] for f in flags) and src.nodata is not None and not np.isnan(src.nodata):
        return np.all(data != np.asarray(src.nodata, dtype=data.dtype), axis=0)
    return np.all(src.read_masks(indexes, window=rw) > 0, axis=0)


def _padded_read(src, window: Window, indexes) -> tuple[np.ndarray, np.ndarray]:
    rows = reflect_index(np.arange(window.row_off, window.row_stop), src.height)
    cols = reflect_index(np.arange(window.col_off, window.col_stop), src.width)
    r0, r1, take_r = _axis_take(rows)
    c0, c1, take_c = _axis_take(cols)
    rw = RioWindow(c0, r0, c1 - c0, r1 - r0)
    data = src.read(indexes, window=rw)
    valid = _valid_mask(src, indexes, data, rw)
    # one axis at a time: whole rows are copied as blocks, and only the columns gathered
    if isinstance(take_r, np.ndarray):
        data, valid = np.take(data, take_r, axis=1), np.take(valid, take_r, axis=0)
    if isinstance(take_c, np.ndarray):
        data, valid = np.take(data, take_c, axis=2), np.take(valid, take_c, axis=1)
    return data, valid


def read_image_window(
    path: str,
    window: Window,
    bands: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> WindowData:
    """Read ``window`` (may extend outside the scene) and mark nodata; :attr:`WindowData.image` normalises."""
    try:
        with rasterio.open(path) as src:
            raw, mask = _padded_read(src, window, list(bands))
            shape = (src.height, src.width)
    except RasterioIOError as err:
        raise InputFileError(f"{path}: read failed ({err}); check the file is complete") from None
    if raw.dtype.name not in EXACT_IN_FLOAT32:
        raw = raw.astype(np.float32)
    if raw.dtype.kind == "f":
        mask &= np.all(np.isfinite(raw), axis=0)
    return WindowData(window, raw, mask, shape, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def read_label_window(path: str, window: Window, band: int = 1) -> np.ndarray:
    """Read a label window inside the scene as int64 (label nodata becomes -1)."""
    with rasterio.open(path) as src:
        rw = RioWindow(window.col_off, window.row_off, window.width, window.height)
        data = src.read(band, window=rw).astype(np.int64)
        mask = src.read_masks(band, window=rw)
    data[mask == 0] = -1
    return data
