"""Objects: connected components merged exactly across chunks, ids that do not depend on chunking, object metrics.

A chunk task labels its own pixels (``workers/objects.py``) and reports each local
segment's class, first pixel, size and bounding box, and the labels along its four
edges. Here, with no pixels at all:

- ``merge_components``: segments that touch across a chunk edge (or, with
  8-connectivity, a chunk corner) and share a class are joined by union-find over
  the edge pixels of neighbouring chunks, so every object is the connected
  component the whole-scene labelling (``scipy.ndimage.label``) finds.
- The id rule: objects are ranked by their first pixel in row-major scene order
  (the smallest ``row * width + col`` of their pixels) and numbered 1..N in that
  order, so an object's id is the same for any chunk size or worker count.
- ``object_scores``: matching and panoptic quality (Kirillov et al., CVPR 2019) from
  (truth segment, predicted segment) pixel counts, which add up exactly over chunks,
  so the scores equal the whole-scene computation (ARCHITECTURE.md, invariant 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.metrics import mean_of_defined, ratio_or_nan

__all__ = [
    "CONNECTIVITIES",
    "MATCH_IOU",
    "ChunkSegments",
    "SceneObjects",
    "edge_links",
    "union_find",
    "merge_components",
    "merge_keyed",
    "ObjectScores",
    "object_scores",
]

CONNECTIVITIES = (4, 8)
"""4: pixels sharing an edge are connected; 8: sharing an edge or a corner."""

MATCH_IOU = 0.5
"""A predicted and a true segment of one class match when their IoU is strictly above this: unique by construction."""

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ChunkSegments:
    """One chunk's local segments (labels 1..n, 0: no segment), as a chunk task found them.

    ``first`` is the scene's linear index (``row * scene_width + col``) of each
    segment's first pixel in row-major order; ``bbox`` its first row, first
    column, last row and last column in scene coordinates (inclusive);
    ``value_sum`` the sum of a per-pixel value over it (stored probability
    levels; zeros without); ``edges`` the local labels along the chunk's top
    row, bottom row, left column and right column. ``keys``: the raster's own
    id of each segment when segments come from an instance raster, not
    components (then segments of equal key are one object, wherever they lie).
    """

    window: Window
    classes: np.ndarray  # (n,) int16
    first: np.ndarray  # (n,) int64
    pixels: np.ndarray  # (n,) int64
    value_sum: np.ndarray  # (n,) int64
    bbox: np.ndarray  # (n, 4) int64
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    keys: np.ndarray | None = None  # (n,) int64

    def __len__(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class SceneObjects:
    """Every object of a scene, each array indexed by id - 1, and each chunk's local label -> id table.

    ``lookups[k]`` (uint32, entry 0 is 0) maps chunk k's local labels (chunks in
    row-major order) to ids. ``chunks`` counts the chunks holding an object's
    pixels. ``keys`` are the raster's own ids, for objects of an instance raster.
    """

    classes: np.ndarray  # (N,) int16
    first: np.ndarray  # (N,) int64
    pixels: np.ndarray  # (N,) int64
    value_sum: np.ndarray  # (N,) int64
    bbox: np.ndarray  # (N, 4) int64
    chunks: np.ndarray  # (N,) int64
    lookups: list[np.ndarray]
    keys: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.classes)


def _links_along(a: np.ndarray, b: np.ndarray, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of labels facing each other across an edge: same position, and one apart with ``diagonal``."""
    pairs_a, pairs_b = [a], [b]
    if diagonal and len(a) > 1:
        pairs_a += [a[:-1], a[1:]]
        pairs_b += [b[1:], b[:-1]]
    return np.concatenate(pairs_a), np.concatenate(pairs_b)


