"""Generated, georeferenced demo scenes: a multi-band image and its label raster.

Classes form smooth blobs (argmax of bilinearly interpolated random fields on
a coarse grid), each with its own spectral signature plus noise, so a small
model can learn them. Scenes are written block by block from global
coordinates, so a large scene never sits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window as RioWindow

__all__ = ["DEMO_CLASSES", "SyntheticScene", "write_synthetic_scene", "write_thin_structure_scene"]

DEMO_CLASSES = ["water", "forest", "cropland", "urban", "bare_soil"]

# Mean reflectance x 10000 per class for bands blue, green, red, near infrared.
_SIGNATURES = np.array(
    [
        [900, 800, 600, 300],  # water: dark, darkest in NIR
        [400, 700, 350, 3800],  # forest: high NIR, low red
        [700, 1100, 900, 2600],  # cropland: moderate NIR
        [1500, 1500, 1600, 1800],  # urban: bright, flat
        [1300, 1700, 2300, 2600],  # bare soil: rising with wavelength
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class SyntheticScene:
    image: Path
    labels: Path
    height: int
    width: int


def _field(coarse: np.ndarray, rows: np.ndarray, cols: np.ndarray, cell: int) -> np.ndarray:
    """Bilinear interpolation of a coarse grid (K, gh, gw) at global pixel rows/cols."""
    fr = rows / cell
    fc = cols / cell
    r0 = np.floor(fr).astype(int)
    c0 = np.floor(fc).astype(int)
    wr = (fr - r0)[None, :, None]
    wc = (fc - c0)[None, None, :]
    a = coarse[:, r0][:, :, c0]
    b = coarse[:, r0][:, :, c0 + 1]
    c = coarse[:, r0 + 1][:, :, c0]
    d = coarse[:, r0 + 1][:, :, c0 + 1]
    return (a * (1 - wc) + b * wc) * (1 - wr) + (c * (1 - wc) + d * wc) * wr


def _profile(height: int, width: int, epsg: int, seed: int) -> dict:
    """A generated scene's GeoTIFF profile: 10 m pixels in ``epsg``, its origin shifted by the seed, tiled 256."""
    transform = from_origin(500000.0 + 10.0 * seed, 4_600_000.0, 10.0, 10.0)
    return dict(
        driver="GTiff", height=height, width=width, crs=CRS.from_epsg(epsg), transform=transform,
        tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    )


