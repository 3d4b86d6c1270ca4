"""The mask store: the one module that knows a satseg mask's Zarr v3 layout.

``OUT/masks/<scene>.zarr`` is a group holding

- ``mask``: (H, W) uint8 class indices with ``x``/``y`` pixel-centre
  coordinates, CRS and transform as xarray/rioxarray write them; its fill
  value is the nodata value (255), so a chunk never written reads back as
  nodata, not as class 0. Attributes: ``class_names``, ``class_colors``
  (``#rrggbb`` per class, as every output draws it), ``satseg_job_id``,
  ``source_image``, and ``satseg_complete``, which turns true last
  (ARCHITECTURE.md, invariant 6): it is the one record that a scene is done.
- ``probabilities``: optional (C, H, W) uint8, p = value / 255, chunked like
  the mask.
- ``instances``: optional (H, W) uint32 object ids (0: no object) of a job with
  ``things``, chunked and georeferenced like the mask (``pipeline/objects.py``
  computes them); ``satseg_complete`` on it turns true after its last chunk.
- ``1/mask``, ``2/mask``, ...: overview levels (``pipeline/overviews.py``
  computes them; their arrays are made here, from the same template, with
  level 0's class names and colours).

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
from schemas.job import parse_color
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
    "INSTANCES",
    "create_instances_array",
    "write_instances_chunk",
    "mark_instances_complete",
    "instances_complete",
    "chunk_digest",
    "mark_chunk_done",
    "intact_chunks",
    "mark_complete",
    "is_complete",
    "is_mask_store",
    "stored_class_colors",
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
_COLORS = "class_colors"


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


def _class_attributes(class_names: list[str], class_colors: list[str] | None) -> dict:
    """What the mask says about its classes: names in index order and, when resolved by the driver, their colours."""
    attrs: dict = {"class_names": list(class_names)}
    if class_colors is not None:
        if len(class_colors) != len(class_names):
            raise ValueError(f"{len(class_colors)} class colours for {len(class_names)} classes")
        attrs[_COLORS] = [parse_color(c) for c in class_colors]
    return attrs


def create_mask_store(
    store: Path, scene: SceneInfo, chunk: int, *, class_names: list[str], job_id: str, source_image: str | None = None,
    class_colors: list[str] | None = None,
) -> None:
    """Create ``store`` with an empty ``mask`` of the scene's shape, CRS and transform, not yet complete.

    ``class_colors`` (``#rrggbb`` per class, `pipeline.palette` resolves them) go to the attributes with the names.
    """
    attrs = {**_class_attributes(class_names, class_colors), _JOB: job_id, _COMPLETE: False}
    if source_image is not None:
        attrs["source_image"] = source_image
    ds, encoding = _template((scene.height, scene.width), scene.affine, scene.crs, (chunk, chunk), attrs)
    with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3; xarray reads it
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(store, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=True)


def create_level_array(store: Path, level: int, shape: tuple[int, int], transform, crs, chunk: int) -> tuple[int, int]:
    """Create overview ``level`` (group ``level``, array ``mask``) empty and georeferenced; returns its chunk shape."""
    chunks = (min(chunk, shape[0]), min(chunk, shape[1]))
    classes = {k: v for k, v in _mask_attributes(store).items() if k in ("class_names", _COLORS)}  # as level 0 says
    ds, encoding = _template(shape, transform, crs, chunks, {"overview_level": level, "resampling_method": "mode", **classes})
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


INSTANCES = "instances"


def create_instances_array(store: Path, attrs: dict) -> None:
    """Add ``instances`` (H, W) uint32 to a mask store, empty (0: no object), chunked and georeferenced like the mask.

    ``attrs`` say how the ids were made (connectivity, thing classes, the id rule). It is not complete until
    `mark_instances_complete`; one task writes each chunk (`write_instances_chunk`).
    """
    mask = zarr.open_array(str(store), path=MASK, mode="r")
    root = zarr.open_group(str(store), mode="r+")
    arr = root.create_array(
        INSTANCES, shape=mask.shape, chunks=mask.chunks, dtype="uint32", fill_value=0, dimension_names=("y", "x"),
        overwrite=True,
    )
    grid_mapping = mask.attrs.get("grid_mapping")  # xarray/rioxarray find the CRS of `instances` through it
    arr.attrs.update({
        **({"grid_mapping": grid_mapping} if grid_mapping else {}),
        **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in attrs.items()},
        _COMPLETE: False,
    })
    consolidate(store)


def write_instances_chunk(store: Path, window: Window, ids: np.ndarray) -> None:
    """Write one chunk's object ids into its region of ``instances`` (one writer per chunk)."""
    arr = zarr.open_array(str(store), path=INSTANCES, mode="r+")
    arr[window.row_off : window.row_stop, window.col_off : window.col_stop] = ids


def mark_instances_complete(store: Path, objects: int) -> None:
    """Record that every chunk of ``instances`` is written, and how many objects it holds: its last write."""
    arr = zarr.open_array(str(store), path=INSTANCES, mode="r+")
    arr.attrs.update({"objects": int(objects), _COMPLETE: True})
    consolidate(store)


def instances_complete(store: Path) -> bool:
    """Whether ``store`` holds an ``instances`` array whose every chunk is written."""
    try:
        meta = json.loads((Path(store) / INSTANCES / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("attributes") or {}).get(_COMPLETE) is True


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


def _json_list(value: object) -> list | None:
    """A list attribute as stored (xarray writes lists as JSON text); None when it is no list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return list(value) if isinstance(value, list) else None


def stored_class_colors(path: Path) -> list[str] | None:
    """The class colours a satseg store carries (``#rrggbb`` each); None for stores made before colours were kept."""
    colors = _json_list(_mask_attributes(path).get(_COLORS))
    try:
        return [parse_color(c) for c in colors] if colors else None
    except ValueError:
        return None


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
    class_colors: list[str] | None = None  # #rrggbb per class; None for stores made before colours were kept


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
    names = _json_list(arr.attrs.get("class_names")) or []
    crs, transform = zarr_georeference(store, MASK)
    colors = stored_class_colors(store)
    return MaskStore(
        store, arr, list(names), crs, transform or NO_TRANSFORM, str(arr.attrs.get(_JOB)),
        is_zarr_node(store / PROBABILITIES), colors if colors is not None and len(colors) == len(names) else None,
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
