"""Real satseg mask stores for tests: written with the pipeline's own writer, chunk by chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_origin

from pipeline.core.geometry import Window
from workers.reader import SceneInfo
from workers.mask_store import create_mask_store, mark_complete, write_mask_chunk

TRANSFORM = tuple(from_origin(500000.0, 4_600_000.0, 10.0, 10.0))[:6]


def write_store(path: Path, mask: np.ndarray, chunk: int, class_names: list[str], *, complete: bool = True,
                job_id: str = "test") -> Path:
    """A mask store holding ``mask`` (uint8, 255 = nodata) in EPSG:32633, written chunk by chunk like a job does."""
    h, w = mask.shape
    info = SceneInfo(str(path), h, w, 1, "uint8", CRS.from_epsg(32633).to_wkt(), TRANSFORM, None)
    create_mask_store(path, info, chunk, class_names=class_names, job_id=job_id)
    for r in range(0, h, chunk):
        for c in range(0, w, chunk):
            win = Window(r, c, min(chunk, h - r), min(chunk, w - c))
            write_mask_chunk(path, win, mask[win.row_off : win.row_stop, win.col_off : win.col_stop])
    if complete:
        mark_complete(path)
    return path


def blob_mask(h: int, w: int, num_classes: int, seed: int, cell: int = 8) -> np.ndarray:
    """Blocky random classes (cells of ``cell`` px) with a nodata corner."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes, (h // cell + 1, w // cell + 1))
    mask = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:h, :w].astype(np.uint8)
    mask[: h // 10, : w // 8] = 255
    return mask
