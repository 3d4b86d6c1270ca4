"""Objects of a scene's mask: instance ids in the mask store, polygons in GeoParquet, object metrics; chunk by chunk.

Three passes over the mask store's chunk grid, each one Dask task per chunk (on
Ray through ``ray.util.dask`` when a job joined a cluster), none holding more
than its chunk's pixels:

1. **Segments** (``_segments``): a chunk labels the connected components of its
   thing classes (and of the labels', or reads an instance raster's segments)
   and reports their class, first pixel, size and box, with the labels along its
   edges. The core joins components across chunk edges by union-find and ranks
   ids by first pixel (``pipeline/core/objects.py``), so ids do not depend on
   the chunking.
2. **Instances and counts** (``_instances``): a chunk writes its ids to the
   store's ``instances`` array (one writer per chunk) and counts the pixels of
   each (true segment, predicted segment) pair; Dask tree-reduces the counts,
   exactly (integers), into the object metrics.
3. **Polygons** (``_polygons``): a chunk traces its stored ids; an object inside
   one chunk is finished there, one spanning chunks is united from its pieces
   as soon as its last chunk is traced. Chunks go in row-major batches, so only
   pieces of objects crossing the current batch are held, and rows stream to
   Parquet.

The driver holds per-object numbers (class, first pixel, size, box, match; under 1 KB an object at the
peak, BENCHMARKS.md), never pixels: its memory follows the number of objects, not the scene's size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.metrics import class_indices, prediction_indices
from pipeline.core.objects import CONNECTIVITIES, ObjectScores, SceneObjects, merge_components, merge_keyed, object_scores
from pipeline.counting import Raster, chunk_windows, dask_scheduler, geotiff_raster, mask_raster, probabilities_raster
from pipeline.object_tables import object_metrics_table, object_misses_table, open_objects_table
from pipeline.report_tables import write_table
from schemas.errors import MismatchError, SpecError
from schemas.store import OutputLayout, is_zarr_node
from workers.objects import (
    KEY_CLASSES, chunk_segments, instance_segments, label_components, map_polygons, polygon_pieces, require_shapely, union_pieces,
)
from workers.reader import SceneInfo, check_labels_match, grid_difference, open_scene

__all__ = [
    "ObjectSpec", "object_spec", "ObjectsResult", "scene_objects", "job_scene_objects", "folder_objects", "check_job_things",
    "check_instances", "job_objects",
]

log = logging.getLogger(__name__)

ID_RULE = "objects ranked by their first pixel in row-major order, numbered 1..N; 0 is no object"
_SPLIT_EVERY = 8


@dataclass(frozen=True)
class ObjectSpec:
    """What objects are and how they are scored: classes, which are things, connectivity, simplification, labels."""

    class_names: tuple[str, ...]
    things: tuple[int, ...]  # class indices
    connectivity: int = 4
    simplify: float | None = None  # map units
    ignore_index: int | None = 255
    label_values: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_thing(self) -> np.ndarray:
        out = np.zeros(self.num_classes, dtype=bool)
        out[list(self.things)] = True
        return out

    @property
    def stuff_rank(self) -> np.ndarray:
        """(C,) each stuff class's place among the stuff classes; -1 for things."""
        rank = np.full(self.num_classes, -1, dtype=np.int64)
        stuff = ~self.is_thing
        rank[stuff] = np.arange(int(stuff.sum()))
        return rank


def object_spec(
    class_names: list[str], things: list[str], *, connectivity: int = 4, simplify: float | None = None,
    ignore_index: int | None = 255, label_values: list[int] | None = None, source: str = "job",
) -> ObjectSpec:
    """An `ObjectSpec` from thing class names; a name that is no class is one line naming ``source`` and the classes."""
    unknown = [t for t in things if t not in class_names]
    if unknown:
        raise SpecError(
            f"{source}: things {unknown[0]!r} is not a class; the classes are {', '.join(class_names)}; fix `things`"
        )
    if connectivity not in CONNECTIVITIES:
        raise SpecError(f"{source}: connectivity must be 4 or 8 (got {connectivity})")
    if simplify is not None and not simplify >= 0:
        raise SpecError(f"{source}: simplify is a tolerance in map units, >= 0 (got {simplify})")
    require_shapely()
    return ObjectSpec(
        tuple(class_names), tuple(sorted(class_names.index(t) for t in set(things))), connectivity, simplify or None,
        ignore_index, tuple(label_values) if label_values is not None else None,
    )