def edge_links(chunks: list[ChunkSegments], grid: tuple[int, int], connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Node pairs to join: pixels of two chunks that touch across an edge or corner, both in a segment of one class.

    Nodes number every chunk's segments in one sequence (chunk k's label l is
    ``offset[k] + l - 1``, chunks row-major). Returns two int64 arrays, deduplicated.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity is 4 or 8, not {connectivity}")
    rows, cols = grid
    if len(chunks) != rows * cols:
        raise ValueError(f"{len(chunks)} chunks for a {rows} x {cols} grid")
    diagonal = connectivity == 8
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    classes = np.concatenate([c.classes for c in chunks]) if chunks else np.zeros(0, np.int16)
    found_a, found_b = [], []

    def link(k1: int, e1: np.ndarray, k2: int, e2: np.ndarray, diag: bool) -> None:
        a, b = _links_along(np.asarray(e1, dtype=np.int64), np.asarray(e2, dtype=np.int64), diag)
        keep = (a > 0) & (b > 0)
        na, nb = a[keep] + offsets[k1] - 1, b[keep] + offsets[k2] - 1
        same = classes[na] == classes[nb]
        found_a.append(na[same])
        found_b.append(nb[same])

    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            top, bottom, left, right = chunks[k].edges
            if c + 1 < cols:  # right neighbour
                link(k, right, k + 1, chunks[k + 1].edges[2], diagonal)
            if r + 1 < rows:  # the neighbour below
                link(k, bottom, k + cols, chunks[k + cols].edges[0], diagonal)
            if diagonal and r + 1 < rows and c + 1 < cols:  # corners: down-right, and down-left of the right neighbour
                link(k, bottom[-1:], k + cols + 1, chunks[k + cols + 1].edges[0][:1], False)
                link(k + 1, chunks[k + 1].edges[1][:1], k + cols, chunks[k + cols].edges[0][-1:], False)
    if not found_a:
        return _EMPTY, _EMPTY
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
    return pairs[:, 0], pairs[:, 1]


def _compress(parent: np.ndarray) -> np.ndarray:
    """Every node pointing at its root (pointer jumping until nothing moves)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The root of each of ``n`` nodes after joining every pair ``(a[i], b[i])``: the smallest node of its set.

    Vectorised: each round hooks every larger root onto the smallest root it is
    joined to, then compresses paths; a round at least halves the roots still to join.
    """
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            break
        lo, hi = np.minimum(ra, rb)[apart], np.maximum(ra, rb)[apart]
        np.minimum.at(parent, hi, lo)
        parent = _compress(parent)
        a, b = a[apart], b[apart]
    return parent


def _gather(chunks: list[ChunkSegments]) -> dict[str, np.ndarray]:
    cat = {
        name: np.concatenate([getattr(c, name) for c in chunks]) if chunks else np.zeros(0, np.int64)
        for name in ("classes", "first", "pixels", "value_sum")
    }
    cat["bbox"] = np.concatenate([c.bbox for c in chunks]).reshape(-1, 4) if chunks else np.zeros((0, 4), np.int64)
    cat["chunk"] = np.repeat(np.arange(len(chunks), dtype=np.int64), [len(c) for c in chunks])
    return cat


def _objects(chunks: list[ChunkSegments], group: np.ndarray, groups: int, keys: np.ndarray | None = None) -> SceneObjects:
    """Segments grouped into objects (``group[node]`` in 0..groups-1), ids ranked by first pixel."""
    cat = _gather(chunks)
    first = np.full(groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, group, cat["first"])
    order = np.argsort(first, kind="stable")  # id - 1 -> group
    rank = np.empty(groups, dtype=np.int64)
    rank[order] = np.arange(groups)
    ids = rank[group]  # node -> id - 1

    def summed(values: np.ndarray) -> np.ndarray:
        out = np.zeros(groups, dtype=np.int64)
        np.add.at(out, ids, values.astype(np.int64))
        return out

    classes = np.zeros(groups, dtype=np.int16)
    classes[ids] = cat["classes"]
    bbox = np.empty((groups, 4), dtype=np.int64)
    bbox[:, :2] = np.iinfo(np.int64).max
    bbox[:, 2:] = -1
    for j in range(2):
        np.minimum.at(bbox[:, j], ids, cat["bbox"][:, j])
        np.maximum.at(bbox[:, j + 2], ids, cat["bbox"][:, j + 2])
    held = np.unique(ids * max(1, len(chunks)) + cat["chunk"]) // max(1, len(chunks))
    lookups, start = [], 0
    for c in chunks:
        lookups.append(np.concatenate([[0], ids[start : start + len(c)] + 1]).astype(np.uint32))
        start += len(c)
    key_of = None
    if keys is not None:
        key_of = np.zeros(groups, dtype=np.int64)
        key_of[ids] = keys
    return SceneObjects(
        classes, first[order], summed(cat["pixels"]), summed(cat["value_sum"]), bbox,
        np.bincount(held, minlength=groups).astype(np.int64), lookups, key_of,
    )


