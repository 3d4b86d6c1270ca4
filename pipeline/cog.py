"""Export a Zarr mask store as a Cloud-Optimised GeoTIFF, for GIS tools that cannot read Zarr v3.

The mask is copied chunk by chunk into a tiled GeoTIFF beside the output
(never whole in memory), then GDAL's COG driver writes the final file:
512-pixel tiles, deflate, overviews with MODE resampling (nodata 255
ignored), a colour table with one colour per class (the report's colours)
and the class names in the tags. Both files are temporary until a final
rename, so an interrupted export leaves no half-written OUT.tif.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


from pipeline.core.metrics import MASK_NODATA
from pipeline.palette import NODATA_COLOUR, class_colours
from schemas.errors import OutputConflictError, SpecError
from schemas.store import replacing
from workers.mask_store import MaskStore, open_mask_store

__all__ = ["COG_BLOCK", "CogResult", "export_cog"]

COG_BLOCK = 512


@dataclass(frozen=True)
class CogResult:
    path: Path
    shape: tuple[int, int]
    class_names: list[str]
    overviews: list[int]  # decimation factors GDAL wrote


def _colormap(num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    colours = class_colours(num_classes)
    cmap = {i: (int(r), int(g), int(b), 255) for i, (r, g, b) in enumerate(colours)}
    cmap[MASK_NODATA] = NODATA_COLOUR
    return cmap


def _write_source(mask: MaskStore, path: Path) -> None:
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
        dst.write_colormap(1, _colormap(len(mask.class_names)))
        dst.set_band_description(1, "class")
        dst.update_tags(
            satseg_class_names=json.dumps(mask.class_names),
            satseg_nodata=str(MASK_NODATA),
            satseg_source=str(mask.path),
        )
        dst.update_tags(1, **{f"class_{i}": name for i, name in enumerate(mask.class_names)})


def export_cog(store: str | Path, out: str | Path, *, overwrite: bool = False) -> CogResult:
    """Write ``store``'s mask to ``out`` as a COG; refuse an existing ``out`` unless ``overwrite``."""
    import rasterio
    import rasterio.shutil

    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise SpecError(f"--cog {out}: a COG is a GeoTIFF; give a path ending in .tif")
    mask = open_mask_store(store, then="export")
    if out.exists() and not overwrite:
        raise OutputConflictError(f"{out}: already exists; pass --overwrite or choose another path")
    if not out.parent.is_dir():
        raise SpecError(f"--cog {out}: folder {out.parent} does not exist; create it or choose another path")
    source = out.parent / f".{out.name}.tmp-{os.getpid()}.src.tif"
    try:
        _write_source(mask, source)
        with replacing(out, "path") as cog:
            rasterio.shutil.copy(
                source, cog, driver="COG", BLOCKSIZE=COG_BLOCK, COMPRESS="DEFLATE", RESAMPLING="MODE",
                OVERVIEWS="IGNORE_EXISTING", BIGTIFF="IF_SAFER",
            )
    finally:
        for tmp in (source, source.with_name(source.name + ".aux.xml")):
            tmp.unlink(missing_ok=True)
    with rasterio.open(out) as src:
        factors = src.overviews(1)
    return CogResult(out, tuple(mask.array.shape), mask.class_names, factors)
