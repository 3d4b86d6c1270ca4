"""STAC Items as inputs: a scene's bands picked from an item's assets by name, stacked on the fly without a copy.

Sentinel-2 and Landsat publish one file per band (Cloud-Optimised GeoTIFFs). A STAC Item lists them as assets;
``stac_bands: [blue, green, red, nir]`` picks one asset per band, by the band's common name (STAC 1.0's
``eo:bands[].common_name``, STAC 1.1's ``bands[].eo:common_name``), else by asset key, and stacks them in that
order as VRT text (GDAL's virtual raster, XML) whose sources are the assets' own GDAL paths. Every reader opens
that text as it opens a file, so only the windows a chunk needs are ever fetched.

The assets share the grid of the one with the most pixels: same CRS and extent, checked with
`workers.reader.grid_difference`; an asset of a coarser resolution over the same extent (Sentinel-2's 20 m
bands beside its 10 m ones) is resampled to that grid by nearest neighbour, so its values stay as stored.
An item is a local JSON file or an http(s) URL; relative hrefs resolve against the item's location.
Only nodata values travel into the stack; an asset's mask band or alpha band does not.
"""

from __future__ import annotations

import html
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from schemas.errors import InputFileError, first_line
from schemas.rasters import gdal_path
from schemas.specfile import excerpt
from workers.reader import VRT_NAME_KEY, SceneInfo, check_bands, grid_difference, open_scene

__all__ = ["MAX_ITEM_BYTES", "StacBand", "read_item", "select_bands", "stacked_vrt", "open_stac_scene"]

MAX_ITEM_BYTES = 16 << 20
"""Largest STAC item read (an item is a few kB; a search result of thousands of items is not an item)."""

FETCH_TIMEOUT_S = 60.0
"""How long fetching an item over http(s) may wait for its server."""

_COG = "profile=cloud-optimized"
_GDAL_TYPES = {
    "uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
    "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64",
}


@dataclass(frozen=True)
class StacBand:
    """One band of the stack: the name asked for, the asset chosen for it, and which band of that asset's file."""

    name: str
    asset: str  # the asset's key
    href: str  # resolved: a local path, or a URL / GDAL path as written
    band: int  # 1-based, in the asset's file


def _is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme.lower() in ("http", "https")


def read_item(location: str) -> dict:
    """The STAC Item at ``location`` (a local JSON file or an http(s) URL); anything else is one `InputFileError` line."""
    if _is_url(location):
        raw = _fetch(location)
    elif gdal_path(location) is not None:
        raise InputFileError(
            f"{location}: a STAC item is read from a local JSON file or an http(s) URL; give one of those "
            "(its assets may be anywhere GDAL reads)"
        )
    else:
        path = Path(location)
        if not path.exists():
            raise InputFileError(f"{location}: STAC item not found; check the path")
        if path.is_dir():
            raise InputFileError(f"{location}: is a folder, not a STAC item; give the item's JSON file")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_ITEM_BYTES + 1)
        except OSError as err:
            raise InputFileError(f"{location}: cannot read the STAC item ({err.strerror or first_line(err)}); check its permissions") from None
    if len(raw) > MAX_ITEM_BYTES:
        raise InputFileError(f"{location}: larger than {MAX_ITEM_BYTES >> 20} MiB, not one STAC item; give one item's JSON")
    try:
        item = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: nested beyond any item's depth
        raise InputFileError(f"{location}: not a STAC item (not JSON: {excerpt(first_line(err), 80)}); give an item's JSON") from None
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "FeatureCollection":
        raise InputFileError(f"{location}: a FeatureCollection (a search result), not one STAC item; give one item's own JSON")
    if kind == "Collection" or kind == "Catalog":
        raise InputFileError(f"{location}: a STAC {kind}, not an item; give one of its items")
    if kind != "Feature" or not isinstance(item.get("assets"), dict):
        raise InputFileError(
            f"{location}: not a STAC item (an item is a GeoJSON Feature with `assets`); give a STAC item's JSON"
        )
    return item


def _fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/geo+json, application/json"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (http(s) only, checked)
            return response.read(MAX_ITEM_BYTES + 1)
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            raise InputFileError(f"{url}: STAC item not found (HTTP {err.code}); check the URL") from None
        if err.code in (401, 403):
            raise InputFileError(f"{url}: access denied to the STAC item (HTTP {err.code}); give a URL the server lets you read") from None
        raise InputFileError(f"{url}: the STAC item's server answered HTTP {err.code}; check the URL, or retry later") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise InputFileError(
            f"{url}: cannot reach the STAC item ({excerpt(first_line(str(reason)), 120)}); check the URL, and that its server answers"
        ) from None


def _asset_bands(asset: dict) -> list[dict]:
    """An asset's band objects: STAC 1.1's ``bands``, else the eo extension's ``eo:bands`` (STAC 1.0)."""
    for key in ("bands", "eo:bands"):
        bands = asset.get(key)
        if isinstance(bands, list) and bands:
            return [b if isinstance(b, dict) else {} for b in bands]
    return []


def _common_name(band: dict) -> str | None:
    name = band.get("eo:common_name", band.get("common_name"))
    return name.lower() if isinstance(name, str) else None


def _resolve_href(href: str, location: str) -> str:
    """An asset's href as a raster path: a URL as written, a relative href against the item's location."""
    if gdal_path(href) is not None:
        return href
    if _is_url(location):
        return urllib.parse.urljoin(location, href)
    parts = urllib.parse.urlsplit(href)
    if parts.scheme.lower() == "file":
        return urllib.parse.unquote(parts.path)
    local = urllib.parse.unquote(href)
    return local if os.path.isabs(local) else os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(location)), local))


