"""The HTML report's Objects section of a scene: object metrics per class, and the largest misses and false alarms
outlined on the mask.

Read from the object tables (``pipeline/object_tables.py``) and the mask store's
overview levels only: a scene of a million objects reads a few columns of its
tables, the polygons of the few it draws, and a decimated mask, never the scene.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from schemas.store import OutputLayout

__all__ = ["objects_section", "LARGEST", "MAP_SIDE", "FALSE_ALARM_COLOUR", "MISS_COLOUR"]

LARGEST = 10
"""How many of the largest misses and false alarms the section lists and draws."""
MAP_SIDE = 640
FALSE_ALARM_COLOUR = (228, 26, 28)
MISS_COLOUR = (255, 140, 0)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rows(path: Path, columns: list[str] | None = None, filters=None) -> list[dict]:
    return pq.read_table(path, columns=columns, filters=filters).to_pylist() if path.exists() else []


def _largest(path: Path, key: str, columns: list[str], filters) -> list[dict]:
    """The ``LARGEST`` rows by pixels of a table, reading only ``columns``, then the polygons of those rows alone.

    A row is its ``key`` and ``class_index``: an instance raster's id may be a true object in each of two classes.
    """
    if not path.exists():
        return []
    table = pq.read_table(path, columns=[key, "class_index", *columns], filters=filters)
    if not table.num_rows:
        return []
    pixels = table.column("pixels").to_numpy()
    top = table.take(np.argsort(-pixels, kind="stable")[:LARGEST]).to_pylist()
    if "geometry" in pq.read_schema(path).names:  # tables of schema 4 and before hold no polygon for misses
        wanted = [r[key] for r in top]
        shapes = pq.read_table(path, columns=[key, "class_index", "geometry"], filters=[(key, "in", wanted)]).to_pylist()
        geometry = {(r[key], r["class_index"]): r["geometry"] for r in shapes}
        for r in top:
            r["geometry"] = geometry.get((r[key], r["class_index"]))
    return top


def _draw_box(rgb: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, int, int], width: int = 2) -> None:
    """A rectangle's outline (display rows and columns, inclusive), at least a few pixels across so it shows."""
    h, w = rgb.shape[:2]
    r0, c0, r1, c1 = box
    grow = max(0.0, 3 - (r1 - r0)) / 2, max(0.0, 3 - (c1 - c0)) / 2
    r0, r1 = int(max(0, math.floor(r0 - grow[0]))), int(min(h - 1, math.ceil(r1 + grow[0])))
    c0, c1 = int(max(0, math.floor(c0 - grow[1]))), int(min(w - 1, math.ceil(c1 + grow[1])))
    rgb[r0 : r0 + width, c0 : c1 + 1] = colour
    rgb[max(r0, r1 - width + 1) : r1 + 1, c0 : c1 + 1] = colour
    rgb[r0 : r1 + 1, c0 : c0 + width] = colour
    rgb[r0 : r1 + 1, max(c0, c1 - width + 1) : c1 + 1] = colour


OUTLINE_MIN = 4
"""Objects under this many display pixels across are boxed (an outline that small would not show); others outlined."""


def _outline(rgb: np.ndarray, wkb: bytes, to_display, colour: tuple[int, int, int]) -> bool:
    """Draw a polygon's rings (map coordinates, WKB) on ``rgb``; False when it is too small to outline."""
    import shapely
    from PIL import Image, ImageDraw

    geom = shapely.from_wkb(wkb)
    rings = [ring for part in getattr(geom, "geoms", [geom]) for ring in (part.exterior, *part.interiors)]
    drawn = [to_display(np.asarray(ring.coords)) for ring in rings]
    ys, xs = np.concatenate([d[:, 0] for d in drawn]), np.concatenate([d[:, 1] for d in drawn])
    if ys.max() - ys.min() < OUTLINE_MIN and xs.max() - xs.min() < OUTLINE_MIN:
        return False
    image = Image.fromarray(rgb)
    pen = ImageDraw.Draw(image)
    for d in drawn:
        pen.line([(float(x), float(y)) for y, x in d], fill=colour, width=2)
    rgb[:] = np.asarray(image)
    return True


