"""Export a Zarr mask store as a Cloud-Optimised GeoTIFF, for GIS tools that cannot read Zarr v3.

The mask is copied chunk by chunk into a tiled GeoTIFF beside the output
(never whole in memory), then GDAL's COG driver writes the final file:
512-pixel tiles, deflate, overviews with MODE resampling (nodata 255
ignored), a colour table with the store's class colours, and the class names
and colours in the tags. Two files beside it say what the values mean:

- ``OUT.tif.aux.xml``: GDAL's PAM sidecar with the band's category names and a
  thematic raster attribute table (value, class, red, green, blue, alpha);
  GDAL reads both when it opens OUT.tif (``gdalinfo`` lists them, QGIS 3.30+
  shows the table).
- ``OUT.qml``: a QGIS style, a paletted renderer with each class's value,
  colour and name; QGIS applies a ``.qml`` of the raster's base name when it
  loads the raster, so the legend shows class names, not 0..4.

Every file is temporary until a final rename, so an interrupted export leaves
no half-written OUT.tif; the sidecars are renamed first, the COG last.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.metrics import MASK_NODATA
from pipeline.palette import NODATA_COLOUR, class_colours, colour_hex
from schemas.errors import OutputConflictError, SpecError
from schemas.store import replacing
from workers.mask_store import MaskStore, open_mask_store

__all__ = ["COG_BLOCK", "COG_MEDIA_TYPE", "CogResult", "cog_sidecars", "cog_classes", "export_cog", "qgis_style", "pam_categories"]

COG_BLOCK = 512
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
_NAMES_TAG, _COLOURS_TAG = "satseg_class_names", "satseg_class_colors"


@dataclass(frozen=True)
class CogResult:
    path: Path
    shape: tuple[int, int]
    class_names: list[str]
    overviews: list[int]  # decimation factors GDAL wrote
    style: Path | None = None  # the QGIS style beside it
    categories: Path | None = None  # GDAL's PAM sidecar with category names and attribute table
    stac_item: Path | None = None  # the scene's STAC item, updated when the store lies in a job's output folder


def cog_sidecars(out: Path) -> tuple[Path, Path]:
    """The files beside a COG: GDAL's PAM sidecar (``OUT.tif.aux.xml``) and the QGIS style (``OUT.qml``)."""
    out = Path(out)
    return out.with_name(out.name + ".aux.xml"), out.with_suffix(".qml")


def _colormap(colours) -> dict[int, tuple[int, int, int, int]]:
    cmap = {i: (int(r), int(g), int(b), 255) for i, (r, g, b) in enumerate(colours)}
    cmap[MASK_NODATA] = NODATA_COLOUR
    return cmap


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""Characters XML 1.0 cannot hold, even escaped (control characters): ElementTree writes them as they are."""


def _xml_text(text: str) -> str:
    """``text`` as XML can hold it: a character it cannot written as its Python escape (``\\x01``), visibly."""
    return _NOT_XML.sub(lambda m: ascii(m.group())[1:-1], text)


def _xml(root: ET.Element, doctype: str = "") -> bytes:
    """The document as UTF-8: ElementTree escapes ``<``, ``&`` and quotes; a class name's control character becomes text."""
    for element in root.iter():
        if element.text:
            element.text = _xml_text(element.text)
        for key, value in element.attrib.items():
            element.attrib[key] = _xml_text(value)
    ET.indent(root)
    return (doctype + ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")


def qgis_style(names: list[str], colours) -> bytes:
    """A QGIS layer style (``.qml``): a paletted renderer, one entry per class (value, colour, name); nodata transparent."""
    qgis = ET.Element("qgis", version="3.28.0", styleCategories="AllStyleCategories")
    pipe = ET.SubElement(qgis, "pipe")
    renderer = ET.SubElement(
        pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1", nodataColor=""
    )
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for i, (name, rgb) in enumerate(zip(names, colours)):
        ET.SubElement(palette, "paletteEntry", value=str(i), color=colour_hex(rgb), alpha="255", label=name)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", invertColors="0")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(qgis, "blendMode").text = "0"
    return _xml(qgis, "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n")


def pam_categories(names: list[str], colours) -> bytes:
    """GDAL's PAM sidecar for band 1: category names (value i is ``names[i]``) and a thematic attribute table."""
    pam = ET.Element("PAMDataset")
    band = ET.SubElement(pam, "PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for name in names:
        ET.SubElement(categories, "Category").text = name
    rat = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    # GDAL's field types (0 integer, 2 string) and usages (5 min-max value, 2 name, 6-9 red, green, blue, alpha)
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9)]
    for k, (field, kind, usage) in enumerate(fields):
        defn = ET.SubElement(rat, "FieldDefn", index=str(k))
        ET.SubElement(defn, "Name").text = field
        ET.SubElement(defn, "Type").text = str(kind)
        ET.SubElement(defn, "Usage").text = str(usage)
    for i, (name, (r, g, b)) in enumerate(zip(names, colours)):
        row = ET.SubElement(rat, "Row", index=str(i))
        for value in (i, name, int(r), int(g), int(b), 255):
            ET.SubElement(row, "F").text = str(value)
    return _xml(pam)