def select_bands(item: dict, location: str, names: list[str]) -> list[StacBand]:
    """The asset of each band name, in order: by common name (one-band assets first, then the asset whose key is
    the name, then Cloud-Optimised GeoTIFFs, then item order), else the asset whose key is the name."""
    assets = {k: a for k, a in item["assets"].items() if isinstance(a, dict) and isinstance(a.get("href"), str)}
    chosen = []
    for name in names:
        wanted = name.lower()
        found = []
        for order, (key, asset) in enumerate(assets.items()):
            bands = _asset_bands(asset)
            for i, band in enumerate(bands):
                if _common_name(band) == wanted:
                    rank = (len(bands) > 1, key.lower() != wanted, _COG not in str(asset.get("type", "")), order)
                    found.append((rank, key, i + 1))
        if not found:
            found = [((key != name, order), key, 1) for order, key in enumerate(assets) if key.lower() == wanted]
        if not found:
            raise InputFileError(f"{location}: no asset of band {name!r}; {_available(assets)}")
        _, key, band = min(found)
        chosen.append(StacBand(name, key, _resolve_href(assets[key]["href"], location), band))
    return chosen


def _available(assets: dict) -> str:
    """What a band may be named in this item: its common names and its asset keys, briefly."""
    common = sorted({c for a in assets.values() for b in _asset_bands(a) if (c := _common_name(b))})
    keys = list(assets)
    return (
        f"common names here: {excerpt(', '.join(common) or 'none', 160)}; asset keys: {excerpt(', '.join(keys) or 'none', 160)}; "
        "give stac_bands from those"
    )


def _on_grid(info: SceneInfo, grid: SceneInfo) -> SceneInfo:
    """``info`` as it would be resampled to ``grid``'s shape over its own extent (unchanged when the shapes agree)."""
    if (info.height, info.width) == (grid.height, grid.width):
        return info
    sx, sy = info.width / grid.width, info.height / grid.height
    a, b, c, d, e, f = info.transform
    return replace(info, height=grid.height, width=grid.width, transform=(a * sx, b * sy, c, d * sx, e * sy, f))


def _number(value: float) -> str:
    return "nan" if value != value else repr(float(value))


def stacked_vrt(name: str, grid: SceneInfo, bands: list[StacBand], infos: dict[str, SceneInfo], dtype: str) -> str:
    """VRT text stacking ``bands`` on ``grid`` (each band's source: its asset's GDAL path), named ``name`` in messages."""
    esc = lambda text: html.escape(str(text), quote=True)  # noqa: E731
    a, b, c, d, e, f = grid.transform
    lines = [f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">']
    if grid.crs:
        lines.append(f"  <SRS>{esc(grid.crs)}</SRS>")
    lines.append(f"  <GeoTransform>{', '.join(_number(v) for v in (c, a, b, f, d, e))}</GeoTransform>")
    lines.append(f'  <Metadata><MDI key="{VRT_NAME_KEY}">{esc(name)}</MDI></Metadata>')
    for k, band in enumerate(bands, start=1):
        info = infos[band.href]
        lines.append(f'  <VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="{k}">')
        lines.append(f"    <Description>{esc(band.name)}</Description>")
        if info.nodata is not None:
            lines.append(f"    <NoDataValue>{_number(info.nodata)}</NoDataValue>")
        lines += [
            '    <SimpleSource resampling="nearest">',
            f'      <SourceFilename relativeToVRT="0">{esc(gdal_path(band.href) or band.href)}</SourceFilename>',
            f"      <SourceBand>{band.band}</SourceBand>",
            f'      <SrcRect xOff="0" yOff="0" xSize="{info.width}" ySize="{info.height}"/>',
            f'      <DstRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{grid.height}"/>',
            "    </SimpleSource>",
            "  </VRTRasterBand>",
        ]
    lines.append("</VRTDataset>")
    return "\n".join(lines)


def open_stac_scene(location: str, names: list[str], *, role: str = "image") -> SceneInfo:
    """A STAC item's bands ``names`` stacked as one scene: its metadata, with `SceneInfo.source` the VRT text to read.

    Each asset is opened once here (metadata only), so a missing or unreadable one, or one on another grid, is one
    line naming the item, the asset and the fix, before any work starts.
    """
    item = read_item(location)
    bands = select_bands(item, location, names)
    infos: dict[str, SceneInfo] = {}
    for band in bands:
        if band.href not in infos:
            try:
                infos[band.href] = open_scene(band.href, role=f"STAC asset {band.asset!r}")
            except InputFileError as err:
                raise InputFileError(f"{location}: asset {band.asset!r} ({band.name}): {err}") from None
        check_bands(infos[band.href], [band.band])
    first = bands[0]
    grid_band = max(bands, key=lambda b: (infos[b.href].height * infos[b.href].width, -bands.index(b)))
    grid = infos[grid_band.href]
    for band in bands:
        difference = grid_difference(grid, _on_grid(infos[band.href], grid))
        if difference is not None:
            raise InputFileError(
                f"{location}: asset {band.asset!r} ({band.name}) is not on the grid of asset {grid_band.asset!r} "
                f"({grid_band.name}): {difference}; pick bands that cover the same extent in the same CRS"
            )
    dtype = np.result_type(*{infos[b.href].dtype for b in bands}).name
    if dtype not in _GDAL_TYPES:
        raise InputFileError(f"{location}: the bands' pixel types ({', '.join(sorted({infos[b.href].dtype for b in bands}))}) "
                             "have no common type GDAL stacks; pick bands of real-valued types")
    name = f"{location} [{', '.join(b.name for b in bands)}]"
    vrt = stacked_vrt(name, grid, bands, infos, dtype)
    stacked = open_scene(vrt, role=role)
    return replace(stacked, path=location, source=vrt, nodata=infos[first.href].nodata)
