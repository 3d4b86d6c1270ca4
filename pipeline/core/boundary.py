"""Boundary bands of class maps, for boundary IoU (Cheng et al., CVPR 2021) and trimap IoU.

A mask's inner boundary band of width d is the set of its pixels within
Chebyshev distance d of a pixel outside it (d iterations of a 3x3 erosion);
the scene edge counts as outside. For a class map that is, per pixel: the
(2d+1)^2 window around it holds another value, or leaves the scene.

The trimap band of width w is the set of pixels within distance w of a true
class boundary (a change of label; the scene edge is not a boundary).

Boundary bands follow one of two conventions (``CONVENTIONS``):

- ``"neutral"`` (satseg's default): pixels that are scored nowhere (truth or
  prediction is no class: nodata, ``ignore_index``, a value outside the class
  list) are neutral in both maps: they neither make nor break a boundary, so
  unknown truth never moves a band.
- ``"reference"``: the official implementation's rule (Cheng et al.'s
  ``mask_to_boundary`` applied to each class's binary mask): a pixel that is no
  class is simply outside every class mask, so a class region bordering an
  ignored or nodata region has a boundary there, in each map by its own values.
  As ``cv2.copyMakeBorder(..., 0)`` does, the scene edge is background.

In both, the scene edge counts as outside (``OUTSIDE`` is a value of its own),
and which pixels are counted is the same (``metrics.boundary_counts``: pixels
where truth and prediction are classes, ARCHITECTURE.md invariant 5); only the
bands differ. The trimap band always follows the neutral rule.

Functions here work on a block padded by a halo of ``depth`` pixels on every
side, where pixels beyond the scene edge hold ``OUTSIDE``, and answer for the
block's centre. Given the halo from the neighbouring chunks (each chunk
task reads it, see ``pipeline/counting.py``), a chunk's answer equals the
whole-scene computation.
"""

from __future__ import annotations

from typing import get_args

import numpy as np

from schemas.errors import SpecError
from schemas.job import ScoringSpec

__all__ = [
    "OUTSIDE", "NOT_A_CLASS", "MAX_BAND_WIDTH", "CONVENTIONS", "boundary_width_for", "inner_band", "trimap_distance",
    "band_codes", "decode_codes",
]

OUTSIDE = -2  # value of the halo beyond the scene edge
NOT_A_CLASS = -1  # a truth pixel that is no class (nodata, ignore_index, a value outside the class list)
_LOW, _HIGH = np.iinfo(np.int16).min, np.iinfo(np.int16).max


MAX_BAND_WIDTH = 256  # the halo every chunk reads; wider bands are meant for tile-sized images, not scenes
CONVENTIONS = get_args(ScoringSpec.model_fields["boundary_convention"].annotation)  # ("neutral", "reference"), see above


def boundary_width_for(height: int, width: int, *, pixels: int = 3, ratio: float | None = None) -> int:
    """Band width in pixels: ``pixels``, or the paper's ``ratio`` of the image diagonal (at least 1)."""
    if ratio is None:
        return pixels
    d = max(1, int(round(ratio * float(np.hypot(height, width)))))
    if d > MAX_BAND_WIDTH:
        raise SpecError(
            f"boundary ratio {ratio} gives a {d} px band on this {height}x{width} scene (at most {MAX_BAND_WIDTH}); "
            "the ratio is meant for tile-sized images: give a width in pixels (--boundary-width)"
        )
    return d


def _grow(a: np.ndarray, op) -> np.ndarray:
    """One 3x3 max (op=np.maximum) or min (np.minimum) filter; beyond the array edge adds nothing."""
    rows = a.copy()
    op(rows[1:], a[:-1], out=rows[1:])
    op(rows[:-1], a[1:], out=rows[:-1])
    out = rows.copy()
    op(out[:, 1:], rows[:, :-1], out=out[:, 1:])
    op(out[:, :-1], rows[:, 1:], out=out[:, :-1])
    return out


def inner_band(padded: np.ndarray, neutral: np.ndarray | None, width: int, depth: int) -> np.ndarray:
    """Pixels of the block's centre within ``width`` of another (non-neutral) value or of the scene edge.

    ``neutral`` None: no pixel is neutral. The (2 width + 1)^2 max and min
    filters are ``width`` 3x3 steps: on int16 blocks that is several times
    faster than scipy's filters, with the same result.
    """
    a = padded.astype(np.int16, copy=False)
    if neutral is None:
        high = low = a  # _grow never writes into its argument
    else:
        high = np.where(neutral, _LOW, a)
        low = np.where(neutral, _HIGH, a)
    for _ in range(width):
        high = _grow(high, np.maximum)
        low = _grow(low, np.minimum)
    band = (high != low) & (high >= low)  # a window of neutral pixels only is no band
    return band[depth : band.shape[0] - depth, depth : band.shape[1] - depth]


def trimap_distance(padded: np.ndarray, neutral: np.ndarray, max_width: int, depth: int) -> np.ndarray:
    """Per centre pixel: the smallest w in 1..max_width whose trimap band holds it, else 0."""
    a = padded.astype(np.int16, copy=False)
    skip = neutral | (a == OUTSIDE)  # the scene edge is no boundary here
    high = np.where(skip, _LOW, a)
    low = np.where(skip, _HIGH, a)
    # Bands grow with w, so a pixel lies in the bands of widths dist..N: count them.
    held = np.zeros(a.shape, dtype=np.uint16)
    for _ in range(max_width):
        high = _grow(high, np.maximum)
        low = _grow(low, np.minimum)
        held += (high != low) & (high >= low)
    held[skip] = 0
    dist = np.where(held > 0, max_width + 1 - held, 0).astype(np.uint16)
    return dist[depth : a.shape[0] - depth, depth : a.shape[1] - depth]


def band_codes(
    truth: np.ndarray, pred: np.ndarray, *, width: int, trimap_max: int, depth: int, convention: str = "neutral"
) -> np.ndarray:
    """Per centre pixel, packed in uint16: truth band (bit 0), prediction band (bit 1), trimap distance (<< 2).

    ``truth`` and ``pred`` are padded blocks of class indices (-1: no class;
    ``OUTSIDE`` beyond the scene). ``convention`` "neutral": a pixel where
    either is no class is neutral in both boundary bands; "reference": no
    pixel is neutral, each band sees its own map's values (the trimap is neutral in both).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown boundary convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if width > depth or trimap_max > depth:
        raise ValueError(f"halo depth {depth} is smaller than the band width {max(width, trimap_max)}")
    if trimap_max >= 1 << 14:
        raise ValueError(f"trimap width {trimap_max} does not fit the 14 bits of the code")
    neutral = (truth == NOT_A_CLASS) | (pred == NOT_A_CLASS)
    shaping = neutral if convention == "neutral" else None
    codes = inner_band(truth, shaping, width, depth).astype(np.uint16)
    codes |= inner_band(pred, shaping, width, depth).astype(np.uint16) << 1
    if trimap_max:
        codes |= trimap_distance(truth, neutral, trimap_max, depth) << 2
    return codes


def decode_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth band, prediction band, trimap distance) from ``band_codes``."""
    return (codes & 1).astype(bool), (codes & 2).astype(bool), codes >> 2
