"""Object work on one chunk, where its pixels are: connected components, instance segments, polygons.

Chunk tasks (``pipeline/objects.py``) call these on a chunk's class map; the
merge across chunks and the id rule are pure (``pipeline/core/objects.py``).
Polygons are pixel-exact: GDAL's polygonize (``rasterio.features.shapes``)
traces pixel edges in pixel coordinates, where every vertex is an integer, so
pieces of one object from different chunks share their edges exactly and
their union (GEOS) is exact too; only then do they go to map units.
"""

from __future__ import annotations

import warnings
from array import array
from collections.abc import Sequence
from itertools import chain

import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.objects import CONNECTIVITIES, ChunkSegments
from schemas.errors import SpecError

__all__ = [
    "OBJECTS_EXTRA",
    "KEY_CLASSES",
    "MAX_INSTANCE_ID",
    "require_shapely",
    "label_components",
    "segment_stats",
    "border_labels",
    "chunk_segments",
    "instance_segments",
    "polygon_pieces",
    "union_pieces",
    "map_polygons",
]

OBJECTS_EXTRA = "pip install 'satseg[objects]'"

# rasterio's polygonize sometimes warns, from Dask's threads, that its in-memory rasters have no georeference (they
# need none: pixel coordinates are meant). Muted for that module and warning only, once at import: a
# warnings.catch_warnings block around each call would race between threads.
warnings.filterwarnings("ignore", message="Dataset has no geotransform", module=r"rasterio\.features")


def require_shapely():
    """shapely, or one line saying how to get it (the `objects` extra): checked before a job with `things` runs."""
    try:
        import shapely
    except ImportError:
        raise SpecError(f"objects need shapely for their polygons; {OBJECTS_EXTRA}") from None
    if not hasattr(shapely, "orient_polygons"):  # 2.1's, which `map_polygons` needs: an older one fails only at the end
        raise SpecError(f"objects need shapely 2.1 or later for their polygons (shapely {shapely.__version__} is installed); "
                        f"{OBJECTS_EXTRA}")
    return shapely


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity is 4 or 8, not {connectivity}")
    return np.ones((3, 3), bool) if connectivity == 8 else np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def label_components(classes: np.ndarray, things: Sequence[int], connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Local labels (int32, 0: no object) of each thing class's connected components, and each label's class.

    Classes in the order of ``things``, components in scipy's order: the same pixels always get the same labels.
    """
    from scipy import ndimage

    structure = _structure(connectivity)
    labels = np.zeros(classes.shape, dtype=np.int32)
    label_classes, n = [], 0
    for c in things:
        where = classes == c
        if not where.any():
            continue
        lab, k = ndimage.label(where, structure=structure, output=np.int32)
        labels[where] = lab[where] + n
        label_classes.append(np.full(k, c, dtype=np.int16))
        n += k
    return labels, np.concatenate(label_classes) if label_classes else np.zeros(0, np.int16)


def segment_stats(window: Window, labels: np.ndarray, n: int, scene_width: int, values: np.ndarray | None = None):
    """Each local label's (1..n) first pixel (the scene's linear index), pixels, value sum and box in scene coordinates.

    ``values`` (per pixel, integers) are summed per label, e.g. the stored probability of the pixel's class.
    Returns ``first``, ``pixels``, ``value_sum`` (int64, n each) and ``bbox`` (n, 4: first row, first column, last
    row, last column, inclusive).
    """
    flat = labels.ravel()
    w = labels.shape[1]
    at = np.flatnonzero(flat)
    order = np.argsort(flat[at], kind="stable")  # by label, and within a label in row-major order
    pos = at[order]
    starts = np.flatnonzero(np.diff(flat[pos], prepend=0))  # every label 1..n holds a pixel, so one start each
    ends = np.append(starts[1:], len(pos)) - 1
    pixels = (ends - starts + 1).astype(np.int64)
    value_sum = np.zeros(n, dtype=np.int64)
    if values is not None and n:
        value_sum = np.add.reduceat(values.ravel()[pos].astype(np.int64), starts)
    rows, cols = pos // w, pos % w
    first = ((rows[starts] + window.row_off) * scene_width + cols[starts] + window.col_off).astype(np.int64)
    bbox = np.zeros((n, 4), dtype=np.int64)
    if n:
        bbox[:, 0], bbox[:, 2] = rows[starts], rows[ends]  # row-major: the first pixel is on the top row, the last on the bottom
        bbox[:, 1], bbox[:, 3] = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts)
    bbox += [window.row_off, window.col_off, window.row_off, window.col_off]
    return first, pixels, value_sum, bbox


def border_labels(labels: np.ndarray) -> np.ndarray:
    """The local labels (ascending, int64) of segments with a pixel on the chunk's border: they may go on next door."""
    ring = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).astype(np.int64)
    return np.unique(ring[ring > 0])


