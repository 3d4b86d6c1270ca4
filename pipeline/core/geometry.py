"""Tiling geometry: windows, the output chunk grid and the tile lattice.

Pure arithmetic, no I/O. The tile lattice is anchored to the scene origin, not
to chunks, so a chunk always computes exactly the lattice tiles that touch it
and the mask does not depend on the chunk size (ARCHITECTURE.md, invariant 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["Window", "ChunkGrid", "TileLattice", "reflect_index"]


@dataclass(frozen=True, slots=True)
class Window:
    """A rectangle of pixels in scene coordinates; may extend outside the scene."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def row_stop(self) -> int:
        return self.row_off + self.height

    @property
    def col_stop(self) -> int:
        return self.col_off + self.width

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def intersection(self, other: "Window") -> "Window | None":
        """The overlap of two windows, or None when they do not overlap."""
        r0, c0 = max(self.row_off, other.row_off), max(self.col_off, other.col_off)
        r1, c1 = min(self.row_stop, other.row_stop), min(self.col_stop, other.col_stop)
        if r1 <= r0 or c1 <= c0:
            return None
        return Window(r0, c0, r1 - r0, c1 - c0)

    def slices_in(self, outer: "Window") -> tuple[slice, slice]:
        """Slices that cut this window out of an array covering ``outer``."""
        r, c = self.row_off - outer.row_off, self.col_off - outer.col_off
        if r < 0 or c < 0 or r + self.height > outer.height or c + self.width > outer.width:
            raise ValueError(f"{self} is not inside {outer}")
        return slice(r, r + self.height), slice(c, c + self.width)


@dataclass(frozen=True, slots=True)
class ChunkGrid:
    """The output chunk grid: square chunks from the origin, clipped at the scene edge."""

    height: int
    width: int
    chunk: int

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid chunk grid {self}")

    @property
    def shape(self) -> tuple[int, int]:
        return (-(-self.height // self.chunk), -(-self.width // self.chunk))

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def window(self, row: int, col: int) -> Window:
        r0, c0 = row * self.chunk, col * self.chunk
        return Window(r0, c0, min(self.chunk, self.height - r0), min(self.chunk, self.width - c0))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rows, cols = self.shape
        for r in range(rows):
            for c in range(cols):
                yield (r, c)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class TileLattice:
    """Tiles of ``tile`` pixels every ``stride`` pixels, starting ``margin`` before the origin.

    Tile ``k`` along an axis spans ``[k*stride - margin, k*stride - margin + tile)``
    and its core (the part `crop` stitching keeps) is ``[k*stride, (k+1)*stride)``;
    the cores partition the scene. Starting at ``-margin`` puts border pixels in
    a tile's core, away from its edge, so they see a full (reflect-padded) context.
    """

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile size); got {self.overlap} for tile {self.tile}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def margin(self) -> int:
        return self.overlap // 2

    @property
    def shape(self) -> tuple[int, int]:
        return (_ceil_div(self.height, self.stride), _ceil_div(self.width, self.stride))

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def window(self, row: int, col: int) -> Window:
        s, m = self.stride, self.margin
        return Window(row * s - m, col * s - m, self.tile, self.tile)

    def core(self, row: int, col: int) -> Window:
        """The tile's core, clipped to the scene."""
        s = self.stride
        r0, c0 = row * s, col * s
        return Window(r0, c0, min(s, self.height - r0), min(s, self.width - c0))

    def _covering(self, start: int, stop: int, n: int) -> range:
        s, m, t = self.stride, self.margin, self.tile
        first = max(0, (start + m - t) // s + 1)
        last = min(n - 1, (stop + m - 1) // s)
        return range(first, last + 1)

    def _owning(self, start: int, stop: int, n: int) -> range:
        s = self.stride
        return range(max(0, start // s), min(n - 1, (stop - 1) // s) + 1)

    def tiles_touching(self, window: Window, *, cores_only: bool = False) -> list[tuple[int, int]]:
        """Lattice tiles, in row-major order, that touch ``window``.

        With ``cores_only`` (crop stitching) a tile counts only if its core
        touches the window; otherwise (blend) any part of the tile counts.
        """
        rows, cols = self.shape
        pick = self._owning if cores_only else self._covering
        rr = pick(window.row_off, window.row_stop, rows)
        cc = pick(window.col_off, window.col_stop, cols)
        return [(r, c) for r in rr for c in cc]

    def extent(self, tiles: list[tuple[int, int]]) -> Window:
        """The smallest window holding all the given tiles."""
        if not tiles:
            raise ValueError("no tiles")
        wins = [self.window(r, c) for r, c in tiles]
        r0 = min(w.row_off for w in wins)
        c0 = min(w.col_off for w in wins)
        r1 = max(w.row_stop for w in wins)
        c1 = max(w.col_stop for w in wins)
        return Window(r0, c0, r1 - r0, c1 - c0)


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Map indexes, possibly outside ``[0, n)``, to in-range ones by reflection.

    Same as numpy's ``pad(mode="reflect")`` (the edge pixel is not repeated),
    repeated as often as needed, so any window of a virtually padded scene can
    be read without padding the whole scene.
    """
    index = np.asarray(index, dtype=np.int64)
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.mod(index, period)
    return np.where(folded >= n, period - folded, folded)