def _map(
    store: Path, class_names: list[str], shape: tuple[int, int], marks: list[tuple[dict, tuple[int, int, int]]],
) -> bytes | None:
    """The mask (decimated, from its overview levels) in its class colours, each mark outlined on it (boxed when tiny,
    or when its table holds no polygon)."""
    import rasterio
    import zarr

    from workers.mask_store import open_mask_store

    from pipeline.overviews import level_for_size, read_overview_levels
    from pipeline.palette import mask_colours
    from pipeline.quicklook import display_shape, mask_rgb, read_mask_samples, sample_positions
    from pipeline.report_figures import png

    if not Path(store).is_dir():
        return None
    h, w = shape
    out = display_shape(h, w, MAP_SIDE)
    level = level_for_size(read_overview_levels(store), max(out))
    rows, cols = sample_positions(0, h, out[0]), sample_positions(0, w, out[1])
    samples = read_mask_samples(zarr.open_array(str(store), path=level.path, mode="r"), rows, cols, level.factor)
    rgb, has = mask_rgb(samples, mask_colours(class_names, store))
    rgb[~has] = 255
    rgb = (0.55 * rgb + 0.45 * 255).astype(np.uint8)  # faded, so the boxes stand out
    sy, sx = out[0] / h, out[1] / w
    a, b, c, d, e, f = tuple(~rasterio.Affine(*open_mask_store(store, then="rerun satseg objects").transform))[:6]

    def to_display(xy: np.ndarray) -> np.ndarray:  # map coordinates -> display (row, column), on pixel edges
        cols, rows = a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f
        return np.stack([rows * sy - 0.5, cols * sx - 0.5], axis=1)

    for row, colour in marks:
        if row.get("geometry") is not None and _outline(rgb, row["geometry"], to_display, colour):
            continue
        r0, c0 = row["row_off"] * sy, row["col_off"] * sx
        _draw_box(rgb, (r0, c0, (row["row_off"] + row["height"]) * sy - 1, (row["col_off"] + row["width"]) * sx - 1), colour)
    return png(rgb)


def _swatch(colour: tuple[int, int, int], label: str) -> str:
    return f'<span class="swatch"><i style="background: rgb{colour}"></i>{_esc(label)}</span>'


def objects_section(
    layout: OutputLayout, job_id: str, scene: str, store: Path | None, shape: tuple[int, int], class_names: list[str],
    slug: str,
) -> str:
    """The scene's Objects section (empty when the job made no objects for it); ``shape`` is the scene's (h, w)."""
    objects_file = layout.report_file("objects", job_id, scene)
    if not objects_file.exists():
        return ""
    metrics = _rows(layout.report_file("object_metrics", job_id, scene))
    meta = pq.read_metadata(objects_file)
    parts = [f'<p class="small">{meta.num_rows:,} objects (one polygon each in the objects table)']
    marks: list = []
    if metrics:
        classes = [m for m in metrics if m["level"] == "class"]
        summary = {m["level"]: m for m in metrics if m["level"] != "class"}
        things = summary.get("things", {})
        parts[0] += (
            f"; things F1 {_fmt(things.get('f1'))} at IoU &gt; 0.5 (TP {_fmt(things.get('true_positives'))}, "
            f"FP {_fmt(things.get('false_positives'))}, FN {_fmt(things.get('false_negatives'))}); "
            f"PQ {_fmt(summary.get('all', {}).get('pq'))} (things {_fmt(things.get('pq'))}, "
            f"stuff {_fmt(summary.get('stuff', {}).get('pq'))}); {classes[0]['connectivity'] if classes else ''}-connected "
            f"objects against the labels' {_esc(classes[0]['truth'] if classes else '')}"
        )
        headers = ["class", "kind", "true", "predicted", "TP", "FP", "FN", "precision", "recall", "F1", "PQ", "SQ", "RQ"]
        table_rows = [
            [m["class_name"] if m["level"] == "class" else m["level"], m["kind"] or "", m["truth_segments"],
             m["predicted_segments"], m["true_positives"], m["false_positives"], m["false_negatives"], m["precision"],
             m["recall"], m["f1"], m["pq"], m["sq"], m["rq"]]
            for m in classes + [summary[k] for k in ("things", "stuff", "all") if k in summary]
        ]
        parts.append("</p>" + _table(headers, table_rows))
        box = ["class_name", "pixels", "iou", "row_off", "col_off", "height", "width"]
        alarms = _largest(objects_file, "object_id", box, [("matched", "=", False)])
        misses = _largest(layout.report_file("object_misses", job_id, scene), "truth_id", box, None)
        marks = [(r, FALSE_ALARM_COLOUR) for r in alarms] + [(r, MISS_COLOUR) for r in misses]
        for title, rows, key in (("Largest false alarms", alarms, "object_id"), ("Largest misses", misses, "truth_id")):
            if rows:
                parts.append(f"<h4>{title}</h4>" + _table(
                    ["id", "class", "pixels", "best IoU", "rows", "columns"],
                    [[r[key], r["class_name"], r["pixels"], r["iou"], f"{r['row_off']}–{r['row_off'] + r['height'] - 1}",
                      f"{r['col_off']}–{r['col_off'] + r['width'] - 1}"] for r in rows],
                ))
    else:
        parts[0] += "; no labels, so no object metrics</p>"
    image = _map(store, class_names, shape, marks) if store is not None else None
    if image is not None:
        uri = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
        legend = (
            f'<div class="legend">{_swatch(FALSE_ALARM_COLOUR, f"largest {LARGEST} false alarms")}'
            f'{_swatch(MISS_COLOUR, f"largest {LARGEST} misses")}</div>' if marks else ""
        )
        parts.append(f'<figure><img alt="{_esc(scene)} objects" src="{uri}"><figcaption>the mask, with the largest '
                     f"misses and false alarms outlined (boxed when too small to outline)</figcaption></figure>{legend}")
    body = "".join(parts)
    return f'<section class="panel" id="{_esc(slug)}-objects" data-section="objects"><h3>Objects</h3>{body}</section>'

