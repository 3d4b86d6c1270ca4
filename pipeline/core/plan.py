"""Planning a scene from its metadata: the chunk grid, the lattice, one task per chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.geometry import ChunkGrid, TileLattice, Window

__all__ = ["ChunkTask", "ChunkResult", "ScenePlan", "plan_scene"]


@dataclass(frozen=True)
class ChunkTask:
    """What one output chunk needs: its window, the tiles touching it, and the window to read."""

    row: int
    col: int
    chunk: Window
    tiles: tuple[tuple[int, int], ...]
    read: Window

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

    def task(self, row: int, col: int) -> ChunkTask:
        chunk = self.grid.window(row, col)
        tiles = tuple(self.lattice.tiles_touching(chunk, cores_only=self.mode == "crop"))
        return ChunkTask(row, col, chunk, tiles, self.lattice.extent(list(tiles)))

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
        r0, r1 = max(0, win.row_off) // c, (min(self.height, win.row_stop) - 1) // c
        c0, c1 = max(0, win.col_off) // c, (min(self.width, win.col_stop) - 1) // c
        return (r1 - r0 + 1) * (c1 - c0 + 1)

    @property
    def tiles_touching_chunks(self) -> int:
        """Tiles needed summed over chunks (a tile on a chunk edge counts once per chunk it touches)."""
        return sum(len(t.tiles) for t in self.tasks())


def plan_scene(height: int, width: int, *, tile: int, overlap: int, chunk: int, mode: str) -> ScenePlan:
    """Plan a scene of ``height`` x ``width`` pixels."""
    if mode not in ("blend", "crop"):
        raise ValueError(f"unknown stitch mode {mode!r}; choose blend or crop")
    return ScenePlan(height, width, ChunkGrid(height, width, chunk), TileLattice(height, width, tile, overlap), mode)
