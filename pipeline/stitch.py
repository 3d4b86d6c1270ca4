"""Stitching tile predictions into a chunk's class map, and the whole-image reference.

`crop` keeps each tile's core (the overlap-tile strategy of the U-Net paper);
`blend` takes the per-pixel weighted mean of class probabilities over every
covering tile, with a positive window so every covered pixel has weight. Tiles
are always accumulated in lattice (row-major) order, so a pixel's float sums
are the same whichever chunk computes it: masks are bit-identical for any
chunk size.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import numpy as np

from pipeline.geometry import TileLattice, Window, reflect_index

__all__ = [
    "WINDOW_FUNCTIONS",
    "STITCH_MODES",
    "window_weights",
    "BlendAccumulator",
    "stitch_chunk",
    "sliding_window_predict",
]

StitchMode = Literal["blend", "crop"]
STITCH_MODES = ("blend", "crop")


def _profile(name: str, size: int) -> np.ndarray:
    x = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in (0, 1)
    if name == "hann":
        return np.sin(np.pi * x) ** 2
    if name == "triangular":
        return 1.0 - np.abs(2.0 * x - 1.0)
    if name == "gaussian":
        return np.exp(-0.5 * ((x - 0.5) / 0.25) ** 2)
    if name == "uniform":
        return np.ones(size)
    raise ValueError(f"unknown window {name!r}; choose one of {', '.join(WINDOW_FUNCTIONS)}")


WINDOW_FUNCTIONS = ("hann", "triangular", "gaussian", "uniform")


def window_weights(name: str, tile: int) -> np.ndarray:
    """2-D blend weights (tile x tile, float32), strictly positive everywhere."""
    p = _profile(name, tile)
    return np.outer(p, p).astype(np.float32)


class BlendAccumulator:
    """Weighted sums of class probabilities over one output window."""

    def __init__(self, window: Window, num_classes: int, weights: np.ndarray) -> None:
        self.window = window
        self.weights = weights
        self.sum = np.zeros((num_classes, *window.shape), dtype=np.float32)
        self.weight = np.zeros(window.shape, dtype=np.float32)

    def add(self, tile_window: Window, probabilities: np.ndarray) -> None:
        """Add one tile's probabilities (C, T, T); the part outside the window is ignored."""
        part = tile_window.intersection(self.window)
        if part is None:
            return
        out = part.slices_in(self.window)
        src = part.slices_in(tile_window)
        w = self.weights[src]
        self.sum[(slice(None), *out)] += w * probabilities[(slice(None), *src)]
        self.weight[out] += w

    def classes(self) -> np.ndarray:
        """Argmax of the weighted mean (dividing by the weight does not change the argmax)."""
        return np.argmax(self.sum, axis=0).astype(np.uint8)

    def probabilities(self) -> np.ndarray:
        """The weighted mean of class probabilities (C, h, w); 0 where no tile covers a pixel."""
        out = np.zeros_like(self.sum)
        np.divide(self.sum, self.weight, out=out, where=self.weight > 0)
        return out


def stitch_chunk(
    chunk: Window,
    tiles: Iterable[tuple[Window, np.ndarray]],
    *,
    lattice: TileLattice,
    mode: StitchMode,
    num_classes: int,
    weights: np.ndarray | None = None,
    probabilities: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Class map (uint8) of ``chunk`` from (tile window, output) pairs in lattice order.

    For ``blend`` the outputs are probabilities (C, T, T); for ``crop`` they are
    class maps (T, T) or probabilities, and only each tile's core is kept.
    Pixels that no tile covers are left at 255 (nodata). With ``probabilities``
    (outputs must then be probabilities) the stitched probabilities (C, h, w,
    float32; 0 where uncovered) come back too.
    """
    if mode == "blend":
        if weights is None:
            raise ValueError("blend stitching needs window weights")
        acc = BlendAccumulator(chunk, num_classes, weights)
        for win, out in tiles:
            acc.add(win, out)
        classes = acc.classes()
        classes[acc.weight == 0] = 255
        return (classes, acc.probabilities()) if probabilities else classes
    if mode == "crop":
        out_map = np.full(chunk.shape, 255, dtype=np.uint8)
        probs = np.zeros((num_classes, *chunk.shape), dtype=np.float32) if probabilities else None
        m, s = lattice.margin, lattice.stride
        for win, out in tiles:
            core = Window(win.row_off + m, win.col_off + m, s, s).intersection(chunk)
            if core is None:
                continue
            labels = out if out.ndim == 2 else np.argmax(out, axis=0)
            out_map[core.slices_in(chunk)] = labels[core.slices_in(win)]
            if probs is not None:
                probs[(slice(None), *core.slices_in(chunk))] = out[(slice(None), *core.slices_in(win))]
        return (out_map, probs) if probabilities else out_map
    raise ValueError(f"unknown stitch mode {mode!r}; choose blend or crop")


def sliding_window_predict(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    tile: int,
    overlap: int,
    mode: StitchMode,
    num_classes: int,
    window: str = "hann",
) -> np.ndarray:
    """Whole-image sliding-window inference: the reference the chunked pipeline must equal.

    ``image`` is (bands, H, W), already normalised; ``predict`` maps a batch
    (N, bands, T, T) to probabilities (N, C, T, T). The image is reflect-padded
    in full, which is only possible for scenes that fit in memory.
    """
    _, h, w = image.shape
    lattice = TileLattice(h, w, tile, overlap)
    scene = Window(0, 0, h, w)
    tiles = lattice.tiles_touching(scene, cores_only=(mode == "crop"))
    extent = lattice.extent(tiles)
    rows = reflect_index(np.arange(extent.row_off, extent.row_stop), h)
    cols = reflect_index(np.arange(extent.col_off, extent.col_stop), w)
    padded = image[:, rows][:, :, cols]
    outputs = []
    for r, c in tiles:
        win = lattice.window(r, c)
        sl = win.slices_in(extent)
        out = predict(padded[None, :, sl[0], sl[1]])[0]
        outputs.append((win, out))
    weights = window_weights(window, tile) if mode == "blend" else None
    return stitch_chunk(scene, outputs, lattice=lattice, mode=mode, num_classes=num_classes, weights=weights)