def check_instances(image: SceneInfo, instances: str | Path) -> None:
    """An instance raster lies on the image's grid (so the mask's), pixel for pixel, as its labels do: else one line.

    Read window by window, one of another grid would give other pixels' ids (or fail in a chunk), not an error.
    """
    difference = grid_difference(image, open_scene(instances, role="instances"))
    if difference is not None:
        raise MismatchError(
            f"{instances}: instance raster {difference} (the grid of {image.path}); resample or crop it onto the image grid"
        )


def _check_truth(store: Path, shape: tuple[int, int], transform: tuple, crs, labels: str | None, instances: str | None) -> None:
    """Labels and instance raster on the mask's grid, checked from their metadata before any chunk is read."""
    if not labels:
        return
    wkt = crs.to_wkt() if hasattr(crs, "to_wkt") else (crs or None)
    grid = SceneInfo(str(store), *shape, 1, "uint8", wkt, tuple(float(v) for v in tuple(transform)[:6]), None)
    check_labels_match(grid, open_scene(labels, role="label"))
    if instances:
        check_instances(grid, instances)


def _pred_classes(pred: Raster, window: Window, spec: ObjectSpec) -> np.ndarray:
    return prediction_indices(pred.read(window), spec.num_classes)


def _truth_labels(labels: Raster, instances: Raster | None, window: Window, spec: ObjectSpec):
    """The truth's class map and its local segments: components of its thing classes, or an instance raster's."""
    truth = class_indices(
        labels.read(window), spec.num_classes, ignore_index=spec.ignore_index,
        label_values=list(spec.label_values) if spec.label_values is not None else None,
    )
    if instances is not None:
        lab, classes, keys = instance_segments(truth, instances.read(window), spec.things)
        return truth, lab, classes, keys
    lab, classes = label_components(truth, spec.things, spec.connectivity)
    return truth, lab, classes, None


def _segments(window: Window, pred: Raster, labels: Raster | None, instances: Raster | None, probabilities: Raster | None,
              spec: ObjectSpec, width: int):
    """Pass 1 of a chunk: its predicted segments (and true ones, with labels), with their edges."""
    p = _pred_classes(pred, window, spec)
    lab, classes = label_components(p, spec.things, spec.connectivity)
    values = None
    if probabilities is not None:
        probs = probabilities.read(window, raw=True)
        values = np.take_along_axis(probs, np.maximum(p, 0)[None].astype(np.int64), axis=0)[0]
    predicted = chunk_segments(window, lab, classes, width, values)
    if labels is None:
        return predicted, None
    _, tlab, tclasses, keys = _truth_labels(labels, instances, window, spec)
    return predicted, chunk_segments(window, tlab, tclasses, width, keys=keys)


def _instances(window: Window, pred: Raster, labels: Raster | None, instances: Raster | None, spec: ObjectSpec,
               store: str, pred_lookup: np.ndarray, truth_lookup: np.ndarray | None, sizes: tuple[int, int]):
    """Pass 2 of a chunk: write its object ids; count its (true segment, predicted segment) pixel pairs.

    Segments: thing objects first (id - 1), then one per stuff class; true index ``St`` is void.
    """
    from workers.mask_store import write_instances_chunk

    p = _pred_classes(pred, window, spec)
    lab, _ = label_components(p, spec.things, spec.connectivity)
    ids = pred_lookup[lab]
    write_instances_chunk(Path(store), window, ids)
    if labels is None:
        return None
    n_pred, n_truth = sizes
    stuff = spec.stuff_rank
    n_stuff = int((stuff >= 0).sum())
    ps = ids.astype(np.int64) - 1
    on_stuff = (p >= 0) & (ids == 0)
    ps[on_stuff] = n_pred + stuff[p[on_stuff]]
    truth, tlab, _, _ = _truth_labels(labels, instances, window, spec)
    tids = truth_lookup[tlab]
    ts = np.full(truth.shape, n_truth + n_stuff, dtype=np.int64)  # void
    ts[tids > 0] = tids[tids > 0].astype(np.int64) - 1
    t_stuff = truth >= 0
    t_stuff[t_stuff] = stuff[truth[t_stuff]] >= 0
    ts[t_stuff] = n_truth + stuff[truth[t_stuff]]
    scored = ps >= 0  # a pixel without prediction is counted nowhere (nodata, ARCHITECTURE.md invariant 5)
    keys, counts = np.unique(ts[scored] * (n_pred + n_stuff) + ps[scored], return_counts=True)
    return keys, counts.astype(np.int64)


