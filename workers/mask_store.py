"""The mask store: the one module that knows a satseg mask's Zarr v3 layout.

``OUT/masks/<scene>.zarr`` is a group holding

- ``mask``: (H, W) uint8 class indices with ``x``/``y`` pixel-centre
  coordinates, CRS and transform as xarray/rioxarray write them; its fill
  value is the nodata value (255), so a chunk never written reads back as
  nodata, not as class 0. Attributes: ``class_names``, ``satseg_job_id``,
  ``source_image``, and ``satseg_complete``, which turns true last
  (ARCHITECTURE.md, invariant 6): it is the one record that a scene is done.
- ``probabilities``: optional (C, H, W) uint8, p = value / 255, chunked like
  the mask.
- ``1/mask``, ``2/mask``, ...: overview levels (``pipeline/overviews.py``
  computes them; their arrays are made here, from the same template).

Each chunk is written by exactly one task, aligned to the store's chunks, so no
locks are needed (invariant 2). Everything else that creates, writes, opens or
validates a mask store goes through this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.core.geometry import Window
from pipeline.core.metrics import MASK_NODATA
from schemas.errors import InputFileError
from schemas.store import is_zarr_node
from workers.reader import SceneInfo

__all__ = [
    "MASK",
    "PROBABILITIES",
    "NO_TRANSFORM",
    "MaskStore",
    "create_mask_store",
    "create_level_array",
    "create_probabilities_array",
    "write_mask_chunk",
    "write_probabilities_chunk",
    "chunk_digest",
    "mark_chunk_done",
    "intact_chunks",
    "mark_complete",
    "is_complete",
    "is_mask_store",
    "consolidate",
    "open_mask_store",
    "zarr_mask",
    "zarr_georeference",
]

log = logging.getLogger(__name__)

MASK, PROBABILITIES = "mask", "probabilities"
NO_TRANSFORM = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
"""The affine transform of a raster without georeference: pixel units, north up."""
_COMPLETE, _JOB = "satseg_complete", "satseg_job_id"


def _template(shape: tuple[int, int], transform, crs, chunk: tuple[int, int], attrs: dict):
    """An empty (nodata) uint8 ``mask`` of ``shape`` on Dask, georeferenced as xarray/rioxarray read it back."""
    import dask.array as da  # imported here: chunk-writing workers need only zarr
    import rasterio
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    affine = rasterio.Affine(*tuple(transform)[:6])
    h, w = shape
    xs = affine.c + (np.arange(w) + 0.5) * affine.a
    ys = affine.f + (np.arange(h) + 0.5) * affine.e
    data = da.full(shape, MASK_NODATA, dtype=np.uint8, chunks=chunk)
    mask = xr.DataArray(data, dims=("y", "x"), coords={"y": ys, "x": xs}, name=MASK)
    if crs:
        mask = mask.rio.write_crs(rasterio.crs.CRS.from_wkt(crs) if isinstance(crs, str) else crs)
    mask = mask.rio.write_transform(affine)
    mask.attrs["nodata"] = MASK_NODATA
    mask.attrs.update({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in attrs.items()})
    # Merge rioxarray's encoding: an encoding of our own alone would drop `grid_mapping`, and the CRS with it.
    encoding = {MASK: {**mask.encoding, "fill_value": MASK_NODATA, "chunks": chunk}}
    return mask.to_dataset(), encoding


def create_mask_store(
    store: Path, scene: SceneInfo, chunk: int, *, class_names: list[str], job_id: str, source_image: str | None = None
) -> None:
    """Create ``store`` with an empty ``mask`` of the scene's shape, CRS and transform, not yet complete."""
    attrs = {"class_names": list(class_names), _JOB: job_id, _COMPLETE: False}
    if source_image is not None:
        attrs["source_image"] = source_image
    ds, encoding = _template((scene.height, scene.width), scene.affine, scene.crs, (chunk, chunk), attrs)
    with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3; xarray reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(store, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=True)


