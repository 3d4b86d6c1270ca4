"""Report assembly: tiles, classes, scenes, curves and aggregates tables from counts and metrics (pure), and writing them.

The tiles and scenes tables are GeoParquet 1.1 with one CRS for all rows:
footprints (a chunk's, a scene's) reprojected to longitude/latitude with
their edges densified, a ``bbox`` covering column, and each scene's own CRS
and native footprint beside them, so scenes in different UTM zones share one
geometry column that geopandas and DuckDB read with its CRS. A footprint that
crosses the antimeridian is cut there into a MultiPolygon (RFC 7946 §3.1.9)
and its bbox has xmin > xmax (RFC 7946 §5.2, which GeoParquet 1.1 follows for
both the ``bbox`` covering column and the file's column ``bbox``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.geometry import ChunkGrid, Window
from pipeline.core.metrics import PROBABILITY_LEVELS, SceneScores, boundary_iou, scene_scores, segmentation_metrics
from pipeline.counting import ChunkCounts
from schemas.reports import AGGREGATES, CLASSES, CURVES, SCENES, TILES
from schemas.store import OutputLayout, replacing
from workers.reader import SceneInfo

__all__ = [
    "Footprint",
    "footprints",
    "polygon_rings",
    "lon_extent",
    "epsg_code",
    "tiles_table",
    "classes_table",
    "scenes_table",
    "curves_table",
    "aggregates_table",
    "write_scene_reports",
    "histograms_from_curves",
    "scores_from_rows",
    "write_table",
]

EDGE_POINTS = 16
"""Segments per footprint edge when reprojecting: a straight edge in the scene CRS is a curve in lon/lat."""


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _list(a: np.ndarray | None) -> list[float | None] | None:
    return None if a is None else [_num(float(v)) for v in a]


def _polygon_wkb(xs: np.ndarray, ys: np.ndarray) -> bytes:
    """A closed ring as a little-endian WKB polygon (the ring as given: counter-clockwise here)."""
    ring = np.stack([xs, ys], axis=1).astype("<f8")
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return struct.pack("<BIII", 1, 3, 1, len(ring)) + ring.tobytes()


def _multipolygon_wkb(parts: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Closed rings, one polygon each, as a little-endian WKB multipolygon."""
    return struct.pack("<BII", 1, 6, len(parts)) + b"".join(_polygon_wkb(x, y) for x, y in parts)


