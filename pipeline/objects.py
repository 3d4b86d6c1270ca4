"""Objects of a scene's mask: instance ids in the mask store, polygons in GeoParquet, object metrics; chunk by chunk.

Three passes over the mask store's chunk grid, each one Dask task per chunk (on
Ray through ``ray.util.dask`` when a job joined a cluster), none holding more
than its chunk's pixels, and a driver that holds only what touches chunk
borders (ARCHITECTURE.md, invariant 9):

1. **Segments** (``_segments``): a chunk labels the connected components of its
   thing classes (and of the labels', or lists an instance raster's keys). It
   reports the components on its borders one by one, with the labels along its
   edges, and the inner ones, which are whole objects already, as counts per
   row. The core joins border components across chunk edges by union-find and
   ranks ids by first pixel (``pipeline/core/objects.py``), so ids do not
   depend on the chunking.
2. **Instances and counts** (``_instances``): a chunk numbers its objects
   (``local_ids``), writes them to the store's ``instances`` array (one writer
   per chunk), and settles the matches between segments that lie inside it;
   segments on its borders, stuff, and those facing them travel as pixel counts
   that Dask tree-reduces, exactly (integers), and the driver settles
   (``settle``).
3. **Polygons** (``_polygons``): a chunk traces its stored ids and its missed
   true objects; one inside the chunk is finished there, with its row (its
   match settled by the chunk, or by the driver when it faced a border
   segment); one spanning chunks is united from its pieces as soon as its last
   chunk is traced. Chunks go in row-major batches, so only pieces of objects
   crossing the current batch are held, and rows stream to Parquet.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.metrics import class_indices, prediction_indices
from pipeline.core.objects import (
    CONNECTIVITIES, NO_MATCH, VOID, ChunkIds, Decisions, KeyedObjects, ObjectScores, SceneObjects, Segments, Tally,
    chunk_tally, combine_tallies, local_ids, merge_components, merge_keyed, settle, stuff_keys,
)
from pipeline.counting import Raster, chunk_windows, dask_scheduler, geotiff_raster, mask_raster, probabilities_raster
from pipeline.object_tables import object_metrics_table, open_objects_table
from pipeline.report_tables import write_table
from schemas.errors import MismatchError, SpecError
from schemas.reports import OBJECT_MISSES
from schemas.store import OutputLayout, is_zarr_node
from workers.objects import (
    KEY_CLASSES, MAX_INSTANCE_ID, chunk_segments, instance_segments, label_components, map_polygons, polygon_pieces,
    require_shapely, segment_stats, union_pieces,
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


def _truth_classes(labels: Raster, window: Window, spec: ObjectSpec) -> np.ndarray:
    return class_indices(
        labels.read(window), spec.num_classes, ignore_index=spec.ignore_index,
        label_values=list(spec.label_values) if spec.label_values is not None else None,
    )


def _shown_ids(keys: np.ndarray, keyed: bool) -> np.ndarray:
    """The true ids users see: a component's id (its key), or an instance raster's own id (its key without the class)."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys // KEY_CLASSES if keyed else keys


@dataclass(frozen=True)
class _ChunkTruth:
    """What a chunk task needs to key its true segments: the merge's ids (components) or nothing (an instance raster's
    keys are its ids), and the true objects of the chunk that the scene settles (shared with another chunk)."""

    ids: ChunkIds | None
    open: np.ndarray

    @property
    def keyed(self) -> bool:
        return self.ids is None


@dataclass(frozen=True)
class _TrueSegments:
    """A chunk's true thing segments: local labels (1..n), and per label its key, class, first pixel and box."""

    labels: np.ndarray
    keys: np.ndarray
    classes: np.ndarray
    first: np.ndarray
    bbox: np.ndarray


