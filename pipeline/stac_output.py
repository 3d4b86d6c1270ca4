"""STAC metadata of a job's outputs: an Item per finished mask and a Collection per job, plain JSON.

``OUT/stac/items/<scene>.json`` describes one scene's mask (STAC 1.1.0):

- geometry and bbox: the raster's footprint in EPSG:4326 (edges densified, so
  a UTM footprint stays true; cut into a MultiPolygon at the antimeridian,
  bbox west > east there, as RFC 7946 says), none for a mask without a CRS;
- the projection extension (v2.0.0): ``proj:code``, ``proj:wkt2``,
  ``proj:shape``, ``proj:transform``, ``proj:bbox`` in the mask's own CRS;
- the classification extension (v1.1.0) on each raster asset: every class's
  value, name and ``color_hint``, and the nodata value 255 marked ``nodata``;
- assets: the Zarr mask store (and its probabilities), the COG with its QGIS
  style and GDAL sidecar once exported; links to the scene's Parquet reports
  and to the HTML report when they exist.

``OUT/stac/collection.json`` links every item, with the job's spatial and
temporal extent. Hrefs are relative, so the folder can move. Writing needs no
STAC library; tests validate the files with pystac against the official
schemas. Each file is replaced whole (``schemas.store.write_json``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.core.geometry import Window
from pipeline.palette import class_colours, colour_hex
from schemas.store import MASK_NODATA, OutputLayout, write_json
from workers.mask_store import MASK, PROBABILITIES, MaskStore, is_complete, open_mask_store
from workers.reader import SceneInfo

__all__ = [
    "STAC_VERSION", "PROJECTION_EXTENSION", "CLASSIFICATION_EXTENSION", "stac_classes", "write_scene_item",
    "write_collection", "write_stac", "refresh_stac", "add_cog_asset",
]

STAC_VERSION = "1.1.0"
PROJECTION_EXTENSION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
CLASSIFICATION_EXTENSION = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
ZARR_MEDIA_TYPE = "application/vnd+zarr"
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
_SCENE_TABLES = ("scenes", "classes", "tiles", "curves", "objects", "object_metrics", "object_misses")


def stac_classes(names: list[str], colours) -> list[dict]:
    """``classification:classes``: value, name and colour of each class, then the nodata value marked as nodata."""
    classes = [
        {"value": i, "name": name, "description": name, "color_hint": colour_hex(rgb)[1:]}
        for i, (name, rgb) in enumerate(zip(names, colours))
    ]
    classes.append({"value": MASK_NODATA, "name": "nodata", "description": "no data: no class, counted nowhere", "nodata": True})
    return classes


def _href(target: Path, start: Path) -> str:
    """``target`` relative to folder ``start`` (POSIX), so the output folder can move as a whole."""
    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _footprint(mask: MaskStore) -> tuple[dict | None, list[float] | None, list[float]]:
    """The mask's outline as a GeoJSON polygon in lon/lat and its bbox (None without a usable CRS), and its own-CRS bbox.

    The outline is the reports' (`pipeline.report_tables.footprints`: densified, reprojected), so both say one place.
    One that crosses the antimeridian is a MultiPolygon cut there and its bbox runs west > east (RFC 7946 §3.1.9, §5.2).
    """
    from pipeline.report_tables import footprints, polygon_rings

    h, w = mask.array.shape
    info = SceneInfo(str(mask.path), h, w, 1, "uint8", mask.crs.to_wkt() if mask.crs else None, tuple(mask.transform), None)
    whole = Window(0, 0, h, w)
    proj_bbox = [float(v) for v in info.bounds(whole)]
    foot = footprints(info, [whole])[0]
    if foot.lonlat is None:
        return None, None, proj_bbox
    polygons = []
    for xy in polygon_rings(foot.lonlat):
        ring = [[round(float(x), 9), round(float(y), 9)] for x, y in xy]
        area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
        if area < 0:  # GeoJSON's exterior rings run counterclockwise (RFC 7946)
            ring.reverse()
        polygons.append([ring])
    if len(polygons) == 1:
        geometry = {"type": "Polygon", "coordinates": polygons[0]}
    else:  # cut at the antimeridian
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
    return geometry, [float(v) for v in foot.bbox], proj_bbox


def _scene_row(layout: OutputLayout, job_id: str, scene: str) -> dict:
    path = layout.report_file("scenes", job_id, scene)
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return rows[0] if rows else {}


def _raster_asset(href: str, media_type: str, title: str, roles: list[str], classes: list[dict]) -> dict:
    return {"href": href, "type": media_type, "title": title, "roles": roles, "classification:classes": classes}


def _cog_assets(cog: Path, folder: Path, classes: list[dict]) -> dict:
    """The COG and the two files beside it that say what its values mean."""
    from pipeline.cog import COG_MEDIA_TYPE, cog_sidecars

    assets = {"cog": _raster_asset(_href(cog, folder), COG_MEDIA_TYPE, "class mask (Cloud-Optimised GeoTIFF)", ["data", "visual"], classes)}
    categories, style = cog_sidecars(cog)
    if style.exists():
        assets["cog_style"] = {"href": _href(style, folder), "type": "application/xml", "title": "QGIS style (paletted, class names)", "roles": ["metadata"]}
    if categories.exists():
        assets["cog_categories"] = {
            "href": _href(categories, folder), "type": "application/xml",
            "title": "GDAL PAM sidecar: category names and attribute table", "roles": ["metadata"],
        }
    return assets


def _exported_cog(item_path: Path) -> Path | None:
    """The COG an earlier export recorded in the item, if the file is still there."""
    try:
        href = json.loads(item_path.read_text())["assets"]["cog"]["href"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cog = (item_path.parent / href).resolve()
    return cog if cog.is_file() else None


def _collection_id(job_id: str) -> str:
    return f"satseg-{job_id}"


def _item(layout: OutputLayout, scene: str, mask: MaskStore, cog: Path | None) -> dict:
    item_path = layout.stac_item(scene)
    folder = item_path.parent
    colours = class_colours(mask.class_names, mask.class_colors)
    classes = stac_classes(mask.class_names, colours)
    h, w = mask.array.shape
    geometry, bbox, proj_bbox = _footprint(mask)
    row = _scene_row(layout, mask.job_id, scene)
    finished = _iso(row["finished_at"]) if isinstance(row.get("finished_at"), datetime) else _now()
    epsg = mask.crs.to_epsg() if mask.crs is not None else None
    properties = {
        "title": f"{scene}: class mask",
        "datetime": finished,  # when the scene finished: satseg does not know the image's acquisition time
        "created": finished,
        "proj:code": f"EPSG:{epsg}" if epsg else None,
        "proj:wkt2": mask.crs.to_wkt(version="WKT2_2019") if mask.crs is not None else None,
        "proj:shape": [int(h), int(w)],
        "proj:transform": [float(v) for v in mask.transform[:6]],
        "proj:bbox": proj_bbox,
        "satseg:job_id": mask.job_id,
    }
    if row.get("model"):
        properties["satseg:model"] = row["model"]
    assets = {
        "mask": _raster_asset(
            _href(mask.path, folder), ZARR_MEDIA_TYPE, f"class mask (Zarr v3 group, array `{MASK}`; 255 = nodata)",
            ["data"], classes,
        ),
    }
    if mask.has_probabilities:
        assets["probabilities"] = {
            "href": _href(mask.path / PROBABILITIES, folder), "type": ZARR_MEDIA_TYPE,
            "title": "class probabilities (uint8, p = value / 255; class, y, x)", "roles": ["data"],
        }
    cog = cog or _exported_cog(item_path)
    if cog is not None:
        assets.update(_cog_assets(cog, folder, classes))
    collection = layout.stac_collection
    links = [
        {"rel": "collection", "href": _href(collection, folder), "type": "application/json"},
        {"rel": "parent", "href": _href(collection, folder), "type": "application/json"},
        {"rel": "root", "href": _href(collection, folder), "type": "application/json"},
    ]
    for table in _SCENE_TABLES:
        path = layout.report_file(table, mask.job_id, scene)
        if path.exists():
            links.append({"rel": "describedby", "href": _href(path, folder), "type": PARQUET_MEDIA_TYPE, "title": f"{table} report (Parquet)"})
    if layout.html_report.exists():
        links.append({"rel": "describedby", "href": _href(layout.html_report, folder), "type": "text/html", "title": "HTML report"})
    item = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [PROJECTION_EXTENSION, CLASSIFICATION_EXTENSION],
        "id": scene,
        "collection": _collection_id(mask.job_id),
        "geometry": geometry,
    }
    if bbox is not None:
        item["bbox"] = bbox
    item.update(properties=properties, links=links, assets=assets)
    return item


def write_scene_item(layout: OutputLayout, scene: str, *, cog: Path | None = None) -> Path:
    """Write the STAC item of a complete scene's mask (with ``cog`` as an asset, or the COG an earlier export recorded)."""
    mask = open_mask_store(layout.mask_store(scene), then="describe it")
    path = layout.stac_item(scene)
    write_json(path, _item(layout, scene, mask, Path(cog).resolve() if cog is not None else None))
    return path