def _signed_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Twice the signed area of a closed ring (positive: counter-clockwise)."""
    return float(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1]))


def _cut_at(xs: np.ndarray, ys: np.ndarray, cut: float) -> list[tuple[bool, np.ndarray, np.ndarray]] | None:
    """A simple closed ring cut by the line x = ``cut`` into closed rings, each on one side (None if it cannot be).

    Each ring comes as (east of the line, the index in the input of each of its points or -1 where it meets the line,
    and those points' y). The ring is walked into chains between its crossings of the line; along the line, the
    polygon's inside is between the 1st and 2nd crossing (by y), the 3rd and 4th, and so on, so each chain's end is
    joined to its partner there and on to the chain starting at that partner, until the ring closes. Rings keep the
    input's orientation.
    """
    x, y = xs[:-1], ys[:-1]
    n = len(x)
    east = x > cut  # a point on the line counts as west
    nxt = np.roll(np.arange(n), -1)
    edges = np.flatnonzero(east != east[nxt])  # edge j runs from point j to point j + 1 and crosses the line
    m = len(edges)
    if m < 2 or m % 2:
        return None
    j1 = nxt[edges]
    t = (cut - x[edges]) / (x[j1] - x[edges])
    cy = y[edges] + t * (y[j1] - y[edges])  # where each crossing lies on the line
    order = np.argsort(cy, kind="stable")
    partner = np.empty(m, dtype=np.int64)
    partner[order[0::2]], partner[order[1::2]] = order[1::2], order[0::2]
    chains = []  # chain k: from crossing k along the ring to crossing k + 1, all on one side
    for k in range(m):
        a, b = edges[k], edges[(k + 1) % m]
        idx = np.arange(a + 1, b + 1) if b > a else np.concatenate([np.arange(a + 1, n), np.arange(0, b + 1)])
        chains.append((np.concatenate([[-1], idx, [-1]]), np.concatenate([[cy[k]], y[idx], [cy[(k + 1) % m]]])))
    side = [bool(east[nxt[edges[k]]]) for k in range(m)]
    used = [False] * m
    rings = []
    for k in range(m):
        if used[k]:
            continue
        px, py, c = [], [], k
        while not used[c]:
            used[c] = True
            px.append(chains[c][0])
            py.append(chains[c][1])
            c = partner[(c + 1) % m]  # the chain ends at crossing c + 1; along the line to its partner, where the next starts
            if side[c] != side[k]:
                return None
        if c != k:
            return None
        ri, ry = np.concatenate(px), np.concatenate(py)
        rx = np.where(ri < 0, cut, x[ri])
        keep = np.ones(len(rx), dtype=bool)
        keep[1:] = (rx[1:] != rx[:-1]) | (ry[1:] != ry[:-1])  # a vertex on the line meets its crossing twice
        ri, rx, ry = ri[keep], rx[keep], ry[keep]
        if len(rx) > 1 and rx[-1] == rx[0] and ry[-1] == ry[0]:
            ri, rx, ry = ri[:-1], rx[:-1], ry[:-1]
        if len(rx) < 3 or _signed_area(np.append(rx, rx[0]), np.append(ry, ry[0])) == 0:
            continue  # a ring that only touches the line leaves nothing there
        rings.append((side[k], np.append(ri, ri[0]), np.append(ry, ry[0])))
    return sorted(rings, key=lambda r: r[0]) or None


def _antimeridian(lon: np.ndarray, lat: np.ndarray) -> tuple[bytes, tuple[float, float, float, float]] | None:
    """A lon/lat ring that crosses 180° as a MultiPolygon cut there, and its bbox with xmin > xmax (None: it does not).

    Crossing is a step of more than 180° between neighbouring points of the densified ring. A ring that only touches
    180° (some points at +180, the rest west of -170, say) becomes one polygon on the side it lies. A ring around a pole
    (its unwrapped longitudes do not close), or one the cut cannot split (points exactly on 180° where the outline
    touches itself), is left as it was.
    """
    if not (np.abs(np.diff(lon)) > 180).any():
        return None
    u = np.unwrap(lon, period=360.0)
    if abs(u[-1] - u[0]) > 180:
        return None
    if u.min() >= 180:
        u = u - 360.0
    elif u.max() <= -180:
        u = u + 360.0
    if u.min() >= -180 and u.max() <= 180:  # it touches 180° but does not cross it: only points at ±180 move, exactly
        x = lon + 360.0 * np.round((u - lon) / 360.0)
        return _polygon_wkb(x, lat), (float(x.min()), float(lat.min()), float(x.max()), float(lat.max()))
    if u.min() < -180:
        u = u + 360.0  # the line crossed is now +180, the ring east of 0
    rings = _cut_at(u, lat, 180.0)
    if rings is None:
        return None
    parts = []
    for east, ri, ry in rings:  # the input's own longitudes (not unwrapped and back: no rounding), on the part's side
        lon_at = lon[np.maximum(ri, 0)]
        rx = np.where(ri < 0, -180.0 if east else 180.0, np.where(lon_at > 0, lon_at - 360.0, lon_at) if east
                      else np.where(lon_at < 0, lon_at + 360.0, lon_at))
        if _signed_area(rx, ry) < 0:  # counter-clockwise, as the GeoParquet metadata says
            rx, ry = rx[::-1], ry[::-1]
        parts.append((east, rx, ry))
    if len(parts) == 1:  # the rest of the ring only touched the line
        (_, rx, ry), = parts
        return _polygon_wkb(rx, ry), (float(rx.min()), float(ry.min()), float(rx.max()), float(ry.max()))
    west = min(float(rx.min()) for east, rx, _ in parts if not east)
    east_end = max(float(rx.max()) for east, rx, _ in parts if east)
    return _multipolygon_wkb([(rx, ry) for _, rx, ry in parts]), (west, float(lat.min()), east_end, float(lat.max()))


def polygon_rings(wkb: bytes) -> list[np.ndarray]:
    """The outer rings ((n, 2) arrays) of a footprint's WKB: one for a Polygon, one per part of a MultiPolygon."""
    kind, count = struct.unpack_from("<II", wkb, 1)
    if kind == 3:
        return [np.frombuffer(wkb, "<f8", 2 * struct.unpack_from("<I", wkb, 9)[0], 13).reshape(-1, 2)]
    rings, at = [], 9
    for _ in range(count):  # each part: a one-ring polygon, as _polygon_wkb writes it
        n = struct.unpack_from("<I", wkb, at + 9)[0]
        rings.append(np.frombuffer(wkb, "<f8", 2 * n, at + 13).reshape(-1, 2))
        at += 13 + 16 * n
    return rings


def _window_ring(info: SceneInfo, window: Window, points: int) -> tuple[np.ndarray, np.ndarray]:
    """A window's outline in the scene CRS, counter-clockwise, ``points`` segments per edge, closed.

    A north-up grid's is its box (`_ring`); a rotated or sheared grid's is the window's pixel edges through the
    affine, a parallelogram, not the box around it.
    """
    a, b, c, d, e, f = (float(v) for v in info.transform[:6])
    if b == 0 and d == 0:
        return _ring(info.bounds(window), points)
    t = np.arange(points) / points
    c0, c1, r0, r1 = window.col_off, window.col_stop, window.row_off, window.row_stop
    cols = np.concatenate([c0 + (c1 - c0) * t, np.full(points, c1), c1 - (c1 - c0) * t, np.full(points, c0)])
    rows = np.concatenate([np.full(points, r0), r0 + (r1 - r0) * t, np.full(points, r1), r1 - (r1 - r0) * t])
    xs, ys = np.append(a * cols + b * rows + c, 0.0), np.append(d * cols + e * rows + f, 0.0)
    xs[-1], ys[-1] = xs[0], ys[0]
    if _signed_area(xs, ys) < 0:
        xs, ys = xs[::-1].copy(), ys[::-1].copy()
    return xs, ys


def _ring(box: tuple[float, float, float, float], points: int) -> tuple[np.ndarray, np.ndarray]:
    """A box's outline, counter-clockwise from (minx, miny), ``points`` segments per edge, closed."""
    minx, miny, maxx, maxy = box
    t = np.arange(points) / points
    xs = np.concatenate([minx + (maxx - minx) * t, np.full(points, maxx), maxx - (maxx - minx) * t, np.full(points, minx)])
    ys = np.concatenate([np.full(points, miny), miny + (maxy - miny) * t, np.full(points, maxy), maxy - (maxy - miny) * t])
    return np.append(xs, xs[0]), np.append(ys, ys[0])


@dataclass(frozen=True)
class Footprint:
    """Where a window of a scene lies: in lon/lat (None without a usable CRS) and in the scene CRS."""

    native: bytes
    lonlat: bytes | None
    bbox: tuple[float, float, float, float] | None  # lon/lat: (xmin, ymin, xmax, ymax)

    def columns(self, epsg: int | None) -> dict:
        """The footprint columns of a tiles or scenes row (see ``schemas.reports``)."""
        box = None if self.bbox is None else dict(zip(("xmin", "ymin", "xmax", "ymax"), self.bbox))
        return {"geometry": self.lonlat, "bbox": box, "geometry_native": self.native, "epsg": epsg}


def footprints(info: SceneInfo, windows: list[Window], points: int = EDGE_POINTS) -> list[Footprint]:
    """Each window's outline in the scene CRS and, densified and reprojected, in lon/lat (one transform call).

    A scene without a CRS, or whose CRS does not reach lon/lat, gets no lon/lat footprint. One that crosses the
    antimeridian is cut there (a MultiPolygon, parts within [-180, 180]) and its bbox runs west > east (RFC 7946).
    """
    native = [_window_ring(info, w, 1) for w in windows]
    lonlat: list = [None] * len(windows)
    if info.crs and windows:
        import rasterio.errors
        from rasterio.warp import transform

        rings = [_window_ring(info, w, points) for w in windows]
        xs, ys = np.concatenate([r[0] for r in rings]), np.concatenate([r[1] for r in rings])
        try:
            lon, lat = (np.asarray(v) for v in transform(info.crs, "OGC:CRS84", xs, ys))
        except (rasterio.errors.RasterioError, ValueError):
            lon = lat = None
        if lon is not None:
            lon = np.where(np.abs(lon) > 180.0, (lon + 180.0) % 360.0 - 180.0, lon)  # a lon/lat grid past 180°: wrapped
            n = 4 * points + 1
            for i in range(len(windows)):
                x, y = lon[i * n : (i + 1) * n], lat[i * n : (i + 1) * n]
                if np.isfinite(x).all() and np.isfinite(y).all():
                    lonlat[i] = (x, y)
    out = []
    for (nx, ny), ll in zip(native, lonlat):
        if ll is None:
            out.append(Footprint(_polygon_wkb(nx, ny), None, None))
        else:
            x, y = ll
            cut = _antimeridian(x, y)
            if cut is not None:
                out.append(Footprint(_polygon_wkb(nx, ny), *cut))
                continue
            box = (float(x.min()), float(y.min()), float(x.max()), float(y.max()))
            out.append(Footprint(_polygon_wkb(nx, ny), _polygon_wkb(x, y), box))
    return out


def epsg_code(crs_wkt: str | None) -> int | None:
    """The EPSG code of a CRS, when pyproj identifies one (None otherwise)."""
    if not crs_wkt:
        return None
    from pyproj import CRS

    return CRS.from_wkt(crs_wkt).to_epsg()


def lon_extent(boxes: np.ndarray) -> tuple[float, float]:
    """West and east of the smallest longitude range holding every box (boxes with xmin > xmax cross 180°).

    The complement of the widest gap between the boxes' longitude ranges on the circle: west > east when that range
    crosses 180° (RFC 7946 §5.2), as for boxes on both sides of it none of which crosses alone; otherwise the plain
    min and max.
    """
    west, east = boxes[:, 0], boxes[:, 2]
    spans = sorted([(w, e) for w, e in zip(west, east) if w <= e] + [(w, 180.0) for w, e in zip(west, east) if w > e]
                   + [(-180.0, e) for w, e in zip(west, east) if w > e])
    merged = [list(spans[0])]
    for w, e in spans[1:]:
        if w <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([w, e])
    gaps = [(merged[i + 1][0] - merged[i][1], i) for i in range(len(merged) - 1)]
    wrap = merged[0][0] + 360.0 - merged[-1][1]
    if not gaps or max(gaps)[0] <= wrap:
        return (-180.0, 180.0) if wrap <= 0 else (float(merged[0][0]), float(merged[-1][1]))
    i = max(gaps)[1]
    return float(merged[i + 1][0]), float(merged[i][1])


def _geo_metadata(boxes: list[tuple[float, float, float, float] | None], multipart: bool = False) -> bytes:
    """GeoParquet 1.1 metadata of ``geometry``: lon/lat, so no ``crs`` key (the spec's default, OGC:CRS84).

    ``multipart``: some footprint is a MultiPolygon (cut at the antimeridian); the column's bbox then follows RFC 7946
    §5.2 too (xmin > xmax when the footprints cross 180°), as GeoParquet 1.1 says for ``bbox`` and bbox columns.
    """
    column = {
        "encoding": "WKB",
        "geometry_types": ["MultiPolygon", "Polygon"] if multipart else ["Polygon"],
        "orientation": "counterclockwise",
        "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    known = [b for b in boxes if b is not None]
    if known:
        b = np.asarray(known)
        west, east = lon_extent(b)
        column["bbox"] = [west, float(b[:, 1].min()), east, float(b[:, 3].max())]
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()


def _with_geo(table: pa.Table, feet: list[Footprint | None]) -> pa.Table:
    boxes = [f.bbox if f else None for f in feet]
    multipart = any(f is not None and f.lonlat is not None and f.lonlat[1] == 6 for f in feet)  # WKB type 6: MultiPolygon
    return table.replace_schema_metadata({**table.schema.metadata, b"geo": _geo_metadata(boxes, multipart)})


def tiles_table(scene: str, grid: ChunkGrid, info: SceneInfo, counts: ChunkCounts) -> pa.Table:
    """One row per output chunk: its footprint, how many pixels, and how good (GeoParquet)."""
    rows = []
    cells = list(grid)
    feet = footprints(info, [grid.window(r, c) for r, c in cells])
    epsg = epsg_code(info.crs)
    for (r, c), foot in zip(cells, feet):
        win = grid.window(r, c)
        row = {
            "scene": scene,
            "chunk_row": r,
            "chunk_col": c,
            "row_off": win.row_off,
            "col_off": win.col_off,
            "height": win.height,
            "width": win.width,
            **foot.columns(epsg),
            "crs": info.crs,
            "valid_pixels": int(counts.valid[r, c]),
            "predicted_pixels": counts.predicted[r, c].tolist(),
        }
        if counts.confusion is not None:
            m = segmentation_metrics(counts.confusion[r, c])
            row.update(
                confusion=m.confusion.ravel().tolist(),
                labelled_pixels=m.valid_pixels,
                pixel_accuracy=_num(m.pixel_accuracy),
                mean_iou=_num(m.mean_iou),
                iou=_list(m.iou),
            )
        if counts.boundary is not None:
            b = boundary_iou(counts.boundary[r, c])
            row.update(boundary_iou=_list(b), mean_boundary_iou=_num(float(np.nanmean(b)) if np.isfinite(b).any() else float("nan")))
        rows.append(row)
    return _with_geo(pa.Table.from_pylist(rows, schema=TILES), feet)


def classes_table(scene: str, class_names: list[str], scores: SceneScores | None, predicted: np.ndarray) -> pa.Table:
    """One row per class of one scene; metric columns are null without labels (AP also without probabilities)."""
    rows = []
    for i, name in enumerate(class_names):
        row = {"scene": scene, "class_index": i, "class_name": name, "predicted_pixels": int(predicted[i])}
        if scores is not None:
            metrics = scores.metrics
            m = metrics.confusion
            row.update(
                truth_pixels=int(m[i].sum()),
                true_positives=int(m[i, i]),
                iou=_num(float(metrics.iou[i])),
                dice=_num(float(metrics.dice[i])),
                accuracy=_num(float(metrics.class_accuracy[i])),
                precision=_num(float(metrics.precision[i])),
                recall=_num(float(metrics.recall[i])),
            )
            if scores.boundary_counts is not None:
                gt, pr, inter = (int(v) for v in scores.boundary_counts[:, i])
                row.update(
                    boundary_truth_pixels=gt, boundary_predicted_pixels=pr, boundary_intersection=inter,
                    boundary_iou=_num(float(scores.boundary_iou[i])),
                )
            if scores.trimap_iou is not None:
                row["trimap_iou"] = _list(scores.trimap_iou[:, i])
            if scores.average_precision is not None:
                row["average_precision"] = _num(float(scores.average_precision[i]))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CLASSES)


def scenes_table(row: dict, scores: SceneScores | None, info: SceneInfo | None = None) -> pa.Table:
    """The one-row scenes table of a scene: provenance, footprint (from ``info``), sizes, timings and every scalar metric."""
    row = dict(row)
    foot = None
    if info is not None:
        foot = footprints(info, [Window(0, 0, info.height, info.width)])[0]
        row.update(foot.columns(epsg_code(info.crs)))
    if scores is not None:
        metrics = scores.metrics
        row.update({k: _num(v) for k, v in metrics.scalars().items()})
        row["labelled_pixels"] = metrics.valid_pixels
        row["confusion"] = metrics.confusion.ravel().tolist()
        row["mean_boundary_iou"] = _num(scores.mean_boundary_iou)
        row["mean_average_precision"] = _num(scores.mean_average_precision)
        row["trimap_miou"] = _list(scores.trimap_miou)
    return _with_geo(pa.Table.from_pylist([row], schema=SCENES), [foot])


def curves_table(scene: str, class_names: list[str], scores: SceneScores | None) -> pa.Table:
    """Precision-recall points per class, one per stored probability level that holds a pixel."""
    rows = []
    for i, curve in enumerate((scores.curves if scores is not None else None) or []):
        for k in range(len(curve.thresholds)):
            rows.append({
                "scene": scene, "class_index": i, "class_name": class_names[i], "threshold": float(curve.thresholds[k]),
                "precision": _num(float(curve.precision[k])), "recall": _num(float(curve.recall[k])),
                "true_positives": int(curve.true_positives[k]), "false_positives": int(curve.false_positives[k]),
            })
    return pa.Table.from_pylist(rows, schema=CURVES)


def histograms_from_curves(rows: list[dict], num_classes: int) -> np.ndarray:
    """The (2, C, 256) probability histograms a scene's curves were made from (cumulative counts, differenced)."""
    hist = np.zeros((2, num_classes, PROBABILITY_LEVELS), dtype=np.int64)
    last = {}
    for row in sorted(rows, key=lambda r: (r["class_index"], -r["threshold"])):
        c = row["class_index"]
        level = int(round(row["threshold"] * (PROBABILITY_LEVELS - 1)))
        tp0, fp0 = last.get(c, (0, 0))
        hist[0, c, level] = row["true_positives"] - tp0
        hist[1, c, level] = row["false_positives"] - fp0
        last[c] = (row["true_positives"], row["false_positives"])
    return hist


def scores_from_rows(scene: dict, classes: list[dict], curves: list[dict]) -> SceneScores | None:
    """A scene's scores from its rows in the scenes, classes and curves tables (exact: counts are stored)."""
    if scene.get("confusion") is None:
        return None
    confusion, boundary, hist = _scene_counts(scene, classes, curves)
    return scene_scores(confusion, boundary, None, hist)


def _scene_counts(scene: dict, classes: list[dict], curves: list[dict]) -> tuple:
    c = scene["num_classes"]
    confusion = np.asarray(scene["confusion"], dtype=np.int64).reshape(c, c)
    by_index = sorted(classes, key=lambda r: r["class_index"])
    boundary = None
    if by_index and all(r.get("boundary_truth_pixels") is not None for r in by_index):
        boundary = np.array(
            [[r[k] for r in by_index] for k in ("boundary_truth_pixels", "boundary_predicted_pixels", "boundary_intersection")],
            dtype=np.int64,
        )
    hist = histograms_from_curves(curves, c) if curves else None
    return confusion, boundary, hist


def _macro(values: list[float]) -> float | None:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    return _num(float(np.nanmean(v))) if np.isfinite(v).any() else None


def _macro_list(lists: list[np.ndarray | None]) -> list[float | None] | None:
    arrays = [a for a in lists if a is not None]
    if not arrays:
        return None
    stack = np.stack(arrays)
    out = np.full(stack.shape[1], np.nan)
    has = np.isfinite(stack).any(axis=0)
    out[has] = np.nanmean(stack[:, has], axis=0)
    return _list(out)


def aggregates_table(scenes: list[dict], classes: list[dict], curves: list[dict]) -> pa.Table:
    """Micro (counts pooled over scenes, then the metric) and macro (mean of the scenes' metrics) rows.

    Inputs are rows of the job's scenes, classes and curves tables; only scenes
    with labels count, and all must share one class list.
    """
    labelled = [s for s in scenes if s.get("confusion") is not None]
    if not labelled:
        return pa.Table.from_pylist([], schema=AGGREGATES)
    names = list(labelled[0]["class_names"])
    per_scene, hists = [], []
    for s in labelled:
        mine = [r for r in classes if r["scene"] == s["scene"]]
        confusion, boundary, hist = _scene_counts(s, mine, [r for r in curves if r["scene"] == s["scene"]])
        per_scene.append(scene_scores(confusion, boundary, None, hist))
        hists.append(hist)
    pooled_boundary = None if any(p.boundary_counts is None for p in per_scene) else sum(p.boundary_counts for p in per_scene)
    pooled_hist = None if any(h is None for h in hists) else sum(hists)
    micro = scene_scores(sum(p.metrics.confusion for p in per_scene), pooled_boundary, None, pooled_hist)
    rows = []
    for kind, scores in (("micro", micro), ("macro", None)):
        if scores is not None:
            m = scores.metrics
            row = {k: _num(v) for k, v in m.scalars().items()}
            row.update(
                iou=_list(m.iou), dice=_list(m.dice), boundary_iou=_list(scores.boundary_iou),
                average_precision=_list(scores.average_precision), mean_boundary_iou=_num(scores.mean_boundary_iou),
                mean_average_precision=_num(scores.mean_average_precision), confusion=m.confusion.ravel().tolist(),
            )
        else:
            row = {k: _macro([p.metrics.scalars()[k] for p in per_scene]) for k in per_scene[0].metrics.scalars()}
            row.update(
                iou=_macro_list([p.metrics.iou for p in per_scene]),
                dice=_macro_list([p.metrics.dice for p in per_scene]),
                boundary_iou=_macro_list([p.boundary_iou for p in per_scene]),
                average_precision=_macro_list([p.average_precision for p in per_scene]),
                mean_boundary_iou=_macro([p.mean_boundary_iou for p in per_scene]),
                mean_average_precision=_macro([p.mean_average_precision for p in per_scene]),
            )
        row.update(aggregate=kind, scenes=len(per_scene), class_names=names, labelled_pixels=sum(p.metrics.valid_pixels for p in per_scene))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=AGGREGATES)


def write_scene_reports(
    layout: OutputLayout, job_id: str, grid: ChunkGrid, info: SceneInfo, class_names: list[str],
    scores: SceneScores | None, counts: ChunkCounts, row: dict,
) -> None:
    """A scene's tiles, classes, curves and scenes tables, each replaced atomically; `satseg run` and `evaluate` share it.

    ``row`` is the scene's row of provenance and timings (``scene`` names it); the scenes table is written last.
    """
    name = row["scene"]
    write_table(tiles_table(name, grid, info, counts), layout.report_file("tiles", job_id, name))
    predicted = counts.predicted.sum(axis=(0, 1))
    write_table(classes_table(name, class_names, scores, predicted), layout.report_file("classes", job_id, name))
    write_table(curves_table(name, class_names, scores), layout.report_file("curves", job_id, name))
    write_table(scenes_table(row, scores, info), layout.report_file("scenes", job_id, name))


def write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file atomically, so a crash never leaves a half-written report."""
    with replacing(path, "path") as tmp:
        pq.write_table(table, tmp, compression="zstd")
