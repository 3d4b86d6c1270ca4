"""Class colours: the one rule for what colour a class has, in every output (mask store, COG, QGIS style, STAC, report).

A colour given in the job (``classes: [{name: water, color: "#1f78b4"}, ...]``)
wins. Every other class takes the default palette: the first 20 classes a fixed
qualitative palette (matplotlib's tab10, then the lighter tab20 shades), further
classes hues a golden angle apart at alternating lightness, up to the 255
classes a uint8 mask holds; a default colour that a given one already took is
replaced by the next unused one, so classes stay apart. A finished mask store
carries its resolved colours (``class_colors``), so later outputs never depend
on this module's defaults changing.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np

from schemas.job import parse_color

__all__ = ["class_colours", "class_colour_hexes", "colour_hex", "mask_colours", "NODATA_COLOUR"]

NODATA_COLOUR = (0, 0, 0, 0)
"""RGBA of the mask's nodata value (255): transparent."""

_QUALITATIVE = [
    "1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf",
    "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5",
]


def _defaults(count: int) -> list[tuple[int, int, int]]:
    """The default palette's first ``count`` colours, all distinct."""
    colours = [tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in _QUALITATIVE[:count]]
    seen = set(colours)
    k = 0
    while len(colours) < count:
        hue = (k * 0.618033988749895) % 1.0
        light = (0.45, 0.6, 0.35, 0.7)[(k // 7) % 4]
        rgb = tuple(int(round(255 * v)) for v in colorsys.hls_to_rgb(hue, light, 0.75))
        k += 1
        if rgb not in seen:
            seen.add(rgb)
            colours.append(rgb)
    return colours


def _rgb(colour: object) -> tuple[int, int, int]:
    h = parse_color(colour)
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def class_colours(classes: int | Sequence[str], colours: Sequence[object | None] | None = None) -> np.ndarray:
    """(n, 3) uint8 RGB of ``classes`` (a count, or the names): given ``colours`` (``#rrggbb`` or [r, g, b], None for
    none) win, the others take the default palette. Without given colours, all rows are distinct."""
    n = classes if isinstance(classes, int) else len(classes)
    if not 0 <= n <= 255:
        raise ValueError(f"a uint8 mask holds 0 to 255 classes (got {n})")
    given = [_rgb(c) if c is not None else None for c in list(colours or [])[:n]]
    given += [None] * (n - len(given))
    taken = {c for c in given if c is not None}
    defaults = _defaults(n + len(taken))
    spare = iter(c for c in defaults[n:] if c not in taken)
    out = [g if g is not None else (defaults[i] if defaults[i] not in taken else next(spare)) for i, g in enumerate(given)]
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


def colour_hex(rgb: Sequence[int]) -> str:
    """``#rrggbb`` of an RGB triple."""
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


def class_colour_hexes(classes: int | Sequence[str], colours: Sequence[object | None] | None = None) -> list[str]:
    """`class_colours` as ``#rrggbb`` strings: what a mask store, a QGIS style and a STAC item carry."""
    return [colour_hex(c) for c in class_colours(classes, colours)]


def mask_colours(names: Sequence[str], mask: str | Path | None) -> np.ndarray:
    """The colours a mask carries (a satseg store's ``class_colors``, a satseg COG's colour table), else the defaults.

    The one function the HTML report and the quicklooks call, so they show the colours of the outputs they describe.
    """
    stored = None
    if mask is not None and Path(mask).is_dir():
        from workers.mask_store import MASK, stored_class_colors

        store = Path(mask).parent if Path(mask).name == MASK else Path(mask)  # STORE.zarr/mask: its store
        stored = stored_class_colors(store)
    elif mask is not None and Path(mask).is_file():
        from pipeline.cog import cog_classes

        found = cog_classes(Path(mask))
        stored = found[1] if found is not None else None
    if stored is not None and len(stored) != len(names):
        stored = None  # a mask evaluated under another class list: its colours do not describe these classes
    try:
        return class_colours(list(names), stored)
    except ValueError:
        return class_colours(list(names))  # a colour attribute edited by hand into nonsense: the defaults