@contextmanager
def _quiet_without_georeference():
    """A mask of a plain image (no CRS, identity transform) is written and read quietly, as the reader opened the image."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def cog_classes(path: str | Path) -> tuple[list[str], list[str]] | None:
    """The class names and colours (``#rrggbb``) a satseg COG carries in its tags; None for any other GeoTIFF."""
    import rasterio

    try:
        with _quiet_without_georeference(), rasterio.open(path) as src:
            tags = src.tags()
            cmap = src.colormap(1) if src.count >= 1 and src.colorinterp[0].name == "palette" else {}
    except (rasterio.errors.RasterioError, OSError, ValueError):
        return None
    try:
        names = json.loads(tags.get(_NAMES_TAG, "null"))
    except ValueError:
        return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    try:
        colours = json.loads(tags.get(_COLOURS_TAG, "null"))
    except ValueError:
        colours = None
    if not isinstance(colours, list) or len(colours) != len(names):
        colours = [colour_hex(cmap[i]) if i in cmap else None for i in range(len(names))]
    return names, list(colours)


def _write_source(mask: MaskStore, path: Path, colours) -> None:
    """A tiled GeoTIFF of the mask, written one Zarr chunk at a time."""
    import rasterio
    from rasterio.windows import Window

    h, w = mask.array.shape
    ch, cw = mask.array.chunks
    profile = dict(
        driver="GTiff", height=h, width=w, count=1, dtype="uint8", nodata=MASK_NODATA, crs=mask.crs,
        transform=rasterio.Affine(*mask.transform), tiled=True, blockxsize=COG_BLOCK, blockysize=COG_BLOCK,
        compress="deflate", bigtiff="if_safer",
    )
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, h, ch):
            for c0 in range(0, w, cw):
                r1, c1 = min(r0 + ch, h), min(c0 + cw, w)
                dst.write(mask.array[r0:r1, c0:c1], 1, window=Window(c0, r0, c1 - c0, r1 - r0))
        dst.write_colormap(1, _colormap(colours))
        dst.set_band_description(1, "class")
        dst.update_tags(
            **{_NAMES_TAG: json.dumps(mask.class_names), _COLOURS_TAG: json.dumps([colour_hex(c) for c in colours])},
            satseg_nodata=str(MASK_NODATA),
            satseg_source=str(mask.path),
        )
        dst.update_tags(1, **{f"class_{i}": name for i, name in enumerate(mask.class_names)})


def export_cog(store: str | Path, out: str | Path, *, overwrite: bool = False) -> CogResult:
    """Write ``store``'s mask to ``out`` as a COG with its two sidecars; refuse an existing ``out`` unless ``overwrite``.

    When the store lies in a job's output folder, the scene's STAC item gains the COG as an asset.
    """
    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise SpecError(f"--cog {out}: a COG is a GeoTIFF; give a path ending in .tif")
    mask = open_mask_store(store, then="export")
    if out.exists() and not overwrite:
        raise OutputConflictError(f"{out}: already exists; pass --overwrite or choose another path")
    if not out.parent.is_dir():
        raise SpecError(f"--cog {out}: folder {out.parent} does not exist; create it or choose another path")
    colours = class_colours(mask.class_names, mask.class_colors)
    categories, style = cog_sidecars(out)
    source = out.parent / f".{out.name}.tmp-{os.getpid()}.src.tif"
    with _quiet_without_georeference():
        factors = _write_cog(mask, source, out, colours)
    from pipeline.stac_output import add_cog_asset

    item = add_cog_asset(Path(store), out)
    return CogResult(out, tuple(mask.array.shape), mask.class_names, factors, style, categories, item)


def _write_cog(mask: MaskStore, source: Path, out: Path, colours) -> list[int]:
    """The COG through a tiled temporary copy of the mask, then its sidecars, then its name; the overviews GDAL wrote."""
    import rasterio
    import rasterio.shutil

    categories, style = cog_sidecars(out)
    try:
        _write_source(mask, source, colours)
        with replacing(out, "path") as cog:
            rasterio.shutil.copy(
                source, cog, driver="COG", BLOCKSIZE=COG_BLOCK, COMPRESS="DEFLATE", RESAMPLING="MODE",
                OVERVIEWS="IGNORE_EXISTING", BIGTIFF="IF_SAFER",
            )
            for path, data in ((categories, pam_categories(mask.class_names, colours)), (style, qgis_style(mask.class_names, colours))):
                with replacing(path) as f:
                    f.write(data)
    finally:
        for tmp in (source, source.with_name(source.name + ".aux.xml")):
            tmp.unlink(missing_ok=True)
    with rasterio.open(out) as src:
        return src.overviews(1)