def _add_pairs(*parts):
    """Pair counts summed by key: the exact reduction of pass 2."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    unique, inverse = np.unique(keys, return_inverse=True)
    summed = np.zeros(len(unique), dtype=np.int64)
    np.add.at(summed, inverse.ravel(), counts)
    return unique, summed


def _polygons(window: Window, store: str, transform: tuple, simplify: float | None, spanning: np.ndarray):
    """Pass 3 of a chunk: finished polygons of the objects inside it; pixel-coordinate pieces (WKB) of the others."""
    import shapely
    import zarr

    from workers.mask_store import INSTANCES

    arr = zarr.open_array(store, path=INSTANCES, mode="r")
    ids = arr[window.row_off : window.row_stop, window.col_off : window.col_stop]
    piece_ids, geoms = polygon_pieces(ids, window)
    part = np.isin(piece_ids, spanning)
    order = np.argsort(piece_ids[~part], kind="stable")
    whole = geoms[~part][order]
    unique, starts, counts = np.unique(piece_ids[~part][order], return_index=True, return_counts=True)
    objects = whole[starts]  # most objects are one piece; 8-connected ones may be several
    for i in np.flatnonzero(counts > 1):
        objects[i] = union_pieces(list(whole[starts[i] : starts[i] + counts[i]]))
    wkb, perimeter, bounds = map_polygons(objects, transform, simplify)
    return unique, wkb, perimeter, bounds, piece_ids[part], list(shapely.to_wkb(geoms[part])) if part.any() else []


def _tree_sum(parts: list):
    """One Dask tree reduction of per-chunk pair counts (``_SPLIT_EVERY`` at a time)."""
    if not parts:
        return None
    while len(parts) > 1:
        parts = [dask.delayed(_add_pairs, pure=True)(*parts[i : i + _SPLIT_EVERY]) for i in range(0, len(parts), _SPLIT_EVERY)]
    return parts[0]


@dataclass
class ObjectsResult:
    """What the object pass of a scene found, and how long its parts took."""

    scene: str
    objects: int
    truth_objects: int | None
    scores: ObjectScores | None
    chunks: int
    seconds: dict = field(default_factory=dict)  # segments, merge, instances, polygons

    @property
    def polygons_per_second(self) -> float:
        s = self.seconds.get("polygons", 0.0)
        return self.objects / s if s > 0 else float("nan")


def _map_boxes(bbox: np.ndarray, transform: tuple) -> np.ndarray:
    """(n, 4) pixel boxes (first row, first col, last row, last col) as xmin, ymin, xmax, ymax in the scene CRS."""
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    r0, c0, r1, c1 = (bbox[:, i].astype(np.float64) for i in range(4))
    corners = [(c0, r0), (c1 + 1, r0), (c0, r1 + 1), (c1 + 1, r1 + 1)]
    xs = np.stack([a * x + b * y + c for x, y in corners])
    ys = np.stack([d * x + e * y + f for x, y in corners])
    return np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=1) if len(bbox) else np.zeros((0, 4))


class _Rows:
    """Rows of the objects table for given ids, from the merged objects and the matches."""

    def __init__(self, objects: SceneObjects, width: int, transform: tuple, probabilities: bool, scores: ObjectScores | None,
                 truth_ids: np.ndarray | None):
        self.o, self.width = objects, width
        a, b, _, d, e, _ = (float(v) for v in tuple(transform)[:6])
        self.pixel_area = abs(a * e - b * d)
        self.probabilities = probabilities
        self.scores, self.truth_ids = scores, truth_ids

    def columns(self, ids: np.ndarray, wkb: list, perimeter: np.ndarray, bounds: np.ndarray) -> dict:
        o, k = self.o, np.asarray(ids, dtype=np.int64) - 1
        box = o.bbox[k]
        cols = {
            "object_id": k + 1, "class_index": o.classes[k], "pixels": o.pixels[k], "area": o.pixels[k] * self.pixel_area,
            "perimeter": perimeter, "first_row": o.first[k] // self.width, "first_col": o.first[k] % self.width,
            "row_off": box[:, 0], "col_off": box[:, 1], "height": box[:, 2] - box[:, 0] + 1,
            "width": box[:, 3] - box[:, 1] + 1, "chunks": o.chunks[k], "geometry": wkb, "bounds": bounds,
            "mean_probability": o.value_sum[k] / (o.pixels[k] * 255.0) if self.probabilities else None,
        }
        if self.scores is not None:
            match = self.scores.pred_match[k]
            cols["truth_id"] = np.where(match >= 0, self.truth_ids[np.maximum(match, 0)], -1)
            cols["iou"] = self.scores.pred_iou[k]
            cols["matched"] = match >= 0
        return cols


def scene_objects(
    layout: OutputLayout, job_id: str, scene: str, store: Path, spec: ObjectSpec, *, transform: tuple, crs,
    labels: str | None = None, instances: str | None = None, batch: int | None = None,
) -> ObjectsResult:
    """The object pass of one scene's mask store (chunk by chunk, with the current Dask scheduler).

    Writes ``instances`` into the store and the ``objects`` table (and, with
    ``labels``, ``object_metrics`` and ``object_misses``) under ``layout``'s reports.
    ``instances``: a raster of true object ids beside ``labels`` (else the labels'
    components are the true objects). ``batch``: chunks traced at once (default a row of chunks, 4 to 32).
    """
    from workers.mask_store import MASK, PROBABILITIES, create_instances_array, mark_instances_complete

    import zarr

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    mask = zarr.open_array(str(store), path=MASK, mode="r")
    height, width = mask.shape
    _check_truth(store, (height, width), transform, crs, labels, instances)
    windows, sizes = chunk_windows((height, width), tuple(mask.chunks))
    grid = (len(sizes[0]), len(sizes[1]))
    pred = mask_raster(store)
    probs = probabilities_raster(store) if is_zarr_node(Path(store) / PROBABILITIES) else None
    truth = geotiff_raster(labels, (height, width), mask.chunks[0]) if labels else None
    truth_ids = geotiff_raster(instances, (height, width), mask.chunks[0]) if (labels and instances) else None

    task = dask.delayed(_segments, pure=True)
    found = dask.compute(*[task(w, pred, truth, truth_ids, probs, spec, width) for w in windows])
    seconds["segments"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    objects = merge_components([f[0] for f in found], grid, spec.connectivity)
    true = None
    if truth is not None:
        true_chunks = [f[1] for f in found]
        true = merge_keyed(true_chunks) if truth_ids is not None else merge_components(true_chunks, grid, spec.connectivity)
        del true_chunks
    del found  # the chunks' segments: the objects hold what is needed of them now
    spanning = []
    for lookup in objects.lookups:
        here = lookup[1:].astype(np.int64)
        spanning.append(np.unique(here[objects.chunks[here - 1] > 1]) if len(here) else here)
    seconds["merge"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    create_instances_array(store, {
        "description": "object ids of the thing classes' connected components", "id_rule": ID_RULE,
        "connectivity": spec.connectivity, "things": [spec.class_names[i] for i in spec.things],
    })
    things_found = (len(objects), len(true) if true is not None else 0)
    task = dask.delayed(_instances, pure=False)  # it writes its chunk
    parts = [
        task(w, pred, truth, truth_ids, spec, str(store), objects.lookups[k], true.lookups[k] if true is not None else None,
             things_found)
        for k, w in enumerate(windows)
    ]
    (pairs,) = dask.compute(_tree_sum(parts))
    mark_instances_complete(store, len(objects))
    scores, true_object_ids = None, None
    if true is not None:
        n_stuff = int((spec.stuff_rank >= 0).sum())
        stuff_classes = np.flatnonzero(~spec.is_thing)
        sp = len(objects) + n_stuff  # predicted segments: objects, then one per stuff class
        keys, counts = pairs if pairs is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        scores = object_scores(
            keys // sp, keys % sp, counts, np.concatenate([true.classes, stuff_classes]),
            np.concatenate([objects.classes, stuff_classes]), spec.is_thing,
        )
        true_object_ids = true.keys // KEY_CLASSES if true.keys is not None else np.arange(1, len(true) + 1)
    seconds["instances"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    rows = _Rows(objects, width, transform, probs is not None, scores, true_object_ids)
    _write_polygons(layout.report_file("objects", job_id, scene), scene, spec, store, transform, crs, windows, spanning,
                    objects, rows, batch or min(32, max(4, grid[1])))
    seconds["polygons"] = time.perf_counter() - t3
    if scores is not None:
        write_table(
            object_metrics_table(scene, list(spec.class_names), scores, spec.connectivity,
                                 "instances" if truth_ids is not None else "components"),
            layout.report_file("object_metrics", job_id, scene),
        )
        thing_truth = np.arange(len(true))
        missed = thing_truth[(scores.truth_area[: len(true)] > 0) & (scores.truth_match[: len(true)] < 0)]
        box = true.bbox[missed]
        write_table(object_misses_table(scene, list(spec.class_names), {
            "truth_id": true_object_ids[missed], "class_index": true.classes[missed],
            "pixels": scores.truth_area[missed], "iou": scores.truth_iou[missed], "row_off": box[:, 0], "col_off": box[:, 1],
            "height": box[:, 2] - box[:, 0] + 1, "width": box[:, 3] - box[:, 1] + 1, "bounds": _map_boxes(box, transform),
        }), layout.report_file("object_misses", job_id, scene))
    seconds["total"] = time.perf_counter() - t0
    return ObjectsResult(scene, len(objects), len(true) if true is not None else None, scores, len(windows), seconds)


def _write_polygons(path: Path, scene: str, spec: ObjectSpec, store: Path, transform: tuple, crs, windows: list[Window],
                    spanning: list[np.ndarray], objects: SceneObjects, rows: _Rows, batch: int) -> None:
    """Pass 3: trace chunks in row-major batches; stream finished objects to the objects table as row groups."""
    import shapely

    task = dask.delayed(_polygons, pure=True)
    pieces: dict[int, list] = {}
    left: dict[int, int] = {}
    transform = tuple(float(v) for v in tuple(transform)[:6])
    with open_objects_table(path, scene, list(spec.class_names), crs, spec.connectivity) as table:
        for start in range(0, len(windows), batch):
            ks = range(start, min(start + batch, len(windows)))
            results = dask.compute(*[task(windows[k], str(store), transform, spec.simplify, spanning[k]) for k in ks])
            done_ids, done_geoms = [], []
            for ids, wkb, perimeter, bounds, part_ids, part_wkb in results:
                table.append(rows.columns(ids, wkb, perimeter, bounds))
                for i, g in zip(part_ids.tolist(), shapely.from_wkb(part_wkb) if part_wkb else []):
                    pieces.setdefault(i, []).append(g)
                for i in np.unique(part_ids).tolist():
                    left[i] = left.get(i, int(objects.chunks[i - 1])) - 1
                    if left[i] == 0:
                        del left[i]
                        done_ids.append(i)
                        done_geoms.append(union_pieces(pieces.pop(i)))
            if done_ids:
                order = np.argsort(done_ids)
                wkb, perimeter, bounds = map_polygons([done_geoms[j] for j in order], transform, spec.simplify)
                table.append(rows.columns(np.asarray(done_ids)[order], wkb, perimeter, bounds))
        if pieces:
            raise RuntimeError(f"{scene}: objects {sorted(pieces)[:3]} were not traced in all their chunks")


def job_scene_objects(
    layout: OutputLayout, job_id: str, scene: str, store: Path, class_names: list[str], things: list[str], *,
    transform: tuple, crs, labels: str | None, instances: str | None = None, connectivity: int = 4,
    simplify: float | None = None, ignore_index: int | None = 255, label_values: list[int] | None = None,
    use_ray: bool = False, source: str = "job",
) -> ObjectsResult:
    """`scene_objects` with a job's settings, on Ray's Dask scheduler when the job joined a cluster."""
    spec = object_spec(
        class_names, things, connectivity=connectivity, simplify=simplify, ignore_index=ignore_index,
        label_values=label_values, source=source,
    )
    with dask.config.set(scheduler=dask_scheduler(use_ray)):
        result = scene_objects(
            layout, job_id, scene, store, spec, transform=transform, crs=crs, labels=labels, instances=instances,
        )
    log.info("%s: %d objects, polygons at %.0f/s", scene, result.objects, result.polygons_per_second)
    return result


def _instances_by_scene(names: list[str], given: list[str] | None) -> dict[str, str]:
    """``--instances`` values: ``SCENE=PATH`` each, or one bare PATH for a job of one scene."""
    out: dict[str, str] = {}
    for item in given or []:
        scene, sep, path = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise SpecError(f"--instances {item}: the job has {len(names)} scenes; give SCENE=PATH")
            scene, path = names[0], item
        if scene not in names:
            raise SpecError(f"--instances {item}: no scene {scene!r} in the job; its scenes are {', '.join(names)}")
        out[scene] = path
    return out


def _recorded_labels(layout: OutputLayout, job_id: str, scene: str) -> str | None:
    """The scene's labels as its report row keeps them (`schemas.rasters.recorded_path`: a local file by its absolute
    path), so a job run with relative paths finds them from any folder; None without a row that names them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(layout.report_file("scenes", job_id, scene), columns=["labels"]).to_pylist()
    except (OSError, pa.ArrowException):  # no row (or an unreadable one): the job record's path
        return None
    return rows[0]["labels"] if rows and rows[0].get("labels") else None


