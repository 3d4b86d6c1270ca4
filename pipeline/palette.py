"""Class colours shared by the COG colour table and the HTML report, so a class looks the same in both.

The first 20 classes take a fixed qualitative palette (matplotlib's tab10,
then the lighter tab20 shades); further classes take hues a golden angle
apart at alternating lightness, up to the 255 classes a uint8 mask holds.
"""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["class_colours", "NODATA_COLOUR"]

NODATA_COLOUR = (0, 0, 0, 0)
"""RGBA of the mask's nodata value (255): transparent."""

_QUALITATIVE = [
    "1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf",
    "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5",
]


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB, all rows distinct."""
    if not 0 <= num_classes <= 255:
        raise ValueError(f"a uint8 mask holds 0 to 255 classes (got {num_classes})")
    colours = [tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in _QUALITATIVE[:num_classes]]
    seen = set(colours)
    k = 0
    while len(colours) < num_classes:
        hue = (k * 0.618033988749895) % 1.0
        light = (0.45, 0.6, 0.35, 0.7)[(k // 7) % 4]
        rgb = tuple(int(round(255 * v)) for v in colorsys.hls_to_rgb(hue, light, 0.75))
        k += 1
        if rgb not in seen:
            seen.add(rgb)
            colours.append(rgb)
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)