@dataclass(frozen=True)
class _Truth:
    """The scene's true objects after the merge: components (``SceneObjects``) or an instance raster's (``KeyedObjects``)."""

    merged: SceneObjects | KeyedObjects

    @property
    def keyed(self) -> bool:
        return isinstance(self.merged, KeyedObjects)

    def chunk(self, k: int) -> _ChunkTruth:
        if self.keyed:
            return _ChunkTruth(None, self.merged.chunk_open[k])
        ids = self.merged.chunk_ids[k]
        return _ChunkTruth(ids, np.unique(ids.edge_ids))

    def chunks_of(self, keys: np.ndarray) -> np.ndarray:
        """How many chunks hold each open true object's pixels."""
        if self.keyed:
            return self.merged.chunks[np.searchsorted(self.merged.shared, keys)]
        return self.merged.chunks[self.merged.index(keys)]


def _instance_ids(instances: Raster, window: Window) -> np.ndarray:
    """An instance raster's ids in a window (int64; -1 its nodata; 0 no object): 1 to ``MAX_INSTANCE_ID``, else one
    line naming the file (an id is keyed with its class in an int64; a uint64 id of 2^63 or more reads as negative)."""
    ids = instances.read(window)
    bad = ids[(ids > MAX_INSTANCE_ID) | (ids < -1)]
    if bad.size:
        raise SpecError(
            f"{instances.path}: instance id {int(bad[0])} is out of range (0 for none, else 1 to 2^55 - 1); renumber the ids"
        )
    return ids


def _truth_segments(labels: Raster, instances: Raster | None, window: Window, spec: ObjectSpec, truth: _ChunkTruth,
                    width: int) -> tuple[np.ndarray, _TrueSegments]:
    """The truth's class map, and its thing segments in the chunk."""
    classes = _truth_classes(labels, window, spec)
    if instances is not None:
        lab, label_classes, keys = instance_segments(classes, _instance_ids(instances, window), spec.things)
    else:
        lab, label_classes = label_components(classes, spec.things, spec.connectivity)
    first, _, _, bbox = segment_stats(window, lab, len(label_classes), width)
    if instances is None:
        keys = local_ids(truth.ids, first)[1:]
    return classes, _TrueSegments(lab, np.asarray(keys, np.int64), np.asarray(label_classes, np.int64), first, bbox)


def _segments(window: Window, pred: Raster, labels: Raster | None, instances: Raster | None, probabilities: Raster | None,
              spec: ObjectSpec, width: int):
    """Pass 1 of a chunk: its predicted segments (and true ones, with labels) as the merge needs them."""
    p = _pred_classes(pred, window, spec)
    lab, classes = label_components(p, spec.things, spec.connectivity)
    values = None
    if probabilities is not None:
        probs = probabilities.read(window, raw=True)
        values = np.take_along_axis(probs, np.maximum(p, 0)[None].astype(np.int64), axis=0)[0]
    predicted = chunk_segments(window, lab, classes, width, values)
    if labels is None:
        return predicted, None
    truth = _truth_classes(labels, window, spec)
    if instances is not None:
        return predicted, instance_segments(truth, _instance_ids(instances, window), spec.things)[2]
    tlab, tclasses = label_components(truth, spec.things, spec.connectivity)
    return predicted, chunk_segments(window, tlab, tclasses, width)