def folder_objects(
    out: str | Path, *, things: list[str] | None = None, connectivity: int | None = None, simplify: float | None = None,
    scenes: list[str] | None = None, instances: list[str] | None = None,
) -> list[ObjectsResult]:
    """The object pass of a finished job's scenes (`satseg objects OUT`), with the job's settings unless given here.

    Runs here, on Dask's threads; writes into the job's mask stores and report tables (its job id).
    """
    from pydantic import ValidationError

    from pipeline.job_folder import read_job_record
    from schemas.job import JobSpec
    from workers.mask_store import is_complete, open_mask_store

    layout = OutputLayout(Path(out))
    record = read_job_record(layout.root)
    if record is None:
        raise SpecError(f"{layout.root}: no job.json here; pass the `out` folder of a finished job")
    try:
        job = JobSpec.model_validate(record.get("spec") or {})
    except ValidationError:
        raise SpecError(f"{layout.job_file}: not a job this satseg reads; rerun the job with this satseg") from None
    source = "--things" if things else str(layout.job_file)
    things = things or job.things
    if not things:
        raise SpecError(f"{layout.root}: the job has no `things`; give --things CLASS[,CLASS...]")
    names = [s.scene_name for s in job.scenes]
    unknown = [s for s in scenes or [] if s not in names]
    if unknown:
        raise SpecError(f"--scene {unknown[0]}: no such scene in {layout.job_file}; its scenes are {', '.join(names)}")
    truth_ids = _instances_by_scene(names, instances)
    results = []
    for scene in job.scenes:
        name = scene.scene_name
        store = layout.mask_store(name)
        if scenes and name not in scenes:
            continue
        if not scenes and not is_complete(store):
            log.warning("%s: not finished; its objects wait until the job completes it", name)
            continue
        mask = open_mask_store(store, then="run satseg objects again")
        given = truth_ids.get(name) or (str(scene.instances) if scene.instances is not None else None)
        if given and scene.labels is None:
            raise SpecError(f"--instances {given}: scene {name} has no labels to give the objects' classes")
        job_id = str(record.get("job_id"))
        labels = (_recorded_labels(layout, job_id, name) or str(scene.labels)) if scene.labels is not None else None
        results.append(job_scene_objects(
            layout, job_id, name, store, mask.class_names, list(things), transform=mask.transform,
            crs=mask.crs, labels=labels, instances=given,
            connectivity=connectivity or job.connectivity, simplify=job.simplify if simplify is None else simplify,
            ignore_index=job.ignore_index, label_values=job.label_values, source=source,
        ))
    return results


def check_job_things(job, class_names: list[str]) -> None:
    """Refuse, before a job runs, `things` that are no class of its model (a checkpoint's classes are known only now)."""
    if job.things:
        object_spec(class_names, list(job.things), connectivity=job.connectivity, simplify=job.simplify, source="job")


def job_objects(job, layout: OutputLayout, job_id: str, scene, store: Path, class_names: list[str], info, use_ray: bool):
    """`satseg run`'s object pass of a scene (nothing without `things`): after its mask and reports, before it is complete.

    ``job`` is the `JobSpec`, ``scene`` its `SceneSpec`, ``info`` the image's `SceneInfo`.
    """
    if not job.things:
        return None
    return job_scene_objects(
        layout, job_id, scene.scene_name, store, class_names, list(job.things), transform=info.transform, crs=info.crs,
        labels=str(scene.labels) if scene.labels is not None else None,
        instances=str(scene.instances) if scene.instances is not None else None, connectivity=job.connectivity,
        simplify=job.simplify, ignore_index=job.ignore_index, label_values=job.label_values, use_ray=use_ray,
    )
