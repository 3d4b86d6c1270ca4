"""Planning a scene from its metadata: the chunk grid, the lattice, one task per chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.geometry import ChunkGrid, TileLattice, Window
from pipeline.core.refine import RefineOptions, refine_region, refine_span

__all__ = ["ChunkTask", "ChunkResult", "ScenePlan", "plan_scene"]


@dataclass(frozen=True)
class ChunkTask:
    """What one output chunk needs: its window, the tiles touching it, and the window to read.

    ``region`` is what the chunk stitches: the chunk itself, or with a refinement the chunk grown by the halo the
    refinement reads (`pipeline.core.refine.refine_region`); the tiles are those touching the region.
    """

    row: int
    col: int
    chunk: Window
    tiles: tuple[tuple[int, int], ...]
    read: Window
    region: Window | None = None  # None: the chunk

    @property
    def stitched(self) -> Window:
        """The window the chunk stitches (and refines)."""
        return self.chunk if self.region is None else self.region

    @property
    def key(self) -> str:
        return f"{self.row}.{self.col}"


@dataclass(frozen=True)
class ChunkResult:
    """What a model actor returns for one chunk: its uint8 class map, its uint8 probabilities if asked, and its work.

    The work (tiles_predicted, tiles_reused, model_seconds, chunk_seconds of this chunk alone, and the input's
    nodata_collisions inside it) travels with the
    chunk, so a job adds up each delivered chunk's work exactly once, across actor restarts and resumes.
    """

    mask: Any  # (h, w) uint8 numpy array
    probabilities: Any  # (C, h, w) uint8 numpy array, or None
    work: dict


@dataclass(frozen=True)
class ScenePlan:
    """The whole plan of one scene; built from metadata alone, holds no pixels."""

    height: int
    width: int
    grid: ChunkGrid
    lattice: TileLattice
    mode: str
    refine: RefineOptions | None = None  # applied to each chunk's stitched probabilities (pipeline/core/refine.py)

    def task(self, row: int, col: int) -> ChunkTask:
        chunk = self.grid.window(row, col)
        region = refine_region(chunk, self.height, self.width, self.refine) if self.refine is not None else None
        tiles = tuple(self.lattice.tiles_touching(region or chunk, cores_only=self.mode == "crop"))
        return ChunkTask(row, col, chunk, tiles, self.lattice.extent(list(tiles)), region)

    def tasks(self) -> list[ChunkTask]:
        return [self.task(r, c) for r, c in self.grid]

    def strip_order(self, strip: int) -> list[tuple[int, int]]:
        """Chunks in vertical strips ``strip`` chunks wide, row-major inside a strip.

        Neighbouring chunks then follow each other, so a tile shared by two
        chunks can be reused from a bounded cache instead of recomputed.
        """
        rows, cols = self.grid.shape
        order = []
        for c0 in range(0, cols, strip):
            for r in range(rows):
                order.extend((r, c) for c in range(c0, min(c0 + strip, cols)))
        return order

    def chunks_per_tile(self, row: int, col: int) -> int:
        """How many chunks need lattice tile (row, col): after that many uses it can be dropped."""
        win = self.lattice.window(row, col) if self.mode == "blend" else self.lattice.core(row, col)
        c = self.grid.chunk
        if self.refine is not None:  # chunks whose region, grown by the refinement's halo, reaches the tile
            return self._reaching(win.row_off, win.row_stop, self.height) * self._reaching(win.col_off, win.col_stop, self.width)
        r0, r1 = max(0, win.row_off) // c, (min(self.height, win.row_stop) - 1) // c
        c0, c1 = max(0, win.col_off) // c, (min(self.width, win.col_stop) - 1) // c
        return (r1 - r0 + 1) * (c1 - c0 + 1)

    def _reaching(self, start: int, stop: int, n: int) -> int:
        """Along one axis: how many chunks' refinement regions overlap ``[start, stop)``."""
        c, lo, hi = self.grid.chunk, max(0, start), min(n, stop)
        spans = (refine_span(i * c, min(n, (i + 1) * c), n, self.refine) for i in range(-(-n // c)))
        return sum(1 for a, b in spans if a < hi and b > lo)

    @property
    def tiles_touching_chunks(self) -> int:
        """Tiles needed summed over chunks (a tile on a chunk edge counts once per chunk it touches)."""
        return sum(len(t.tiles) for t in self.tasks())


def plan_scene(
    height: int, width: int, *, tile: int, overlap: int, chunk: int, mode: str, refine: RefineOptions | None = None
) -> ScenePlan:
    """Plan a scene of ``height`` x ``width`` pixels; with ``refine``, each chunk stitches and refines its region."""
    if mode not in ("blend", "crop"):
        raise ValueError(f"unknown stitch mode {mode!r}; choose blend or crop")
    return ScenePlan(height, width, ChunkGrid(height, width, chunk), TileLattice(height, width, tile, overlap), mode, refine)