def write_synthetic_scene(
    directory: Path,
    name: str,
    height: int,
    width: int,
    *,
    seed: int = 0,
    cell: int = 96,
    noise: float = 0.06,
    nodata_corner: bool = True,
    block: int = 512,
    epsg: int = 32633,
) -> SyntheticScene:
    """Write ``<name>.tif`` (4 bands, uint16, nodata 0) and ``<name>_labels.tif`` (uint8, 255 = ignore)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = len(DEMO_CLASSES)
    gh, gw = height // cell + 2, width // cell + 2
    coarse = rng.normal(size=(k, gh, gw))
    coarse[0] -= 0.3  # a little less water
    light = rng.normal(scale=0.08, size=(1, gh // 4 + 2, gw // 4 + 2))
    profile = _profile(height, width, epsg, seed)
    image_path, labels_path = directory / f"{name}.tif", directory / f"{name}_labels.tif"
    with rasterio.open(image_path, "w", count=4, dtype="uint16", nodata=0, **profile) as img, rasterio.open(
        labels_path, "w", count=1, dtype="uint8", nodata=255, **profile
    ) as lbl:
        img.set_band_description(1, "blue")
        img.set_band_description(2, "green")
        img.set_band_description(3, "red")
        img.set_band_description(4, "nir")
        for r0 in range(0, height, block):
            for c0 in range(0, width, block):
                h, w = min(block, height - r0), min(block, width - c0)
                rows = np.arange(r0, r0 + h, dtype=np.float64)
                cols = np.arange(c0, c0 + w, dtype=np.float64)
                labels = np.argmax(_field(coarse, rows, cols, cell), axis=0).astype(np.uint8)
                gain = 1.0 + _field(light, rows, cols, cell * 4)[0]
                brng = np.random.default_rng([seed, r0, c0])
                sig = _SIGNATURES[labels].transpose(2, 0, 1)
                data = sig * gain[None] * (1.0 + brng.normal(scale=noise, size=sig.shape))
                data = np.clip(data, 1, 65535).astype(np.uint16)
                if nodata_corner:  # a swath with no data, like the edge of an orbit
                    rr, cc = np.meshgrid(rows, cols, indexing="ij")
                    empty = (rr / height + cc / width) < 0.12
                    data[:, empty] = 0
                    labels[empty] = 255
                win = RioWindow(c0, r0, w, h)
                img.write(data, window=win)
                lbl.write(labels[None], window=win)
        lbl.update_tags(classes=",".join(DEMO_CLASSES))
    return SyntheticScene(image_path, labels_path, height, width)


def _cuts(rng: np.random.Generator, size: int, low: int, high: int) -> np.ndarray:
    """Positions of parcel edges along one axis: random gaps in [low, high) until past ``size``."""
    gaps = rng.integers(low, high, size=size // low + 2)
    cuts = np.cumsum(gaps)
    return cuts[cuts < size]


def write_thin_structure_scene(
    directory: Path,
    name: str,
    height: int,
    width: int,
    *,
    seed: int = 0,
    parcel: tuple[int, int] = (50, 160),
    road: int = 3,
    hedge: int = 2,
    river: int = 5,
    noise: float = 0.06,
    block: int = 512,
    epsg: int = 32633,
) -> SyntheticScene:
    """Like `write_synthetic_scene`, but thin structures: a patchwork of fields (forest, cropland, bare soil, some
    urban) whose edges are bare, or carry a ``road`` px road (urban) or a ``hedge`` px hedgerow (forest), crossed by
    two ``river`` px rivers (water). For measuring what smoothing does to narrow classes and field edges."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_cuts, col_cuts = _cuts(rng, height, *parcel), _cuts(rng, width, *parcel)
    fields = rng.choice([1, 2, 4, 3], p=[0.3, 0.35, 0.3, 0.05], size=(len(row_cuts) + 1, len(col_cuts) + 1))
    # each parcel edge: 0 bare, 1 road, 2 hedgerow
    row_kind, col_kind = rng.choice(3, p=[0.4, 0.35, 0.25], size=len(row_cuts)), rng.choice(3, p=[0.4, 0.35, 0.25], size=len(col_cuts))
    rivers = [(rng.uniform(0.2, 0.8) * height, rng.uniform(0.03, 0.08) * height, rng.uniform(0.3, 0.6) * width,
               rng.uniform(0, 2 * np.pi)) for _ in range(2)]
    light = rng.normal(scale=0.08, size=(1, height // 384 + 3, width // 384 + 3))
    profile = _profile(height, width, epsg, seed)
    image_path, labels_path = directory / f"{name}.tif", directory / f"{name}_labels.tif"

    def lines(cuts: np.ndarray, kinds: np.ndarray, coords: np.ndarray, kind: int, width_px: int) -> np.ndarray:
        """Pixels (along ``coords``) within a ``width_px`` line on a cut of ``kind``."""
        near = np.zeros(coords.shape, bool)
        for cut in cuts[kinds == kind]:
            near |= (coords >= cut - width_px // 2) & (coords < cut - width_px // 2 + width_px)
        return near

    with rasterio.open(image_path, "w", count=4, dtype="uint16", nodata=0, **profile) as img, rasterio.open(
        labels_path, "w", count=1, dtype="uint8", nodata=255, **profile
    ) as lbl:
        for i, band in enumerate(("blue", "green", "red", "nir"), start=1):
            img.set_band_description(i, band)
        for r0 in range(0, height, block):
            for c0 in range(0, width, block):
                h, w = min(block, height - r0), min(block, width - c0)
                rows, cols = np.arange(r0, r0 + h), np.arange(c0, c0 + w)
                labels = fields[np.searchsorted(row_cuts, rows, side="right")][:, np.searchsorted(col_cuts, cols, side="right")]
                labels = labels.astype(np.uint8)
                for kind, cls, px in ((2, 1, hedge), (1, 3, road)):
                    labels[lines(row_cuts, row_kind, rows, kind, px)[:, None] & np.ones(w, bool)[None]] = cls
                    labels[np.ones(h, bool)[:, None] & lines(col_cuts, col_kind, cols, kind, px)[None]] = cls
                for y0, amplitude, wavelength, phase in rivers:
                    centre = y0 + amplitude * np.sin(2 * np.pi * cols / wavelength + phase)
                    labels[np.abs(rows[:, None] - centre[None]) < river / 2] = 0
                gain = 1.0 + _field(light, rows.astype(np.float64), cols.astype(np.float64), 384)[0]
                brng = np.random.default_rng([seed, r0, c0, 1])
                sig = _SIGNATURES[labels].transpose(2, 0, 1)
                data = sig * gain[None] * (1.0 + brng.normal(scale=noise, size=sig.shape))
                win = RioWindow(c0, r0, w, h)
                img.write(np.clip(data, 1, 65535).astype(np.uint16), window=win)
                lbl.write(labels[None], window=win)
        lbl.update_tags(classes=",".join(DEMO_CLASSES))
    return SyntheticScene(image_path, labels_path, height, width)