def create_level_array(store: Path, level: int, shape: tuple[int, int], transform, crs, chunk: int) -> tuple[int, int]:
    """Create overview ``level`` (group ``level``, array ``mask``) empty and georeferenced; returns its chunk shape."""
    chunks = (min(chunk, shape[0]), min(chunk, shape[1]))
    ds, encoding = _template(shape, transform, crs, chunks, {"overview_level": level, "resampling_method": "mode"})
    ds.to_zarr(store, group=str(level), mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=False)
    return chunks


def create_probabilities_array(store: Path, class_names: list[str], chunk: int) -> None:
    """Add ``probabilities`` (C, H, W) uint8 to a mask store: p = q / 255, chunked like the mask (all classes per chunk).

    One chunk of it is written by the task that writes the same mask chunk, so
    writes stay chunk-aligned with one writer each.
    """
    mask = zarr.open_array(str(store), path=MASK, mode="r")
    root = zarr.open_group(str(store), mode="r+")
    arr = root.create_array(
        PROBABILITIES,
        shape=(len(class_names), *mask.shape),
        chunks=(len(class_names), chunk, chunk),
        dtype="uint8",
        fill_value=0,
        dimension_names=("class", "y", "x"),
        overwrite=True,
    )
    arr.attrs.update({"class_names": json.dumps(class_names), "description": "class probability p = value / 255"})
    consolidate(store)


def write_probabilities_chunk(store: Path, window: Window, probabilities: np.ndarray) -> None:
    arr = zarr.open_array(str(store), path=PROBABILITIES, mode="r+")
    arr[:, window.row_off : window.row_stop, window.col_off : window.col_stop] = probabilities


def write_mask_chunk(store: Path, window: Window, mask: np.ndarray) -> None:
    """Write one chunk's class map into its region of the store."""
    arr = zarr.open_array(str(store), path=MASK, mode="r+")
    arr[window.row_off : window.row_stop, window.col_off : window.col_stop] = mask


def consolidate(store: Path) -> None:
    """Rewrite the store's consolidated metadata (which xarray reads) after its arrays or attributes changed."""
    with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3; xarray reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(store))


def mark_complete(store: Path) -> None:
    """Record that the scene is done: every chunk, its overviews and its reports are written. The last write."""
    arr = zarr.open_array(str(store), path=MASK, mode="r+")
    arr.attrs[_COMPLETE] = True
    consolidate(store)