def chunk_segments(
    window: Window, labels: np.ndarray, label_classes: np.ndarray, scene_width: int, values: np.ndarray | None = None,
) -> ChunkSegments:
    """What merging needs of a chunk's labels: its border segments one by one, its inner ones counted per row."""
    n = len(label_classes)
    first, pixels, value_sum, bbox = segment_stats(window, labels, n, scene_width, values)
    edge = border_labels(labels)
    inner = np.ones(n, dtype=bool)
    inner[edge - 1] = False
    inner_first = np.sort(first[inner])
    edge_first = first[edge - 1]
    row_start = (edge_first // scene_width) * scene_width
    before = np.searchsorted(inner_first, edge_first) - np.searchsorted(inner_first, row_start)
    inner_rows = np.bincount(inner_first // scene_width - window.row_off, minlength=labels.shape[0]).astype(np.int32)
    edges = (labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())
    return ChunkSegments(
        window, edge, np.asarray(label_classes, np.int16)[edge - 1], edge_first, pixels[edge - 1], value_sum[edge - 1],
        bbox[edge - 1], before.astype(np.int64), inner_rows, edges,
    )


KEY_CLASSES = 256
"""An instance segment's key is ``raster id * 256 + class``: one id over two classes is two segments."""

MAX_INSTANCE_ID = np.iinfo(np.int64).max // KEY_CLASSES
"""The largest id an instance raster may hold (2^55 - 1), so its key fits in int64."""


def instance_segments(classes: np.ndarray, ids: np.ndarray, things: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local labels (int32) of an instance raster's segments in a chunk: pixels of one thing class and one id > 0.

    Returns the labels, each label's class, and its key (``id * KEY_CLASSES + class``); labels follow the keys' order.
    """
    ids = np.asarray(ids).astype(np.int64)
    on = np.isin(classes, np.asarray(list(things), dtype=classes.dtype)) & (ids > 0)
    key = np.where(on, ids * KEY_CLASSES + classes.astype(np.int64), -1)
    unique, inverse = np.unique(key, return_inverse=True)
    inverse = inverse.reshape(classes.shape)
    if len(unique) and unique[0] == -1:
        unique, labels = unique[1:], inverse.astype(np.int32)
    else:
        labels = (inverse + 1).astype(np.int32)
    return labels, (unique % KEY_CLASSES).astype(np.int16), unique


def polygon_pieces(ids: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Each 4-connected run of one id in a chunk as a polygon (holes kept) in scene pixel coordinates (x: column, y: row).

    Returns the piece ids (int64) and the shapely polygons (an object array); ids of 0 are no object.
    """
    from rasterio import Affine
    from rasterio.features import shapes

    shapely = require_shapely()
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) > np.iinfo(np.int32).max:
        raise ValueError("more than 2^31 - 1 objects in a scene: polygons cannot be traced")
    found = array("q")
    where = ids > 0
    if not where.any():
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    # traced at twice pixel size and halved after, exactly (integers): the chunk at the origin would have the identity
    # transform, which rasterio warns about; muting that with warnings.catch_warnings is not safe in Dask's threads
    transform = Affine(2, 0, 2 * window.col_off, 0, 2, 2 * window.row_off)
    points = array("d")  # x, y, x, y, ...: 16 bytes a vertex, where a list of tuples would hold about 100
    ring_sizes, ring_owner = array("q"), array("q")
    for k, (geom, value) in enumerate(shapes(ids.astype(np.int32), mask=where, connectivity=4, transform=transform)):
        for ring in geom["coordinates"]:  # the shell first, then the holes
            points.extend(chain.from_iterable(ring))
            ring_sizes.append(len(ring))
            ring_owner.append(k)
        found.append(int(value))
    # built at once (shapely's vectorised constructors): a polygon object each would cost more than tracing them
    xy = np.frombuffer(points, dtype=np.float64).reshape(-1, 2) / 2
    rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(ring_sizes)), np.frombuffer(ring_sizes, np.int64)))
    return np.frombuffer(found, np.int64).copy(), shapely.polygons(rings, indices=np.frombuffer(ring_owner, np.int64))


def union_pieces(pieces: list):
    """One object from its pixel-exact pieces: a Polygon (or, 8-connected across corners, a MultiPolygon)."""
    shapely = require_shapely()
    return pieces[0] if len(pieces) == 1 else shapely.union_all(pieces)


def map_polygons(geoms, transform: Sequence[float], simplify: float | None) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Pixel-coordinate polygons in the scene CRS: WKB (exteriors counter-clockwise), perimeters, and boxes.

    ``transform`` is the scene's affine (a, b, c, d, e, f) as rasterio writes it. Vertices
    where a polygon runs straight on (seams of pieces) are dropped and rings normalised,
    so an object's polygon is the same, vertex for vertex, for any chunking. The
    perimeter (every ring) is the pixel-exact polygon's, in map units; ``simplify`` (map
    units, topology kept) thins what is stored. Boxes are (xmin, ymin, xmax, ymax) of what is stored.
    """
    shapely = require_shapely()
    if not len(geoms):
        return [], np.zeros(0), np.zeros((0, 4))
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    # one canonical form whatever the chunking: no collinear vertices (pieces' seams), rings and starts normalised
    arr = shapely.normalize(shapely.simplify(np.asarray(geoms, dtype=object), 0))
    mapped = shapely.transform(
        arr, lambda xy: np.stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f], axis=1)
    )
    perimeter = shapely.length(mapped)
    if simplify:
        mapped = shapely.simplify(mapped, simplify, preserve_topology=True)
    mapped = shapely.orient_polygons(mapped, exterior_cw=False)
    return list(shapely.to_wkb(mapped, byte_order=1)), perimeter, shapely.bounds(mapped)