def merge_components(chunks: list[ChunkSegments], grid: tuple[int, int], connectivity: int) -> SceneObjects:
    """The scene's connected components from its chunks' (``grid`` rows x cols, row-major), exactly as one labelling.

    Two pixels are in one object when a path of pixels of their class joins them,
    stepping to edge neighbours (4) or also corner neighbours (8).
    """
    a, b = edge_links(chunks, grid, connectivity)
    n = sum(len(c) for c in chunks)
    roots = union_find(n, a, b)
    _, group = np.unique(roots, return_inverse=True)
    return _objects(chunks, group.ravel(), int(group.max()) + 1 if n else 0)


def merge_keyed(chunks: list[ChunkSegments]) -> SceneObjects:
    """Objects of an instance raster: segments of equal key are one object, wherever they lie."""
    keys = np.concatenate([c.keys for c in chunks]) if chunks else _EMPTY
    unique, group = np.unique(keys, return_inverse=True)
    return _objects(chunks, group.ravel(), len(unique), keys)


@dataclass(frozen=True)
class ObjectScores:
    """Object metrics per class (arrays of C), and how each segment fared.

    PQ = sum of matched IoUs / (TP + FP/2 + FN/2) = SQ x RQ, SQ = sum of matched IoUs / TP
    (0 without a match, as the COCO panoptic reference gives it), RQ = TP / (TP + FP/2 + FN/2),
    which is also F1; precision TP / (TP + FP), recall TP / (TP + FN). A class with no truth
    segment and no counted prediction has NaN everywhere and is left out of means.
    """

    things: np.ndarray  # (C,) bool
    true_positives: np.ndarray  # (C,) int64
    false_positives: np.ndarray
    false_negatives: np.ndarray
    ignored_predictions: np.ndarray  # (C,) predictions neither matched nor counted: more than half on void
    truth_segments: np.ndarray  # (C,) truth segments with a scored pixel
    predicted_segments: np.ndarray  # (C,)
    iou_sum: np.ndarray  # (C,) float64
    pq: np.ndarray
    sq: np.ndarray
    rq: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    pred_match: np.ndarray  # (Sp,) matched truth segment, -1 none
    pred_iou: np.ndarray  # (Sp,) best IoU with a truth segment of its class (0: none overlaps)
    pred_ignored: np.ndarray  # (Sp,) bool
    truth_match: np.ndarray  # (St,) matched predicted segment, -1 none
    truth_iou: np.ndarray  # (St,)
    truth_area: np.ndarray  # (St,) scored pixels of each truth segment

    def summary(self, which: str) -> dict[str, float | int]:
        """Means over ``all``, ``things`` or ``stuff`` classes (those with a segment), and pooled counts."""
        pick = {"all": np.ones_like(self.things), "things": self.things, "stuff": ~self.things}[which]
        counted = pick & ((self.true_positives + self.false_positives + self.false_negatives) > 0)
        tp, fp, fn = (int(x[pick].sum()) for x in (self.true_positives, self.false_positives, self.false_negatives))
        return {
            "classes": int(counted.sum()),
            "true_positives": tp,
            "false_positives": fp,
            "false_negatives": fn,
            "pq": mean_of_defined(self.pq[counted]),
            "sq": mean_of_defined(self.sq[counted]),
            "rq": mean_of_defined(self.rq[counted]),
            "precision": float(tp / (tp + fp)) if tp + fp else float("nan"),
            "recall": float(tp / (tp + fn)) if tp + fn else float("nan"),
            "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan"),
        }