def write_collection(layout: OutputLayout) -> Path | None:
    """Write the job's STAC collection over the items written so far; None when there are none yet."""
    items = []
    for path in sorted((layout.stac / "items").glob("*.json")):
        try:
            items.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    if not items:
        return None
    job_id = items[0][1].get("properties", {}).get("satseg:job_id", "job")
    boxes = [item["bbox"] for _, item in items if item.get("bbox")]
    spatial = [-180.0, -90.0, 180.0, 90.0]
    if boxes:  # west > east when the smallest range holding the items crosses 180° (RFC 7946 §5.2), as an item's own bbox may
        from pipeline.report_tables import lon_extent

        west, east = lon_extent(np.asarray(boxes, dtype=np.float64))
        spatial = [west, min(b[1] for b in boxes), east, max(b[3] for b in boxes)]
    times = sorted(item["properties"]["datetime"] for _, item in items)
    folder = layout.stac_collection.parent
    links = [{"rel": "root", "href": "./collection.json", "type": "application/json"}]
    links += [{"rel": "item", "href": _href(path, folder), "type": "application/geo+json", "title": item["id"]} for path, item in items]
    if layout.html_report.exists():
        links.append({"rel": "describedby", "href": _href(layout.html_report, folder), "type": "text/html", "title": "HTML report"})
    collection = {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": _collection_id(job_id),
        "title": f"satseg job {job_id}",
        "description": f"Class masks of satseg job {job_id}: {len(items)} scene(s), one item each.",
        "license": "other",
        "extent": {"spatial": {"bbox": [spatial]}, "temporal": {"interval": [[times[0], times[-1]]]}},
        "links": links,
    }
    write_json(layout.stac_collection, collection)
    return layout.stac_collection


