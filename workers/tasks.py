"""Ray tasks of a job: read one window, write one chunk. Both retry on failure."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ray

from pipeline.core.geometry import Window
from pipeline.core.plan import ChunkResult
from workers.reader import WindowData, read_image_window
from workers.mask_store import chunk_digest, mark_chunk_done, write_mask_chunk, write_probabilities_chunk

__all__ = ["read_window_task", "write_chunk_task", "warm_up_task"]


@ray.remote(max_retries=3)
def read_window_task(
    path: str, window: Window, bands: Sequence[int], mean: Sequence[float], std: Sequence[float], chunk: Window | None = None
) -> WindowData:
    """The window a chunk needs; nodata collisions are counted inside ``chunk`` only."""
    return read_image_window(path, window, bands, mean, std, count_in=chunk)


@ray.remote(max_retries=3)
def write_chunk_task(store: str, window: Window, result: ChunkResult, markers: str, key: str) -> dict:
    """Write the chunk (and its probabilities, when the actor returned them), then its done-marker; returns its work."""
    if result.probabilities is not None:
        write_probabilities_chunk(Path(store), window, result.probabilities)
    write_mask_chunk(Path(store), window, result.mask)
    mark_chunk_done(Path(markers), key, chunk_digest(result.mask, result.probabilities))
    return result.work


@ray.remote
def warm_up_task(modules: Sequence[str] = ()) -> int:
    """Import this module (GDAL, Zarr) and ``modules``: run while the models build, so the first read starts at once."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    return 0
