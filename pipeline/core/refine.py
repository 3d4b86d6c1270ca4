"""Refining stitched class probabilities: SLIC superpixel votes and mean-field CRF inference.

Both keep invariant 1 (ARCHITECTURE.md): a chunk's refined mask equals the whole scene's, bit for bit, because

- a chunk refines its *region*, the chunk grown by the halo the method's bounded number of iterations can reach
  (`refine_region`), clipped at the scene edge, and keeps only the chunk;
- every per-pixel result is the same operations in the same order whatever the array's extent: sums over a fixed
  list of neighbour offsets or candidates, elementwise IEEE operations only (no FFT, no reduction whose order
  depends on the array), an exponential built from +, x and exponent bits (`exp32`, since library ``exp``
  kernels round differently in their vector body and tail), and superpixel sums that are exact integers;
- positions are scene coordinates, the SLIC lattice is anchored at the scene origin, and pixels outside the scene
  or without data take part in nothing.

The same functions run on numpy arrays and on torch tensors on the model's device (invariant 8): the core never
imports torch, it only calls the tensors' own methods (as `stitch.py` does).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.metrics import MASK_NODATA
from pipeline.core.stitch import class_argmax
from schemas.refine import CRFOptions, SLICOptions

__all__ = [
    "RefineOptions", "refine_region", "refine_span", "refine_classes", "crf_refine", "crf_marginals", "slic_refine",
    "slic_superpixels", "slic_vote", "exp32",
]

RefineOptions = CRFOptions | SLICOptions

COLOR_QUANTUM = 256
"""SLIC reads colours as multiples of 1/256 of a band's standard deviation, so superpixel sums are exact integers."""

COLOR_LIMIT = float(1 << 15)
"""SLIC clips standardised colours to +-32768 standard deviations, so a superpixel's sums stay below 2**53."""

PROBABILITY_QUANTUM = 1 << 16
"""The mean vote sums probabilities as multiples of 1/65536: exact integers, in any order, on any device."""

CRF_KERNEL_CACHE_BYTES = 512 << 20
"""The CRF keeps its kernel weights between iterations when they fit this (default: a region of about 1.6 Mpx with the
default options); else it computes them again each iteration, 1.8x slower, with the same bits."""


# ---- the halo ------------------------------------------------------------------------------------------------------