def _mask_attributes(store: Path) -> dict:
    """The ``mask`` array's own attributes (not the consolidated copy); empty when there is no readable mask."""
    try:
        return json.loads((Path(store) / MASK / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError):
        return {}


def is_complete(store: Path) -> bool:
    """Whether ``store`` is a satseg mask store marked complete."""
    return _mask_attributes(store).get(_COMPLETE) is True


def is_mask_store(path: Path) -> bool:
    """Whether ``path`` is a store a satseg job made (finished or not), as opposed to any other Zarr."""
    return _mask_attributes(path).get(_JOB) is not None


def chunk_digest(mask: np.ndarray, probabilities: np.ndarray | None = None) -> str:
    """A checksum of a chunk's stored arrays, kept in its marker so a resume can tell a damaged chunk."""
    h = hashlib.blake2b(digest_size=16)
    for arr in (mask, probabilities):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def mark_chunk_done(markers: Path, key: str, digest: str = "") -> None:
    """Record that chunk ``key`` is written, with its checksum: after the chunk itself, so a marker means done."""
    markers.mkdir(parents=True, exist_ok=True)
    (markers / key).write_text(digest)


def intact_chunks(store: Path, markers: Path, windows: dict[str, Window]) -> set[str]:
    """The chunks marked done whose stored arrays still match their marker's checksum (``windows``: key -> window).

    A chunk file truncated or changed on disk after its marker was written reads back differently, or not at all:
    its marker is removed, and the chunk is computed again. A marker without a checksum is trusted.
    """
    if not markers.is_dir() or not any(markers.iterdir()):
        return set()
    try:
        mask = zarr.open_array(str(store), path=MASK, mode="r")
        probabilities = zarr.open_array(str(store), path=PROBABILITIES, mode="r") if is_zarr_node(store / PROBABILITIES) else None
    except Exception:  # noqa: BLE001  (a store cut short while being created holds nothing to keep)
        log.warning("%s: cannot be opened; its chunks are computed again", store)
        return set()
    intact = set()
    for marker in markers.iterdir():
        win = windows.get(marker.name)
        if win is None:
            continue  # not a chunk of this grid: a stray file
        expected = marker.read_text().strip()
        if expected:
            rows, cols = slice(win.row_off, win.row_stop), slice(win.col_off, win.col_stop)
            try:
                found = chunk_digest(mask[rows, cols], probabilities[:, rows, cols] if probabilities is not None else None)
            except Exception:  # noqa: BLE001  (a chunk that cannot be decoded is as damaged as a wrong one)
                found = None
            if found != expected:
                log.warning("%s: chunk %s does not match its checksum; it is computed again", store, marker.name)
                marker.unlink(missing_ok=True)
                continue
        intact.add(marker.name)
    return intact


@dataclass(frozen=True)
class MaskStore:
    """A complete satseg mask store: its mask array and what its attributes say."""

    path: Path
    array: zarr.Array
    class_names: list[str]
    crs: object  # rasterio CRS or None
    transform: tuple[float, float, float, float, float, float]
    job_id: str
    has_probabilities: bool


def open_mask_store(store: str | Path, *, then: str) -> MaskStore:
    """Open a finished satseg mask store, refusing anything else in one line; ``then`` names what the user does next."""
    store = Path(store)
    if not store.exists():
        raise InputFileError(f"{store}: mask store not found; give OUT/masks/<scene>.zarr of a finished job")
    if not (is_zarr_node(store) and is_zarr_node(store / MASK)):
        raise InputFileError(f"{store}: not a satseg mask store (no Zarr `mask` array); give OUT/masks/<scene>.zarr")
    arr = zarr.open_array(str(store), path=MASK, mode="r")
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise InputFileError(f"{store}: `mask` is {arr.ndim}-D {arr.dtype}, not a 2-D uint8 class mask; give a satseg mask store")
    if not is_complete(store):
        raise InputFileError(f"{store}: mask is not complete (its job was interrupted); rerun the job to finish it, then {then}")
    names = arr.attrs.get("class_names") or []
    if isinstance(names, str):
        names = json.loads(names)
    crs, transform = zarr_georeference(store, MASK)
    return MaskStore(
        store, arr, list(names), crs, transform or NO_TRANSFORM, str(arr.attrs.get(_JOB)),
        is_zarr_node(store / PROBABILITIES),
    )


def zarr_mask(path: str | Path, role: str = "prediction") -> tuple[zarr.Array, str | None]:
    """The 2-D array of any Zarr path (a satseg store or another's): the array itself, a store's ``mask``, or its only 2-D array.

    Returns the array and its name in the store (None when ``path`` is the array itself).
    """
    path = Path(path)
    meta = json.loads((path / "zarr.json").read_text())
    if meta.get("node_type") == "array":
        return zarr.open_array(str(path), mode="r"), None
    node = zarr.open_group(str(path), mode="r", use_consolidated=False)  # the arrays' own, current attributes
    if MASK in node and isinstance(node[MASK], zarr.Array):
        return node[MASK], MASK
    arrays = [(k, a) for k, a in node.arrays() if a.ndim == 2]
    if len(arrays) != 1:
        raise InputFileError(
            f"{path}: {role} store holds {len(arrays)} 2-D arrays, not one; give the array's own path (STORE.zarr/NAME)"
        )
    return arrays[0][1], arrays[0][0]


def zarr_georeference(path: str | Path, name: str | None):
    """CRS (rasterio, or None) and affine transform a Zarr array carries for xarray/rioxarray; (None, None) if unreadable."""
    if name is None:
        return None, None
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    try:
        with warnings.catch_warnings():  # a foreign store may lack consolidated metadata: fine here
            warnings.simplefilter("ignore", RuntimeWarning)
            with xr.open_zarr(path, decode_coords="all") as ds:
                arr = ds[name]
                return arr.rio.crs, tuple(arr.rio.transform())[:6]
    except Exception:  # noqa: BLE001  (a store xarray cannot read simply has no georeference)
        return None, None