def object_scores(
    truth: np.ndarray,
    pred: np.ndarray,
    count: np.ndarray,
    truth_classes: np.ndarray,
    pred_classes: np.ndarray,
    things: np.ndarray,
) -> ObjectScores:
    """Matches, TP/FP/FN and PQ per class from pixel counts of (truth segment, predicted segment) pairs.

    ``count[i]`` pixels lie in truth segment ``truth[i]`` and predicted segment
    ``pred[i]``; ``truth[i] == len(truth_classes)`` is void (truth that is no class).
    Only pixels with a prediction are counted. As in the COCO panoptic reference
    (``pq_compute``): union = |P| + |G| - |P & G| - |P & void|; a pair of one class
    matches when IoU > 0.5; an unmatched prediction more than half on void is
    ignored, not a false positive. ``things[c]`` says whether class c is a thing.
    """
    things = np.asarray(things, dtype=bool)
    c = len(things)
    st, sp = len(truth_classes), len(pred_classes)
    t, p, n = (np.asarray(x, dtype=np.int64) for x in (truth, pred, count))
    tc, pc = np.asarray(truth_classes, dtype=np.int64), np.asarray(pred_classes, dtype=np.int64)
    on_truth = t < st
    area_p = np.bincount(p, weights=n, minlength=sp).astype(np.int64)
    void_p = np.bincount(p[~on_truth], weights=n[~on_truth], minlength=sp).astype(np.int64)
    area_t = np.bincount(t[on_truth], weights=n[on_truth], minlength=st).astype(np.int64)
    tt, pp, inter = t[on_truth], p[on_truth], n[on_truth]
    same = tc[tt] == pc[pp]
    tt, pp, inter = tt[same], pp[same], inter[same]
    iou = inter / (area_p[pp] + area_t[tt] - inter - void_p[pp]).astype(np.float64)
    pred_iou, truth_iou = np.zeros(sp), np.zeros(st)
    np.maximum.at(pred_iou, pp, iou)
    np.maximum.at(truth_iou, tt, iou)
    matched = iou > MATCH_IOU
    pred_match, truth_match = np.full(sp, -1, np.int64), np.full(st, -1, np.int64)
    pred_match[pp[matched]] = tt[matched]
    truth_match[tt[matched]] = pp[matched]
    tp = np.bincount(tc[tt[matched]], minlength=c).astype(np.int64)
    iou_sum = np.bincount(tc[tt[matched]], weights=iou[matched], minlength=c)
    present_t, present_p = area_t > 0, area_p > 0
    fn = np.bincount(tc[present_t & (truth_match < 0)], minlength=c).astype(np.int64)
    ignored = present_p & (pred_match < 0) & (2 * void_p > area_p)
    fp = np.bincount(pc[present_p & (pred_match < 0) & ~ignored], minlength=c).astype(np.int64)
    counted = tp + fp + fn
    half = tp + 0.5 * fp + 0.5 * fn
    pq, rq = ratio_or_nan(iou_sum, half), ratio_or_nan(tp, half)
    sq = np.where(counted > 0, np.where(tp > 0, ratio_or_nan(iou_sum, tp), 0.0), np.nan)
    return ObjectScores(
        things, tp, fp, fn, np.bincount(pc[ignored], minlength=c).astype(np.int64),
        np.bincount(tc[present_t], minlength=c).astype(np.int64), np.bincount(pc[present_p], minlength=c).astype(np.int64),
        iou_sum, pq, sq, rq, ratio_or_nan(tp, tp + fp), ratio_or_nan(tp, tp + fn), ratio_or_nan(2 * tp, 2 * tp + fp + fn),
        pred_match, pred_iou, ignored, truth_match, truth_iou, area_t,
    )