def refine_span(start: int, stop: int, n: int, options: RefineOptions | None) -> tuple[int, int]:
    """Along one axis of ``n`` pixels, the refinement region of the pixels ``[start, stop)``.

    CRF: each iteration reads ``radius`` pixels further, so the region is the span grown by radius x iterations.
    SLIC: a pixel's label after K iterations depends on the lattice cells within 2K - 1 cells of its own, and a
    superpixel's pixels lie within 2 cells of any of its pixels' cells; so the region is the span's cells grown by
    2K + 1 cells (proof in `slic_superpixels`). Clipped to the scene: beyond its edge there is nothing to read.
    """
    if options is None:
        return start, stop
    if isinstance(options, CRFOptions):
        halo = options.kernel_radius * options.iterations
        return max(0, start - halo), min(n, stop + halo)
    s, reach = options.step, 2 * options.iterations + 1
    return max(0, (start // s - reach) * s), min(n, (-(-stop // s) + reach) * s)


def refine_region(chunk: Window, height: int, width: int, options: RefineOptions | None) -> Window:
    """The window a chunk must stitch and refine so that its own pixels come out as the whole scene's."""
    r0, r1 = refine_span(chunk.row_off, chunk.row_stop, height, options)
    c0, c1 = refine_span(chunk.col_off, chunk.col_stop, width, options)
    return Window(r0, c0, r1 - r0, c1 - c0)


def refine_classes(
    probabilities: Any, classes: Any, image: Any, valid: Any, region: Window, options: RefineOptions,
    cache_bytes: int = CRF_KERNEL_CACHE_BYTES,
) -> Any:
    """Refined class map (uint8, 255 where not ``valid``) of a region from its stitched probabilities.

    ``probabilities`` (C, h, w) float32 and ``classes`` (h, w) uint8 (their argmax, as stitched) of the network;
    ``image`` (B, h, w) float32, the bands standardised per band; ``valid`` (h, w) bool: inside the scene and
    holding data. Only the part of the region at least the halo away from its inner edges is exact. ``cache_bytes``
    bounds the CRF's kernels kept between iterations (speed only, never the bits).
    """
    if isinstance(options, CRFOptions):
        return crf_refine(probabilities, image, valid, options, cache_bytes)
    return slic_refine(probabilities, classes, image, valid, region, options)


# ---- elementwise building blocks, for numpy and torch alike ---------------------------------------------------------


def _is_torch(array: Any) -> bool:
    return type(array).__module__.startswith("torch")


def _torch():
    return sys.modules["torch"]


def _f32(value: float) -> float:
    """A constant rounded to float32 once, so numpy and torch multiply by the same number."""
    return float(np.float32(value))


def _zeros(like: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if _is_torch(like):
        torch = _torch()
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)
    return np.zeros(shape, dtype=dtype)


def _arange(like: Any, start: int, stop: int, dtype: str) -> Any:
    if _is_torch(like):
        torch = _torch()
        return torch.arange(start, stop, dtype=getattr(torch, dtype), device=like.device)
    return np.arange(start, stop, dtype=dtype)


def _astype(array: Any, dtype: str) -> Any:
    return array.to(getattr(_torch(), dtype)) if _is_torch(array) else array.astype(dtype)


def _where(condition: Any, a: Any, b: Any) -> Any:
    return _torch().where(condition, a, b) if _is_torch(condition) else np.where(condition, a, b)


def _rint(array: Any) -> Any:
    """Round half to even (both libraries)."""
    return array.round() if _is_torch(array) else np.rint(array)


def _bincount(index: Any, weights: Any, length: int) -> Any:
    """Sums of ``weights`` (float64 holding integers, or None: counts) per index; exact, so order does not matter."""
    if _is_torch(index):
        return _torch().bincount(index, weights=weights, minlength=length)
    return np.bincount(index, weights=weights, minlength=length)


_LOG2E = _f32(1.4426950408889634)
_LN2_HI = _f32(0.693359375)  # few mantissa bits: n x _LN2_HI is exact
_LN2_LO = _f32(-2.12194440e-4)
_EXP_TAYLOR = tuple(_f32(1.0 / math.factorial(k)) for k in range(7, -1, -1))


def exp32(x: Any) -> Any:
    """``e**x`` of a float32 array from +, x, floor and exponent bits only: the same bits in numpy and torch.

    Cody-Waite reduction ``x = n ln 2 + r`` (|r| <= ln 2 / 2), a degree-7 Taylor polynomial for ``e**r`` (within
    2 ulp of float32's exp), and ``2**n`` made from its exponent bits. ``x`` is clipped to [-87, 88].
    """
    x = x.clip(-87.0, 88.0)
    n = (x * _LOG2E + 0.5).floor() if _is_torch(x) else np.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = r * _EXP_TAYLOR[0] + _EXP_TAYLOR[1]
    for c in _EXP_TAYLOR[2:]:
        p = p * r + c
    bits = (_astype(n, "int32") + 127) << 23
    two_n = bits.view(_torch().float32) if _is_torch(bits) else bits.view(np.float32)
    return p * two_n


# ---- CRF -----------------------------------------------------------------------------------------------------------


def _crf_offsets(options: CRFOptions) -> list[tuple[int, int, float, float]]:
    """Half of the window's offsets (the other half is their mirror), with each kernel's normalised spatial weight."""
    r = options.kernel_radius
    full = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]

    def spatial(sigma: float) -> tuple[dict, float]:
        g = {d: math.exp(-(d[0] ** 2 + d[1] ** 2) / (2.0 * sigma**2)) for d in full}
        return g, math.fsum(g.values())

    gs, zs = spatial(options.smooth_sigma_xy)
    ga, za = spatial(options.appearance_sigma_xy)
    half = [d for d in full if d > (0, 0)]  # dy > 0, or dy == 0 and dx > 0
    return [(dy, dx, _f32(options.smooth_weight * gs[(dy, dx)] / zs), _f32(options.appearance_weight * ga[(dy, dx)] / za))
            for dy, dx in half]


def _overlap(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices A and B with B = A shifted by (dy, dx) (dy >= 0): the pixel pairs (i, i + d) inside an h x w array."""
    a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    b = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
    return a, b


def _crf_kernel(image: Any, a: tuple, b: tuple, smooth: float, appearance: float, colour_scale: float) -> Any:
    """k(i, i + d) for every pair of an offset: the smoothness constant plus the appearance kernel of the pair."""
    dist = None
    for band in range(image.shape[0]):
        diff = image[band][a] - image[band][b]
        dist = diff * diff if dist is None else dist + diff * diff
    return exp32(dist * colour_scale) * appearance + smooth


def crf_refine(probabilities: Any, image: Any, valid: Any, options: CRFOptions, cache_bytes: int = CRF_KERNEL_CACHE_BYTES) -> Any:
    """Class map (uint8; 255 where not ``valid``): the argmax of `crf_marginals` (ties: the lower class)."""
    out = class_argmax(crf_marginals(probabilities, image, valid, options, cache_bytes))
    out[~valid] = MASK_NODATA
    return out


def crf_marginals(
    probabilities: Any, image: Any, valid: Any, options: CRFOptions, cache_bytes: int = CRF_KERNEL_CACHE_BYTES
) -> Any:
    """Q (C, h, w) float32 after mean-field inference of a truncated dense CRF; 0 where not ``valid``.

    Each iteration: ``M_c(i) = sum_{j != i, |j - i|_inf <= radius} k(i, j) Q_c(j)`` and ``Q_c(i) ~ P_c(i) exp(M_c(i))``
    (the Potts update ``softmax(log P - sum_c' [c' != c] M_c')``, less its per-pixel constant), starting from
    ``Q = P``. Pixels without data hold Q = 0: they pass no message. Pairs are visited offset by offset (each
    offset and its mirror), so a pixel's sum has one order whatever the array; beyond the array there is no
    neighbour, which is right at the scene edge and, inside a chunk's region, only wrong within
    radius x iterations of its inner edges.
    """
    c, h, w = probabilities.shape
    zero = probabilities * 0
    q = _where(valid, probabilities, zero)
    offsets = _crf_offsets(options)
    colour_scale = _f32(-1.0 / (2.0 * options.appearance_sigma_rgb**2))
    cache = 4 * h * w * len(offsets) <= cache_bytes and options.appearance_weight > 0
    kernels: list = []
    for _ in range(options.iterations):
        m = _zeros(probabilities, (c, h, w), "float32")
        for k, (dy, dx, smooth, appearance) in enumerate(offsets):
            a, b = _overlap(dy, dx, h, w)
            if options.appearance_weight == 0:
                weight = smooth
            elif k < len(kernels):
                weight = kernels[k]
            else:
                weight = _crf_kernel(image, a, b, smooth, appearance, colour_scale)
                if cache:
                    kernels.append(weight)
            m[(slice(None), *a)] += weight * q[(slice(None), *b)]
            m[(slice(None), *b)] += weight * q[(slice(None), *a)]
        q = probabilities * exp32(m)
        total = q[0] + 0
        for k in range(1, c):
            total += q[k]
        q = _where(valid, q / total, zero)
    return q


# ---- SLIC ----------------------------------------------------------------------------------------------------------


def slic_refine(probabilities: Any, classes: Any, image: Any, valid: Any, region: Window, options: SLICOptions) -> Any:
    """Class map (uint8; 255 where not ``valid``) after a vote in each `slic_superpixels` superpixel (`slic_vote`)."""
    label = slic_superpixels(image, valid, region, options)
    h, w = valid.shape
    n = -(-h // options.step) * -(-w // options.step)
    return slic_vote(probabilities, classes, valid, label, n, options.vote)


def slic_superpixels(image: Any, valid: Any, region: Window, options: SLICOptions) -> Any:
    """Each pixel's superpixel (h, w) int64: the index of its centre's lattice cell, row-major in the region.

    Lattice cells of ``step`` S pixels from the scene origin; the region starts on a cell corner. Start: each valid
    pixel in its own cell's superpixel; a centre is the mean (colour, row, col) of its pixels. Each of the K
    iterations assigns every valid pixel to the nearest present centre among the 3 x 3 cells around its own (ties:
    the first in row-major lattice order) by ``D^2 = |I - I_k|^2 + (m / S)^2 ((y - y_k)^2 + (x - x_k)^2)``, then
    recomputes the centres (an emptied one stays). Colours are read in steps of 1/256 so sums are exact.

    Why 2K + 1 cells of halo (`refine_span`): centre k after t iterations depends on the cells within 2t of k
    (its pixels come from k's 3 x 3 cells, and each of their labels on the centres of their own 3 x 3 cells, one
    iteration earlier); so a pixel's final label depends on the cells within 2K - 1 of its own, a superpixel
    touching a chunk's cells lies within 2 cells of them, and its vote needs every one of its pixels' labels.
    """
    s, m = options.step, options.compactness
    if region.row_off % s or region.col_off % s:
        raise ValueError(f"a SLIC region starts on a lattice corner (multiples of {s}); got {region}")
    bands, h, w = image.shape
    ny, nx = -(-h // s), -(-w // s)
    n = ny * nx
    cell_row = _arange(image, 0, h, "int64") // s
    cell_col = _arange(image, 0, w, "int64") // s
    rows = _astype(_arange(image, region.row_off, region.row_stop, "int64"), "float32")[:, None] + _zeros(image, (h, w), "float32")
    cols = _astype(_arange(image, region.col_off, region.col_stop, "int64"), "float32")[None, :] + _zeros(image, (h, w), "float32")
    colour = _rint(image.clip(-COLOR_LIMIT, COLOR_LIMIT) * float(COLOR_QUANTUM))  # exact: a power of two
    pixel_colour = colour * _f32(1.0 / COLOR_QUANTUM)

    flat = valid.reshape(-1)

    def sums(values: Any) -> Any:
        return _astype(values.reshape(-1)[flat], "float64")

    feats = {"row": sums(rows), "col": sums(cols)}
    feats.update({("colour", b): sums(colour[b]) for b in range(bands)})
    own = cell_row[:, None] * nx + cell_col[None, :]
    centres = _slic_centres(own.reshape(-1)[flat], feats, n, None)
    spatial = _f32((m / s) ** 2)
    label = own
    for _ in range(options.iterations):
        best = _zeros(image, (h, w), "float32") + float("inf")
        label = own
        for dy in (-1, 0, 1):
            jr = cell_row + dy
            row_ok = (jr >= 0) & (jr < ny)
            for dx in (-1, 0, 1):
                jc = cell_col + dx
                col_ok = (jc >= 0) & (jc < nx)
                j = jr.clip(0, ny - 1)[:, None] * nx + jc.clip(0, nx - 1)[None, :]
                dist = None
                for b in range(bands):
                    diff = pixel_colour[b] - centres["colour", b].take(j)
                    dist = diff * diff if dist is None else dist + diff * diff
                dr = rows - centres["row"].take(j)
                dc = cols - centres["col"].take(j)
                d2 = dist + (dr * dr + dc * dc) * spatial
                better = row_ok[:, None] & col_ok[None, :] & centres["present"].take(j) & (d2 < best)
                best = _where(better, d2, best)
                label = _where(better, j, label)
        centres = _slic_centres(label.reshape(-1)[flat], feats, n, centres)
    return label


def _slic_centres(label: Any, feats: dict, n: int, previous: dict | None) -> dict:
    """Each superpixel's mean colour and position from exact integer sums (float64 holds them exactly); an emptied
    superpixel keeps its centre, and a cell that never held a pixel is not ``present``."""
    count = _bincount(label, None, n)
    some = count > 0
    divisor = _astype(_where(some, count, count * 0 + 1), "float64")
    out = {"present": some if previous is None else (some | previous["present"])}
    for key, values in feats.items():
        mean = _bincount(label, values, n) / divisor
        if key != "row" and key != "col":
            mean = mean * (1.0 / COLOR_QUANTUM)  # exact: a power of two
        mean = _astype(mean, "float32")
        out[key] = mean if previous is None else _where(some, mean, previous[key])
    return out


def slic_vote(probabilities: Any, classes: Any, valid: Any, label: Any, n: int, vote: str) -> Any:
    """Each valid pixel takes its superpixel's class: the most frequent network class (``majority``) or the argmax of
    the summed probabilities in steps of 1/65536 (``mean``); ties go to the lower class. Integer sums: exact."""
    c = probabilities.shape[0]
    flat = valid.reshape(-1)
    members = label.reshape(-1)[flat]
    if vote == "majority":
        network = _astype(classes.reshape(-1)[flat], "int64")
        scores = _bincount(members * c + network, None, n * c).reshape(n, c).T
    else:
        rows = [_bincount(members, _astype(_rint(probabilities[k] * float(PROBABILITY_QUANTUM)).reshape(-1)[flat], "float64"), n)
                for k in range(c)]
        scores = _stack(rows)
    winner = class_argmax(scores)
    out = winner.take(label)
    out[~valid] = MASK_NODATA
    return out


def _stack(rows: list) -> Any:
    return _torch().stack(rows) if _is_torch(rows[0]) else np.stack(rows)
