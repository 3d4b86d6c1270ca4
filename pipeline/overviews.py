"""Overview levels of a mask store: 2x mode (majority) downsampling per level, until a level fits.

Level ``k`` is the 2x2 mode of level ``k - 1``: nodata (255) is ignored
unless a whole 2x2 block is nodata, and ties go to the smallest class, so
the result does not depend on chunking or on the order chunks finish in.
Level 0 stays the store's ``mask`` array, so existing readers keep working;
level ``k`` is the array ``k/mask`` in child group ``k`` (with its own
``x``/``y`` coordinates and CRS, so ``xr.open_zarr(store, group="k")``
opens it georeferenced).

The root group describes the pyramid twice, for the two conventions tools
read: GeoZarr's ``multiscales`` (zarr-conventions/multiscales v1, composed
with ``spatial:`` and ``proj:``: one layout entry per level, each derived
from the level above, with its relative ``transform`` and absolute
``spatial:transform``/``spatial:shape``) and OME-NGFF 0.5's
``ome.multiscales`` (``datasets`` with ``scale`` and ``translation``
coordinate transformations, in level-0 pixel units, pixel centres).

Each level is computed with Dask from the level stored above it, chunk by
chunk, so memory stays bounded by a few chunks whatever the scene size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.metrics import MASK_NODATA
from workers.mask_store import MASK, consolidate, create_level_array, zarr_georeference

__all__ = [
    "OVERVIEW_SIZE",
    "OVERVIEW_CHUNK",
    "OverviewLevel",
    "mode_downsample",
    "overview_shapes",
    "write_overviews",
    "read_overview_levels",
    "level_for_size",
]

OVERVIEW_SIZE = 512
"""Levels are added until the coarsest one is at most this many pixels on its longer side."""

OVERVIEW_CHUNK = 512
"""Zarr chunk size of the overview arrays."""

_MULTISCALES_CONVENTION = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/multiscales/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/multiscales/blob/v1/README.md",
    "uuid": "d35379db-88df-4056-af3a-620245f8e347",
    "name": "multiscales",
    "description": "Multiscale layout of zarr datasets",
}
_PROJ_CONVENTION = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/proj/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/proj/blob/v1/README.md",
    "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
    "name": "proj:",
    "description": "Coordinate reference system information for geospatial data",
}
_SPATIAL_CONVENTION = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
    "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
    "name": "spatial:",
    "description": "Spatial coordinate information",
}


_PYRAMID_KEYS = ("zarr_conventions", "multiscales", "ome", "spatial:dimensions", "spatial:bbox", "spatial:registration",
                 "proj:code", "proj:wkt2")


@dataclass(frozen=True)
class OverviewLevel:
    """One level of the pyramid: where its array is, its shape, and its pixel grid."""

    level: int
    path: str  # array path inside the store: "mask" for level 0, "k/mask" for level k
    shape: tuple[int, int]
    factor: int  # level-0 pixels per level pixel along each axis: 2**level
    transform: tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f (rasterio order)


def mode_downsample(block: np.ndarray, nodata: int = MASK_NODATA) -> np.ndarray:
    """2x2 mode of a uint8 class map; odd edges use the pixels they have.

    Nodata counts only when a whole block is nodata; ties go to the smallest class.
    """
    h, w = block.shape
    padded = np.full((h + h % 2, w + w % 2), nodata, dtype=np.uint8)
    padded[:h, :w] = block
    values = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).transpose(0, 2, 1, 3).reshape(
        padded.shape[0] // 2, padded.shape[1] // 2, 4
    )
    counts = (values[..., :, None] == values[..., None, :]).sum(axis=-1, dtype=np.int16)
    counts[values == nodata] = 0
    # One key per candidate: more votes first, then the smaller class; nodata candidates score 0.
    key = counts * 256 + (255 - values.astype(np.int16))
    winner = np.argmax(key, axis=-1)
    out = np.take_along_axis(values, winner[..., None], axis=-1)[..., 0]
    out[key.max(axis=-1) < 256] = nodata
    return out


def overview_shapes(height: int, width: int, max_size: int = OVERVIEW_SIZE) -> list[tuple[int, int]]:
    """Shapes of levels 1, 2, ...: halve (rounding up) until the longer side is at most ``max_size``."""
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1 (got {max_size})")
    shapes = []
    h, w = height, width
    while max(h, w) > max_size:
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w))
    return shapes


def _read_block(store: str, path: str, block_info=None) -> np.ndarray:
    import zarr

    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return zarr.open_array(store, path=path, mode="r")[r0:r1, c0:c1]


def _write_block(block: np.ndarray, store: str, path: str, block_info=None) -> np.ndarray:
    import zarr

    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    zarr.open_array(store, path=path, mode="r+")[r0:r1, c0:c1] = block
    return np.ones((1, 1), dtype=np.int64)


def _stored(store: Path, path: str, shape: tuple[int, int], chunks: tuple[int, int]):
    """A stored array as Dask blocks read by path: the graph holds strings, not Zarr objects, so it runs on Ray too."""
    import dask.array as da

    norm = da.core.normalize_chunks(chunks, shape)
    return da.map_blocks(_read_block, str(store), path, dtype=np.uint8, chunks=norm, meta=np.empty((0, 0), np.uint8))


def _next_level(above, store: Path, path: str, chunk: tuple[int, int]) -> None:
    """Compute one level from the Dask array of the level above and write it, one Zarr chunk per block."""
    out_chunks = tuple(tuple(-(-c // 2) for c in axis) for axis in above.chunks)
    level = above.map_blocks(mode_downsample, dtype=np.uint8, chunks=out_chunks, meta=np.empty((0, 0), np.uint8))
    level = level.rechunk(chunk)  # blocks = the level's Zarr chunks: one writer per chunk
    grid = tuple((1,) * len(axis) for axis in level.chunks)
    written = level.map_blocks(_write_block, str(store), path, dtype=np.int64, chunks=grid, meta=np.empty((0, 0), np.int64))
    written.sum().compute()


def _level_transform(base: tuple, factor: int) -> tuple[float, ...]:
    a, b, c, d, e, f = base
    return (a * factor, b * factor, c, d * factor, e * factor, f)


def _bbox(level: OverviewLevel) -> list[float]:
    a, b, c, d, e, f = level.transform
    h, w = level.shape
    xs = [c, c + a * w + b * h]
    ys = [f, f + d * w + e * h]
    return [min(xs), min(ys), max(xs), max(ys)]


def _multiscales_attrs(levels: list[OverviewLevel], crs) -> dict:
    layout = []
    for lv in levels:
        entry = {"asset": lv.path, "spatial:shape": list(lv.shape), "spatial:transform": list(lv.transform)}
        if lv.level == 0:
            entry["transform"] = {"scale": [1.0, 1.0], "translation": [0.0, 0.0]}
        else:
            entry.update(
                derived_from=levels[lv.level - 1].path,
                transform={"scale": [2.0, 2.0], "translation": [0.0, 0.0]},
                resampling_method="mode",
            )
        layout.append(entry)
    attrs = {
        "zarr_conventions": [_MULTISCALES_CONVENTION, _SPATIAL_CONVENTION] + ([_PROJ_CONVENTION] if crs else []),
        "multiscales": {"layout": layout, "resampling_method": "mode"},
        "spatial:dimensions": ["y", "x"],
        "spatial:bbox": _bbox(levels[0]),
        "spatial:registration": "pixel",
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "name": "mask",
                    "type": "mode",
                    "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": [
                        {
                            "path": lv.path,
                            "coordinateTransformations": [
                                {"type": "scale", "scale": [float(lv.factor)] * 2},
                                {"type": "translation", "translation": [(lv.factor - 1) / 2] * 2},
                            ],
                        }
                        for lv in levels
                    ],
                    "metadata": {
                        "description": "2x2 mode of the level above; nodata 255 ignored unless a whole block is "
                        "nodata; ties go to the smallest class. Units: level-0 pixels (centres).",
                    },
                }
            ],
        },
    }
    if crs:
        epsg = crs.to_epsg()
        attrs["proj:code" if epsg else "proj:wkt2"] = f"EPSG:{epsg}" if epsg else crs.to_wkt()
    return attrs


def write_overviews(store: Path, *, max_size: int = OVERVIEW_SIZE) -> list[OverviewLevel]:
    """Add mode-downsampled levels to a complete mask store and describe them; returns every level, 0 first.

    Runs on the active Dask scheduler (threads, or Ray's on a cluster). Levels of an earlier call are replaced.
    """
    import zarr

    store = Path(store)
    crs, transform = zarr_georeference(store, MASK)
    base = zarr.open_array(str(store), path=MASK, mode="r")
    height, width = base.shape
    read_chunks = tuple(c + c % 2 for c in base.chunks)  # even: a 2x2 block never straddles two Dask blocks
    root = zarr.open_group(str(store), mode="r+")
    # Forget the old pyramid before touching its levels, so an interrupted call never describes missing levels.
    root.attrs.put({k: v for k, v in root.attrs.items() if k not in _PYRAMID_KEYS})
    for name in [k for k in root.group_keys() if k.isdigit()]:
        del root[name]
    levels = [OverviewLevel(0, MASK, (height, width), 1, transform)]
    for level, shape in enumerate(overview_shapes(height, width, max_size), start=1):
        factor = 2**level
        lv = OverviewLevel(level, f"{level}/{MASK}", shape, factor, _level_transform(transform, factor))
        chunk = create_level_array(store, level, shape, lv.transform, crs, OVERVIEW_CHUNK)
        above = levels[-1]
        _next_level(_stored(store, above.path, above.shape, read_chunks), store, lv.path, chunk)
        read_chunks = (2 * OVERVIEW_CHUNK, 2 * OVERVIEW_CHUNK)  # levels >= 1 are read two chunks a side at a time
        levels.append(lv)
    root = zarr.open_group(str(store), mode="r+")
    root.attrs.update(_multiscales_attrs(levels, crs))
    consolidate(store)
    return levels


def read_overview_levels(store: Path) -> list[OverviewLevel]:
    """The levels a store describes; level 0 alone when it has no ``multiscales`` yet."""
    import zarr

    layout = (zarr.open_group(str(store), mode="r").attrs.get("multiscales") or {}).get("layout")
    if not layout:
        shape = tuple(zarr.open_array(str(store), path=MASK, mode="r").shape)
        return [OverviewLevel(0, MASK, shape, 1, zarr_georeference(store, MASK)[1])]
    return [
        OverviewLevel(
            i, e["asset"], tuple(int(v) for v in e["spatial:shape"]), 2**i, tuple(float(v) for v in e["spatial:transform"])
        )
        for i, e in enumerate(layout)
    ]


def level_for_size(levels: list[OverviewLevel], target: int) -> OverviewLevel:
    """The coarsest level whose longer side still has at least ``target`` pixels (else level 0)."""
    best = levels[0]
    for lv in levels:
        if max(lv.shape) >= target:
            best = lv
    return best