def write_stac(layout: OutputLayout, scenes: Iterable[str]) -> list[Path]:
    """The items of ``scenes`` that are complete, then the collection: what `satseg run` writes at its end."""
    items = [write_scene_item(layout, s) for s in scenes if is_complete(layout.mask_store(s))]
    if items:
        write_collection(layout)
    return items


def refresh_stac(layout: OutputLayout) -> list[Path]:
    """Rewrite a job folder's items and collection after a later command added to it (`satseg report`: the HTML
    report; `satseg objects`: the object tables), so their links say what is there now. Nothing outside a job folder."""
    if not layout.job_file.is_file() or not layout.masks.is_dir():
        return []
    return write_stac(layout, sorted(p.name[: -len(".zarr")] for p in layout.masks.glob("*.zarr")))


def add_cog_asset(store: Path, cog: Path) -> Path | None:
    """Record an exported COG in its scene's item, when ``store`` is ``OUT/masks/<scene>.zarr`` of a job folder."""
    store = Path(store).resolve()
    if store.parent.name != "masks" or not store.name.endswith(".zarr"):
        return None
    layout = OutputLayout(store.parent.parent)
    scene = store.name[: -len(".zarr")]
    if not layout.job_file.exists() or layout.mask_store(scene).resolve() != store:
        return None
    item = write_scene_item(layout, scene, cog=cog)
    write_collection(layout)
    return item