def _pred_ids(pred: Raster, window: Window, spec: ObjectSpec, ids: ChunkIds, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's predicted classes and object ids (int64, 0: no object)."""
    p = _pred_classes(pred, window, spec)
    lab, classes = label_components(p, spec.things, spec.connectivity)
    first = segment_stats(window, lab, len(classes), width)[0]
    return p, local_ids(ids, first)[lab]


def _score(window: Window, p: np.ndarray, ids: np.ndarray, labels: Raster, instances: Raster | None, spec: ObjectSpec,
           truth: _ChunkTruth, pred_open: np.ndarray, k: int, width: int):
    """A chunk's object metrics (``chunk_tally``), and its true segments (labels, keys, first pixels, boxes).

    Segment keys: predicted objects by id, true ones by component id or instance key, stuff by ``stuff_keys``.
    """
    classes, segs = _truth_segments(labels, instances, window, spec, truth, width)
    tlab, tkeys, tfirst, tbbox = segs.labels, segs.keys, segs.first, segs.bbox
    rank = spec.stuff_rank
    every_stuff = stuff_keys(np.flatnonzero(rank >= 0), rank)
    pk = np.where(ids > 0, ids, stuff_keys(np.maximum(p, 0), rank))  # a pixel of no object is of a stuff class
    tk = np.full(classes.shape, VOID, dtype=np.int64)
    thing = tlab > 0
    tk[thing] = tkeys[tlab[thing] - 1]
    stuff = classes >= 0
    stuff[stuff] = rank[classes[stuff]] >= 0
    tk[stuff] = stuff_keys(classes[stuff], rank)
    tc = np.where(tk == VOID, -1, classes)
    scored = p >= 0  # a pixel without prediction is counted nowhere (nodata, ARCHITECTURE.md invariant 5)
    tk, pk, tc, pc = tk[scored], pk[scored], tc[scored], p[scored]
    tu, ti = np.unique(tk, return_inverse=True)
    pu, pi = np.unique(pk, return_inverse=True)
    pair, count = np.unique(ti.ravel() * max(len(pu), 1) + pi.ravel(), return_counts=True)
    t_cls, p_cls = np.zeros(len(tu), np.int16), np.zeros(len(pu), np.int16)
    t_cls[ti.ravel()], p_cls[pi.ravel()] = tc, pc
    tpair, ppair = pair // max(len(pu), 1), pair % max(len(pu), 1)
    scoring = chunk_tally(
        tu[tpair], pu[ppair], count, t_cls[tpair], p_cls[ppair], truth_open=np.concatenate([truth.open, every_stuff]),
        pred_open=np.concatenate([pred_open, every_stuff]), things=spec.is_thing,
        truth_things=(tkeys, segs.classes, tfirst, tbbox), chunk=k,
    )
    return scoring, segs


def _instances(window: Window, pred: Raster, labels: Raster | None, instances: Raster | None, spec: ObjectSpec,
               store: str, ids: ChunkIds, truth: _ChunkTruth | None, k: int, width: int) -> Tally | None:
    """Pass 2 of a chunk: write its object ids; settle the matches it can and tally the rest."""
    from workers.mask_store import write_instances_chunk

    p, object_ids = _pred_ids(pred, window, spec, ids, width)
    write_instances_chunk(Path(store), window, object_ids.astype(np.uint32))
    if labels is None:
        return None
    return _score(window, p, object_ids, labels, instances, spec, truth, ids.edge_ids, k, width)[0].tally


def _tree_sum(parts: list):
    """One Dask tree reduction of per-chunk tallies (``_SPLIT_EVERY`` at a time)."""
    if not parts:
        return None
    while len(parts) > 1:
        parts = [dask.delayed(combine_tallies, pure=True)(*parts[i : i + _SPLIT_EVERY])
                 for i in range(0, len(parts), _SPLIT_EVERY)]
    return parts[0]


@dataclass(frozen=True)
class _ChunkPass3:
    """What pass 3 of a chunk is given: its open objects, and the scene's decisions on its segments it did not settle."""

    k: int
    open_pred: np.ndarray  # merged objects with pixels here (their pieces go to the driver)
    pred: Decisions  # settled by the scene: open objects here, and closed ones here that faced an open one
    truth: Decisions
    truth_info: _ChunkTruth | None


def _traced(ids: np.ndarray, window: Window, open_ids: np.ndarray, transform: tuple, simplify: float | None):
    """Polygons of a chunk's ids: finished ones of ids not in ``open_ids`` (ascending ids, map WKB, perimeters, boxes),
    and pixel-coordinate pieces (ids, WKB) of the others."""
    import shapely

    piece_ids, geoms = polygon_pieces(ids, window)
    part = np.isin(piece_ids, open_ids)
    order = np.argsort(piece_ids[~part], kind="stable")
    whole = geoms[~part][order]
    unique, starts, counts = np.unique(piece_ids[~part][order], return_index=True, return_counts=True)
    objects = whole[starts]  # most objects are one piece; 8-connected ones may be several
    for i in np.flatnonzero(counts > 1):
        objects[i] = union_pieces(list(whole[starts[i] : starts[i] + counts[i]]))
    wkb, perimeter, bounds = map_polygons(objects, transform, simplify)
    return unique, wkb, perimeter, bounds, piece_ids[part], list(shapely.to_wkb(geoms[part])) if part.any() else []


def _polygons(window: Window, store: str, transform: tuple, pred: Raster, labels: Raster | None,
              instances: Raster | None, probabilities: Raster | None, spec: ObjectSpec, width: int, given: _ChunkPass3):
    """Pass 3 of a chunk: rows and polygons of the objects (and missed true objects) inside it; pieces of the others.

    Returns ``(objects columns, object pieces, misses columns, miss pieces)``; pieces are (ids or keys, WKB).
    """
    import zarr

    from workers.mask_store import INSTANCES

    ids = zarr.open_array(store, path=INSTANCES, mode="r")[
        window.row_off : window.row_stop, window.col_off : window.col_stop].astype(np.int64)
    p = _pred_classes(pred, window, spec)
    done, wkb, perimeter, bounds, piece_ids, piece_wkb = _traced(ids, window, given.open_pred, transform, spec.simplify)
    values = None
    if probabilities is not None:
        values = np.take_along_axis(probabilities.read(window, raw=True), np.maximum(p, 0)[None].astype(np.int64), axis=0)[0]
    present, local = np.unique(ids, return_inverse=True)
    local = local.reshape(ids.shape)
    if len(present) and present[0] != 0:
        local, present = local + 1, np.concatenate([[0], present])
    first, pixels, value_sum, bbox = segment_stats(window, local.astype(np.int64), len(present) - 1, width, values)
    at = np.searchsorted(present, done) - 1
    cols = _object_columns(done, p.ravel()[_pixel_of(first[at], window, width)], pixels[at], first[at], bbox[at],
                           np.ones(len(done), np.int64), value_sum[at] if values is not None else None, width,
                           transform, wkb, perimeter, bounds)
    if labels is None:
        return cols, (piece_ids, piece_wkb), None, None
    scoring, segs = _score(window, p, ids, labels, instances, spec, given.truth_info, given.open_pred, given.k, width)
    mine, matched, best = scoring.pred.lookup(done)
    _, theirs, their_best = given.pred.lookup(done)
    cols.update(_match_columns(np.where(mine, matched, theirs), np.where(mine, best, their_best), given.truth_info))

    # true objects no prediction matched: the chunk's own and those the scene settled
    own = scoring.truth
    scored = scoring.truth_area[np.searchsorted(scoring.truth_keys, own.keys)] > 0  # a segment only if scored
    missed = np.union1d(own.keys[(own.keys > 0) & scored & (own.matched == NO_MATCH)],
                        given.truth.keys[(given.truth.keys > 0) & (given.truth.matched == NO_MATCH)])
    place = np.searchsorted(missed, segs.keys)  # a key may be several labels here (parts joined outside the chunk)
    hit = place < len(missed)
    hit[hit] = missed[place[hit]] == segs.keys[hit]
    compact = np.zeros(len(segs.keys) + 1, np.int64)  # label -> 1 + its key's place in `missed`, 0 for the others
    compact[1:][hit] = place[hit] + 1
    open_truth = np.flatnonzero(np.isin(missed, given.truth_info.open)) + 1
    t_done, t_wkb, _, t_bounds, t_piece, t_piece_wkb = _traced(compact[segs.labels], window, open_truth, transform,
                                                               spec.simplify)
    keys = missed[t_done - 1]
    label_for = np.zeros(len(missed), np.int64)
    label_for[place[hit]] = np.flatnonzero(hit)
    lab = label_for[t_done - 1]  # a closed one is one label here
    mine, _, best = own.lookup(keys)
    _, _, their_best = given.truth.lookup(keys)
    misses = _miss_columns(
        given.truth_info, keys, segs.classes[lab], scoring.truth_area[np.searchsorted(scoring.truth_keys, keys)],
        np.where(mine, best, their_best), segs.first[lab], segs.bbox[lab], width, t_wkb, t_bounds,
    )
    return cols, (piece_ids, piece_wkb), misses, (missed[t_piece - 1], t_piece_wkb)


def _pixel_of(first: np.ndarray, window: Window, width: int) -> np.ndarray:
    """Flat indices in a chunk of scene linear indices inside it."""
    return (first // width - window.row_off) * window.width + first % width - window.col_off


def _box_columns(first: np.ndarray, bbox: np.ndarray, width: int) -> dict:
    bbox = np.asarray(bbox, dtype=np.int64).reshape(-1, 4)
    return {
        "first_row": first // width, "first_col": first % width, "row_off": bbox[:, 0], "col_off": bbox[:, 1],
        "height": bbox[:, 2] - bbox[:, 0] + 1, "width": bbox[:, 3] - bbox[:, 1] + 1,
    }


def _object_columns(ids, classes, pixels, first, bbox, chunks, value_sum, width: int, transform: tuple, wkb: list,
                    perimeter: np.ndarray, bounds: np.ndarray) -> dict:
    """Rows of the objects table (``ObjectsWriter.append``), without the match columns."""
    a, b, _, d, e, _ = (float(v) for v in tuple(transform)[:6])
    pixels = np.asarray(pixels, dtype=np.int64)
    return {
        "object_id": np.asarray(ids, dtype=np.int64), "class_index": classes, "pixels": pixels,
        "area": pixels * abs(a * e - b * d), "perimeter": perimeter, "chunks": chunks, "geometry": wkb, "bounds": bounds,
        "mean_probability": value_sum / (pixels * 255.0) if value_sum is not None else None,
        **_box_columns(np.asarray(first, dtype=np.int64), bbox, width),
    }


def _match_columns(matched: np.ndarray, best: np.ndarray, truth: _ChunkTruth | _Truth) -> dict:
    """The objects table's match columns from the matched true keys (``NO_MATCH``: none) and best IoUs."""
    matched = np.asarray(matched, dtype=np.int64)
    hit = matched != NO_MATCH
    return {"truth_id": np.where(hit, _shown_ids(np.maximum(matched, 0), truth.keyed), -1), "iou": best, "matched": hit}


def _miss_columns(truth: _ChunkTruth | _Truth, keys, classes, pixels, best, first, bbox, width: int, wkb: list,
                  bounds: np.ndarray) -> dict:
    """Rows of the object_misses table."""
    return {
        "truth_id": _shown_ids(keys, truth.keyed), "class_index": classes, "pixels": pixels, "iou": best, "geometry": wkb,
        "bounds": bounds, **_box_columns(np.asarray(first, dtype=np.int64), bbox, width),
    }


@dataclass
class ObjectsResult:
    """What the object pass of a scene found, and how long its parts took."""

    scene: str
    objects: int
    truth_objects: int | None
    scores: ObjectScores | None
    chunks: int
    seconds: dict = field(default_factory=dict)  # segments, merge, instances, polygons
    merged: int = 0  # objects with pixels on a chunk border, the only ones the driver held one by one

    @property
    def polygons_per_second(self) -> float:
        s = self.seconds.get("polygons", 0.0)
        return self.objects / s if s > 0 else float("nan")


def scene_objects(
    layout: OutputLayout, job_id: str, scene: str, store: Path, spec: ObjectSpec, *, transform: tuple, crs,
    labels: str | None = None, instances: str | None = None, batch: int | None = None,
) -> ObjectsResult:
    """The object pass of one scene's mask store (chunk by chunk, with the current Dask scheduler).

    Writes ``instances`` into the store and the ``objects`` table (and, with
    ``labels``, ``object_metrics`` and ``object_misses``) under ``layout``'s reports.
    ``instances``: a raster of true object ids beside ``labels`` (else the labels'
    components are the true objects). ``batch``: chunks traced at once (default twice the tasks that run at once, 4
    to 32): a batch's rows are the driver's only per-object load.
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
    truth_r = geotiff_raster(labels, (height, width), mask.chunks[0]) if labels else None
    ids_r = geotiff_raster(instances, (height, width), mask.chunks[0]) if (labels and instances) else None

    task = dask.delayed(_segments, pure=True)
    found = dask.compute(*[task(w, pred, truth_r, ids_r, probs, spec, width) for w in windows])
    seconds["segments"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    objects = merge_components([f[0] for f in found], grid, spec.connectivity)
    truth = None
    if truth_r is not None:
        true_chunks = [f[1] for f in found]
        truth = _Truth(merge_keyed(true_chunks) if ids_r is not None else
                       merge_components(true_chunks, grid, spec.connectivity))
        del true_chunks
    del found  # the chunks' border segments: the merge holds what is needed of them now
    if len(objects) > np.iinfo(np.int32).max:  # before anything is written: ids are traced as int32, stored as uint32
        raise SpecError(f"{store}: {len(objects):,} objects, more than the 2^31 - 1 a scene can number; split the scene")
    seconds["merge"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    create_instances_array(store, {
        "description": "object ids of the thing classes' connected components", "id_rule": ID_RULE,
        "connectivity": spec.connectivity, "things": [spec.class_names[i] for i in spec.things],
    })
    task = dask.delayed(_instances, pure=False)  # it writes its chunk
    parts = [
        task(w, pred, truth_r, ids_r, spec, str(store), objects.chunk_ids[k], truth.chunk(k) if truth else None, k, width)
        for k, w in enumerate(windows)
    ]
    (tally,) = dask.compute(_tree_sum(parts))
    mark_instances_complete(store, len(objects))
    scores = None
    settled = (Segments.empty(), Segments.empty())
    if truth is not None:
        scores, *settled = settle(tally, spec.is_thing)
    del tally
    seconds["instances"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    _write_polygons(layout, job_id, scene, spec, store, transform, crs, windows, objects, truth, settled,
                    (pred, truth_r, ids_r, probs), batch or min(32, max(4, 2 * _parallel_tasks())))
    seconds["polygons"] = time.perf_counter() - t3
    if scores is not None:
        write_table(
            object_metrics_table(scene, list(spec.class_names), scores, spec.connectivity,
                                 "instances" if ids_r is not None else "components"),
            layout.report_file("object_metrics", job_id, scene),
        )
    seconds["total"] = time.perf_counter() - t0
    return ObjectsResult(scene, len(objects), len(truth.merged) if truth is not None else None, scores, len(windows),
                         seconds, len(objects.ids))


def _parallel_tasks() -> int:
    """How many chunk tasks run at once under the current Dask scheduler: the Ray cluster's CPUs, else Dask's threads."""
    scheduler = dask.config.get("scheduler", None)
    if getattr(scheduler, "__module__", "").startswith("ray."):  # ray_dask_get (pipeline.counting.dask_scheduler)
        import ray

        return int(ray.cluster_resources().get("CPU", 1))
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _by_chunk(segments: Segments, chunks: int) -> list[np.ndarray]:
    """Positions of the segments settled by the scene that lie inside one chunk, for each chunk."""
    inside = np.flatnonzero(segments.chunk >= 0)
    order = inside[np.argsort(segments.chunk[inside], kind="stable")]
    return np.split(order, np.searchsorted(segments.chunk[order], np.arange(1, chunks)))


def _given(segments: Segments, inside: np.ndarray, open_keys: np.ndarray) -> Decisions:
    """The scene's decisions on a chunk's segments: those inside it, and its open ones the scene settled."""
    found, _, _ = segments.decisions().lookup(open_keys)
    at = np.searchsorted(segments.keys, np.asarray(open_keys, dtype=np.int64)[found])
    return segments.decisions().take(np.union1d(inside, at).astype(np.int64))


class _Pieces:
    """Pieces of objects that span chunks, held until the last of their chunks is traced, then united."""

    def __init__(self, chunks_of):
        self._chunks_of, self._pieces, self._left = chunks_of, {}, {}

    def add(self, ids: np.ndarray, wkb: list) -> tuple[np.ndarray, list]:
        """One chunk's pieces; returns the objects now whole (ids ascending) and their pixel-coordinate geometries."""
        import shapely

        for i, g in zip(ids.tolist(), shapely.from_wkb(wkb) if wkb else []):
            self._pieces.setdefault(i, []).append(g)
        here = np.unique(ids)
        if len(here):
            left = self._chunks_of(here)
            for i, n in zip(here.tolist(), left.tolist()):
                self._left[i] = self._left.get(i, int(n)) - 1
        done = sorted(i for i in here.tolist() if self._left[i] == 0)
        for i in done:
            del self._left[i]
        return np.asarray(done, dtype=np.int64), [union_pieces(self._pieces.pop(i)) for i in done]

    def check(self, scene: str, what: str) -> None:
        if self._pieces:
            raise RuntimeError(f"{scene}: {what} {sorted(self._pieces)[:3]} were not traced in all their chunks")


def _write_polygons(layout: OutputLayout, job_id: str, scene: str, spec: ObjectSpec, store: Path, transform: tuple, crs,
                    windows: list[Window], objects: SceneObjects, truth: _Truth | None, settled: tuple, rasters: tuple,
                    batch: int) -> None:
    """Pass 3: trace chunks in row-major batches; stream finished objects (and misses) to their tables as row groups."""
    from contextlib import ExitStack

    pred, truth_r, ids_r, probs = rasters
    settled_pred, settled_truth = settled
    settled_truth = settled_truth.take(np.flatnonzero(settled_truth.area > 0))  # open ones no prediction covers: none
    transform = tuple(float(v) for v in tuple(transform)[:6])
    width = windows[-1].col_stop if windows else 0
    task = dask.delayed(_polygons, pure=True)
    pred_inside, truth_inside = _by_chunk(settled_pred, len(windows)), _by_chunk(settled_truth, len(windows))
    object_pieces = _Pieces(lambda ids: objects.chunks[objects.index(ids)])
    miss_pieces = _Pieces(truth.chunks_of if truth is not None else None)
    names = list(spec.class_names)

    def given(k: int) -> _ChunkPass3:
        open_pred = np.unique(objects.chunk_ids[k].edge_ids)
        if truth is None:
            return _ChunkPass3(k, open_pred, Decisions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)),
                               Decisions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)), None)
        info = truth.chunk(k)
        return _ChunkPass3(k, open_pred, _given(settled_pred, pred_inside[k], open_pred),
                           _given(settled_truth, truth_inside[k], info.open), info)

    with ExitStack() as stack:
        eight = spec.connectivity == 8
        table = stack.enter_context(open_objects_table(layout.report_file("objects", job_id, scene), scene, names, crs,
                                                       eight))
        misses = None
        if truth is not None:
            misses = stack.enter_context(open_objects_table(layout.report_file("object_misses", job_id, scene), scene,
                                                            names, crs, eight or truth.keyed, schema=OBJECT_MISSES))
        for start in range(0, len(windows), batch):
            ks = range(start, min(start + batch, len(windows)))
            results = dask.compute(*[
                task(windows[k], str(store), transform, pred, truth_r, ids_r, probs, spec, width, given(k)) for k in ks
            ])
            for cols, (piece_ids, piece_wkb), miss_cols, miss_parts in results:
                table.append(cols)
                done, geoms = object_pieces.add(piece_ids, piece_wkb)
                if len(done):
                    at = objects.index(done)
                    wkb, perimeter, bounds = map_polygons(geoms, transform, spec.simplify)
                    cols = _object_columns(
                        done, objects.classes[at], objects.pixels[at], objects.first[at], objects.bbox[at],
                        objects.chunks[at], objects.value_sum[at] if probs is not None else None, width, transform, wkb,
                        perimeter, bounds,
                    )
                    if truth is not None:
                        _, matched, best = settled_pred.decisions().lookup(done)
                        cols.update(_match_columns(matched, best, truth))
                    table.append(cols)
                if misses is None:
                    continue
                misses.append(miss_cols)
                done, geoms = miss_pieces.add(*miss_parts)
                if len(done):
                    at = np.searchsorted(settled_truth.keys, done)
                    wkb, _, bounds = map_polygons(geoms, transform, spec.simplify)
                    misses.append(_miss_columns(truth, done, settled_truth.classes[at], settled_truth.area[at],
                                                settled_truth.best[at], settled_truth.first[at], settled_truth.bbox[at],
                                                width, wkb, bounds))
        object_pieces.check(scene, "objects")
        miss_pieces.check(scene, "missed true objects")


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
    if results:
        from pipeline.stac_output import refresh_stac

        refresh_stac(layout)  # the items link the object tables now
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
