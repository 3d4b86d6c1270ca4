"""Objects: connected components merged exactly across chunks, ids that do not depend on chunking, object metrics.

An object that lies inside one chunk, touching none of its borders, is finished
where it lies; only segments on a chunk's border travel to the driver. So the
driver's memory follows the pixels on chunk borders, never the number of
objects (ARCHITECTURE.md, invariant 9). A chunk task labels its pixels
(``workers/objects.py``) and reports its border segments one by one (class,
first pixel, size, box, the labels along its four borders) and its inner ones
as counts per row. Here, with no pixels at all:

- ``merge_components``: border segments that touch across a chunk edge (or,
  with 8-connectivity, a chunk corner) and share a class are joined by
  union-find, so every object is the connected component the whole-scene
  labelling (``scipy.ndimage.label``) finds.
- The id rule: objects are ranked by their first pixel in row-major scene order
  (the smallest ``row * width + col`` of their pixels) and numbered 1..N in that
  order, so an object's id is the same for any chunk size or worker count. The
  merge gives each chunk a ``ChunkIds``: per row of the chunk, how many objects
  start before the row enters the chunk, and the ids of its border segments;
  ``local_ids`` numbers its inner objects from that.
- ``chunk_tally`` and ``settle``: matching and panoptic quality (Kirillov et al.,
  CVPR 2019) from (truth segment, predicted segment) pixel counts. A match
  between two segments inside one chunk is decided there; the rest (segments on
  borders, stuff, and their partners) travel as pixel counts, which add up
  exactly over chunks, so the scores equal the whole-scene computation
  (invariant 7).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from pipeline.core.geometry import Window
from pipeline.core.metrics import mean_of_defined, ratio_or_nan

__all__ = [
    "CONNECTIVITIES",
    "MATCH_IOU",
    "VOID",
    "NO_MATCH",
    "ChunkSegments",
    "ChunkIds",
    "SceneObjects",
    "edge_links",
    "union_find",
    "merge_components",
    "KeyedObjects",
    "merge_keyed",
    "local_ids",
    "stuff_keys",
    "Segments",
    "Tally",
    "Decisions",
    "ChunkScoring",
    "chunk_tally",
    "combine_tallies",
    "ObjectScores",
    "settle",
    "object_scores",
]

CONNECTIVITIES = (4, 8)
"""4: pixels sharing an edge are connected; 8: sharing an edge or a corner."""

MATCH_IOU = 0.5
"""A predicted and a true segment of one class match when their IoU is strictly above this: unique by construction."""

VOID = np.iinfo(np.int64).min
"""The truth key of pixels whose truth is no class (ignored, or outside the class list)."""

NO_MATCH = -1
"""The partner key of a segment that matched none: thing keys are >= 1 and stuff keys <= -2 (``stuff_keys``)."""

_EMPTY = np.zeros(0, dtype=np.int64)
_BIG = np.iinfo(np.int64).max


def stuff_keys(classes: np.ndarray, stuff_rank: np.ndarray) -> np.ndarray:
    """The one segment key of each stuff class per scene: ``-2 - rank`` (thing keys are >= 1, ``NO_MATCH`` is -1)."""
    return -2 - stuff_rank[np.asarray(classes, dtype=np.int64)]


@dataclass(frozen=True)
class ChunkSegments:
    """One chunk's segments as the merge needs them: border segments one by one, inner ones as counts per row.

    A chunk task labels its segments 1..n (0: none). Border segments touch one
    of the chunk's four borders, so they may continue in a neighbour: for each,
    ``labels`` (its local label, ascending), ``classes``, ``first`` (the scene's
    linear index ``row * scene_width + col`` of its first pixel in row-major
    order), ``pixels``, ``value_sum`` (sum of a per-pixel value, e.g. stored
    probability levels; zeros without), ``bbox`` (first row, first column, last
    row, last column in scene coordinates, inclusive) and ``before`` (inner
    segments whose first pixel is on its first pixel's row, left of it).
    ``inner_rows`` counts inner segments (objects already, finished here) by the
    row of their first pixel; ``edges`` are the local labels along the top row,
    bottom row, left column and right column.
    """

    window: Window
    labels: np.ndarray  # (m,) int64
    classes: np.ndarray  # (m,) int16
    first: np.ndarray  # (m,) int64
    pixels: np.ndarray  # (m,) int64
    value_sum: np.ndarray  # (m,) int64
    bbox: np.ndarray  # (m, 4) int64
    before: np.ndarray  # (m,) int64
    inner_rows: np.ndarray  # (window.height,) int32
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def inner(self) -> int:
        return int(self.inner_rows.sum())


@dataclass(frozen=True)
class ChunkIds:
    """What a chunk needs to give its segments their scene ids (``local_ids``).

    ``row_offset[i]``: objects whose first pixel precedes the chunk's row ``i``
    at the chunk's first column; ``open_first``: first pixels (ascending) of the
    merged objects whose first pixel lies in the chunk; ``edge_labels`` (ascending)
    and ``edge_ids``: the chunk's border segments and the ids of their objects.
    """

    window: Window
    scene_width: int
    row_offset: np.ndarray  # (h,) int64
    open_first: np.ndarray  # (k,) int64
    edge_labels: np.ndarray  # (m,) int64
    edge_ids: np.ndarray  # (m,) int64


@dataclass(frozen=True)
class SceneObjects:
    """A scene's objects as the driver holds them: how many, each chunk's ``ChunkIds``, and the merged ones.

    The merged objects (those with a segment on a chunk border: ``ids`` ascending) are
    the only ones held one by one: ``classes``, ``first``, ``pixels``, ``value_sum``,
    ``bbox`` and ``chunks`` (chunks holding their pixels), each indexed like ``ids``.
    """

    count: int
    chunk_ids: list[ChunkIds]
    ids: np.ndarray  # (k,) int64
    classes: np.ndarray  # (k,) int16
    first: np.ndarray
    pixels: np.ndarray
    value_sum: np.ndarray
    bbox: np.ndarray  # (k, 4)
    chunks: np.ndarray

    def __len__(self) -> int:
        return self.count

    def index(self, ids: np.ndarray) -> np.ndarray:
        """Positions of merged objects' ids in ``ids`` (each must be one)."""
        return np.searchsorted(self.ids, np.asarray(ids, dtype=np.int64))


def _links_along(a: np.ndarray, b: np.ndarray, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of labels facing each other across an edge: same position, and one apart with ``diagonal``."""
    pairs_a, pairs_b = [a], [b]
    if diagonal and len(a) > 1:
        pairs_a += [a[:-1], a[1:]]
        pairs_b += [b[1:], b[:-1]]
    return np.concatenate(pairs_a), np.concatenate(pairs_b)


def _offsets(chunks: list[ChunkSegments]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)


def edge_links(chunks: list[ChunkSegments], grid: tuple[int, int], connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Node pairs to join: pixels of two chunks that touch across an edge or corner, both in a segment of one class.

    Nodes number every chunk's border segments in one sequence (chunk k's j-th is
    ``offset[k] + j``, chunks row-major). Returns two int64 arrays, deduplicated.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity is 4 or 8, not {connectivity}")
    rows, cols = grid
    if len(chunks) != rows * cols:
        raise ValueError(f"{len(chunks)} chunks for a {rows} x {cols} grid")
    diagonal = connectivity == 8
    offsets = _offsets(chunks)
    classes = np.concatenate([c.classes for c in chunks]) if chunks else np.zeros(0, np.int16)
    found_a, found_b = [], []

    def link(k1: int, e1: np.ndarray, k2: int, e2: np.ndarray, diag: bool) -> None:
        a, b = _links_along(np.asarray(e1, dtype=np.int64), np.asarray(e2, dtype=np.int64), diag)
        keep = (a > 0) & (b > 0)
        na = np.searchsorted(chunks[k1].labels, a[keep]) + offsets[k1]
        nb = np.searchsorted(chunks[k2].labels, b[keep]) + offsets[k2]
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


def _cat(chunks: list[ChunkSegments], name: str, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(getattr(c, name), dtype=dtype) for c in chunks]) if chunks else np.zeros(0, dtype)


def merge_components(chunks: list[ChunkSegments], grid: tuple[int, int], connectivity: int) -> SceneObjects:
    """The scene's connected components from its chunks' (``grid`` rows x cols, row-major), exactly as one labelling.

    Two pixels are in one object when a path of pixels of their class joins them,
    stepping to edge neighbours (4) or also corner neighbours (8).
    """
    rows, cols = grid
    a, b = edge_links(chunks, grid, connectivity)
    offsets = _offsets(chunks)
    n = int(offsets[-1])
    _, group = np.unique(union_find(n, a, b), return_inverse=True)
    group = group.ravel()
    groups = int(group.max()) + 1 if n else 0
    first = _cat(chunks, "first", np.int64)
    chunk_of = np.repeat(np.arange(len(chunks), dtype=np.int64), np.diff(offsets))

    # each merged object: its first pixel, and the node (border segment) that holds it
    g_first = np.full(groups, _BIG, dtype=np.int64)
    np.minimum.at(g_first, group, first)
    order = np.argsort(g_first, kind="stable")  # merged objects in id order
    owner = np.empty(groups, dtype=np.int64)
    holds = first == g_first[group]
    owner[group[holds]] = np.flatnonzero(holds)

    # the id rule, chunk row by chunk row: objects before each row, then before each chunk on it
    width = max((c.window.col_stop for c in chunks), default=0)
    owner_chunk = chunk_of[owner]
    by_chunk = np.lexsort((g_first, owner_chunk))  # merged objects by the chunk holding their first pixel, then first
    open_at = np.split(g_first[by_chunk], np.searchsorted(owner_chunk[by_chunk], np.arange(1, len(chunks))))
    row_offset: list[np.ndarray] = []
    before_band = 0
    for r in range(rows):
        band = chunks[r * cols : (r + 1) * cols]
        h, r0 = band[0].window.height, band[0].window.row_off
        per_chunk = np.zeros((cols, h), dtype=np.int64)
        for c, seg in enumerate(band):
            per_chunk[c] = seg.inner_rows
            per_chunk[c] += np.bincount(open_at[r * cols + c] // width - r0, minlength=h)
        totals = per_chunk.sum(axis=0)
        row_start = before_band + np.cumsum(totals) - totals
        left = np.cumsum(per_chunk, axis=0) - per_chunk  # objects on the row in the chunks to the left
        row_offset.extend(row_start + left[c] for c in range(cols))
        before_band += int(totals.sum())
    count = before_band

    ids = np.zeros(groups, dtype=np.int64)
    if groups:
        k = owner_chunk[by_chunk]
        f = g_first[by_chunk]
        row = f // width
        starts = np.concatenate([[0], np.cumsum([c.window.height for c in chunks])])
        row_off = np.array([c.window.row_off for c in chunks], dtype=np.int64)
        offs = np.concatenate(row_offset)[starts[k] + row - row_off[k]]
        # merged objects of the same chunk starting on the same row, left of this one: by_chunk is sorted so
        position = np.arange(groups)
        same_row_start = np.searchsorted(k * (width * (row.max() + 1)) + f, k * (width * (row.max() + 1)) + row * width)
        ids[by_chunk] = 1 + offs + _cat(chunks, "before", np.int64)[owner[by_chunk]] + position - same_row_start
    node_ids = ids[group]

    def summed(values: np.ndarray) -> np.ndarray:
        out = np.zeros(groups, dtype=np.int64)
        np.add.at(out, group, values.astype(np.int64))
        return out

    classes = np.zeros(groups, dtype=np.int16)
    classes[group] = _cat(chunks, "classes", np.int16)
    boxes = np.concatenate([c.bbox for c in chunks]).reshape(-1, 4).astype(np.int64) if chunks else np.zeros((0, 4), np.int64)
    bbox = np.empty((groups, 4), dtype=np.int64)
    bbox[:, :2], bbox[:, 2:] = _BIG, -1
    for j in range(2):
        np.minimum.at(bbox[:, j], group, boxes[:, j])
        np.maximum.at(bbox[:, j + 2], group, boxes[:, j + 2])
    held = np.unique(group * max(1, len(chunks)) + chunk_of) // max(1, len(chunks))
    chunk_ids = [
        ChunkIds(c.window, width, row_offset[k], open_at[k] if groups else _EMPTY, np.asarray(c.labels, np.int64),
                 node_ids[offsets[k] : offsets[k + 1]])
        for k, c in enumerate(chunks)
    ]
    return SceneObjects(
        count, chunk_ids, ids[order], classes[order], g_first[order], summed(_cat(chunks, "pixels", np.int64))[order],
        summed(_cat(chunks, "value_sum", np.int64))[order], bbox[order],
        np.bincount(held, minlength=groups).astype(np.int64)[order],
    )


def local_ids(ids: ChunkIds, first: np.ndarray) -> np.ndarray:
    """A chunk's label -> scene id table (int64; entry 0 is 0) from each local label's first pixel (``first[l - 1]``).

    Border segments take their merged object's id; an inner segment (an object
    of its own) is numbered after the objects before its row at the chunk's
    first column, the inner ones before it on its row, and the merged ones that
    start on its row left of it.
    """
    first = np.asarray(first, dtype=np.int64)
    out = np.zeros(len(first) + 1, dtype=np.int64)
    inner = np.ones(len(first), dtype=bool)
    inner[ids.edge_labels - 1] = False
    labels = np.flatnonzero(inner) + 1
    f = first[inner]
    order = np.argsort(f, kind="stable")
    f, labels = f[order], labels[order]
    w, win = ids.scene_width, ids.window
    row = f // w
    local_row = row - win.row_off
    row_start = np.searchsorted(f, row * w)  # inner segments on earlier rows of the chunk
    on_row_before = np.arange(len(f)) - row_start
    opened = np.searchsorted(ids.open_first, f) - np.searchsorted(ids.open_first, row * w)
    out[labels] = 1 + ids.row_offset[local_row] + on_row_before + opened
    out[ids.edge_labels] = ids.edge_ids
    return out


@dataclass(frozen=True)
class KeyedObjects:
    """An instance raster's objects: how many keys, each chunk's open keys (shared with another chunk), and how many
    chunks hold each shared key (``shared`` ascending, ``chunks`` beside it)."""

    count: int
    chunk_open: list[np.ndarray]
    shared: np.ndarray
    chunks: np.ndarray

    def __len__(self) -> int:
        return self.count


def merge_keyed(chunk_keys: list[np.ndarray]) -> KeyedObjects:
    """An instance raster's objects across chunks: segments of one key are one object wherever they lie.

    A key held by one chunk only is finished there. Holds every chunk's keys at
    once (8 bytes a true object), the one place the object pass holds one number per object.
    """
    if not chunk_keys:
        return KeyedObjects(0, [], _EMPTY, _EMPTY)
    keys = np.concatenate([np.unique(np.asarray(k, np.int64)) for k in chunk_keys])
    unique, counts = np.unique(keys, return_counts=True)
    shared = counts > 1
    del keys
    return KeyedObjects(
        len(unique), [np.intersect1d(k, unique[shared]) for k in chunk_keys], unique[shared], counts[shared].astype(np.int64),
    )


# ---------- object metrics ----------


@dataclass(frozen=True)
class Segments:
    """Segments of one side (truth or prediction) that the scene settles, one row each, keys ascending.

    ``area``: scored pixels (with a prediction); ``void``: of those, on void truth
    (prediction only); ``matched``: the partner key of a match found inside one chunk
    (``NO_MATCH`` none); ``best``: the best IoU found there; ``first``, ``bbox``:
    the first pixel and box (truth only; zeros else); ``chunk``: the chunk it was
    reported from, for segments that lie in one (-1 for open ones, summed over chunks).
    """

    keys: np.ndarray  # int64
    classes: np.ndarray  # int16
    area: np.ndarray  # int64
    void: np.ndarray  # int64
    matched: np.ndarray  # int64
    best: np.ndarray  # float64
    first: np.ndarray  # int64
    bbox: np.ndarray  # (n, 4) int64
    chunk: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def empty() -> "Segments":
        z = np.zeros(0, np.int64)
        return Segments(z, np.zeros(0, np.int16), z, z, z, np.zeros(0), z, np.zeros((0, 4), np.int64), z)

    def take(self, index: np.ndarray) -> "Segments":
        return Segments(*(getattr(self, f.name)[index] for f in fields(self)))

    def decisions(self) -> "Decisions":
        return Decisions(self.keys, self.matched, self.best)


def _combine_segments(parts: list[Segments]) -> Segments:
    """Rows of equal key joined: areas added, first pixel and box widened, the best IoU kept, a match kept."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Segments.empty()
    if len(parts) == 1:
        return parts[0]
    cat = Segments(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Segments)))
    keys, inverse = np.unique(cat.keys, return_inverse=True)
    inverse = inverse.ravel()
    n = len(keys)

    def reduce(op, values, start, dtype):
        out = np.full((n,) + values.shape[1:], start, dtype=dtype)
        op.at(out, inverse, values)
        return out

    classes = np.zeros(n, np.int16)
    classes[inverse] = cat.classes
    bbox = np.empty((n, 4), np.int64)
    bbox[:, :2] = reduce(np.minimum, cat.bbox[:, :2], _BIG, np.int64)
    bbox[:, 2:] = reduce(np.maximum, cat.bbox[:, 2:], -1, np.int64)
    return Segments(
        keys, classes, reduce(np.add, cat.area, 0, np.int64), reduce(np.add, cat.void, 0, np.int64),
        reduce(np.maximum, cat.matched, NO_MATCH, np.int64), reduce(np.maximum, cat.best, 0.0, np.float64),
        reduce(np.minimum, cat.first, _BIG, np.int64), bbox, reduce(np.maximum, cat.chunk, -1, np.int64),
    )


@dataclass(frozen=True)
class Tally:
    """Object-metric counts of some chunks: per-class totals of what they settled, and what only the scene can settle.

    ``totals`` rows: true positives, false positives, false negatives, ignored
    predictions, truth segments, predicted segments (C columns each); ``iou_sum``
    of the matches settled. ``truth`` and ``pred``: segments to settle (open ones,
    and segments inside a chunk that face an open one of their class); ``pairs``:
    pixels of each (truth, prediction) pair of one class with an open member.
    """

    totals: np.ndarray  # (6, C) int64
    iou_sum: np.ndarray  # (C,) float64
    truth: Segments
    pred: Segments
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # truth key, pred key, pixels


def combine_tallies(*parts: Tally | None) -> Tally | None:
    """Tallies of more chunks, exactly: totals and pixel counts are integers, added."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    t = np.concatenate([p.pairs[0] for p in parts])
    q = np.concatenate([p.pairs[1] for p in parts])
    n = np.concatenate([p.pairs[2] for p in parts])
    if len(t):
        both, inverse = np.unique(np.stack([t, q], axis=1), axis=0, return_inverse=True)
        summed = np.zeros(len(both), np.int64)
        np.add.at(summed, inverse.ravel(), n)
        t, q, n = both[:, 0], both[:, 1], summed
    return Tally(
        sum(p.totals for p in parts), sum(p.iou_sum for p in parts), _combine_segments([p.truth for p in parts]),
        _combine_segments([p.pred for p in parts]), (t, q, n),
    )


@dataclass(frozen=True)
class Decisions:
    """How each settled segment fared, keys ascending: its match (``NO_MATCH`` none) and best IoU."""

    keys: np.ndarray
    matched: np.ndarray
    best: np.ndarray

    def take(self, index: np.ndarray) -> "Decisions":
        return Decisions(self.keys[index], self.matched[index], self.best[index])

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each key: whether it is settled here, its match and its best IoU."""
        keys = np.asarray(keys, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = (self.keys[at] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        return found, np.where(found, self.matched[at] if len(self.keys) else NO_MATCH, NO_MATCH), np.where(
            found, self.best[at] if len(self.keys) else 0.0, 0.0)


@dataclass(frozen=True)
class ChunkScoring:
    """A chunk's tally, the segments it settled itself (keys, match, best IoU) per side, and every true segment's
    scored pixels in the chunk (``truth_keys`` ascending, ``truth_area``)."""

    tally: Tally
    pred: Decisions
    truth: Decisions
    truth_keys: np.ndarray
    truth_area: np.ndarray


def chunk_tally(
    t: np.ndarray, p: np.ndarray, n: np.ndarray, t_class: np.ndarray, p_class: np.ndarray, *,
    truth_open: np.ndarray, pred_open: np.ndarray, things: np.ndarray, truth_things: tuple | None = None, chunk: int = -1,
) -> ChunkScoring:
    """Match what one chunk can, and tally the rest, from its (truth key, pred key) pixel counts.

    ``t[i]``, ``p[i]``: segment keys (``VOID`` truth: no class), ``n[i]`` pixels,
    ``t_class``/``p_class`` the pair's classes. ``truth_open``/``pred_open``: keys
    of open segments (on a chunk border, or stuff) met in the chunk, whose areas are
    partial here. ``truth_things``: (keys, classes, first pixels, boxes) of every true
    thing segment with a pixel in the chunk, scored or not, so an open one's box and first
    pixel cover all its pixels (scored pixels alone may miss some). As in the COCO
    panoptic reference (``pq_compute``): union = |P| + |G| - |P & G| - |P & void|, a
    pair of one class matches when IoU > 0.5, and an unmatched prediction more than
    half on void is ignored, not a false positive.
    """
    things = np.asarray(things, dtype=bool)
    c = len(things)
    t, p, n = (np.asarray(x, dtype=np.int64) for x in (t, p, n))
    on_truth = t != VOID
    pk, p_inv = np.unique(p, return_inverse=True)
    p_inv = p_inv.ravel()
    listed = truth_things[0] if truth_things is not None else _EMPTY
    tk = np.union1d(t[on_truth], listed)
    t_inv = np.searchsorted(tk, t[on_truth])
    area_p = np.bincount(p_inv, weights=n, minlength=len(pk)).astype(np.int64)
    void_p = np.bincount(p_inv[~on_truth], weights=n[~on_truth], minlength=len(pk)).astype(np.int64)
    area_t = np.bincount(t_inv, weights=n[on_truth], minlength=len(tk)).astype(np.int64)
    pc = np.zeros(len(pk), np.int16)
    pc[p_inv] = p_class
    tc = np.zeros(len(tk), np.int16)
    tc[t_inv] = np.asarray(t_class)[on_truth]
    first, bbox = np.zeros(len(tk), np.int64), np.zeros((len(tk), 4), np.int64)
    if truth_things is not None and len(listed):  # one key may be several local segments, joined outside the chunk
        at = np.searchsorted(tk, listed)
        tc[at] = truth_things[1]
        given = np.asarray(truth_things[3], np.int64).reshape(-1, 4)
        first[at], bbox[at, :2], bbox[at, 2:] = _BIG, _BIG, -1
        np.minimum.at(first, at, truth_things[2])
        for j in range(2):
            np.minimum.at(bbox[:, j], at, given[:, j])
            np.maximum.at(bbox[:, j + 2], at, given[:, j + 2])
    p_open, t_open = np.isin(pk, pred_open), np.isin(tk, truth_open)

    ti, pi, inter = t_inv, p_inv[on_truth], n[on_truth]
    same = tc[ti] == pc[pi]
    ti, pi, inter = ti[same], pi[same], inter[same]
    closed = ~t_open[ti] & ~p_open[pi]
    tcl, pcl, icl = ti[closed], pi[closed], inter[closed]
    iou = icl / (area_p[pcl] + area_t[tcl] - icl - void_p[pcl]).astype(np.float64)
    best_p, best_t = np.zeros(len(pk)), np.zeros(len(tk))
    np.maximum.at(best_p, pcl, iou)
    np.maximum.at(best_t, tcl, iou)
    hit = iou > MATCH_IOU
    match_p, match_t = np.full(len(pk), NO_MATCH, np.int64), np.full(len(tk), NO_MATCH, np.int64)
    match_p[pcl[hit]] = tk[tcl[hit]]
    match_t[tcl[hit]] = pk[pcl[hit]]
    # a closed segment facing an open one of its class waits for the scene; so does every open one
    wait_t, wait_p = t_open.copy(), p_open.copy()
    wait_t[ti[~closed]] = True
    wait_p[pi[~closed]] = True

    totals = np.zeros((6, c), np.int64)
    iou_sum = np.bincount(tc[tcl[hit]], weights=iou[hit], minlength=c)
    totals[0] = np.bincount(tc[tcl[hit]], minlength=c)
    settled_p = ~wait_p & (match_p == NO_MATCH)
    ignored = settled_p & (2 * void_p > area_p)
    totals[1] = np.bincount(pc[settled_p & ~ignored], minlength=c)
    present_t = area_t > 0  # a true segment with no scored pixel is no segment (unless open: others may hold some)
    totals[2] = np.bincount(tc[~wait_t & present_t & (match_t == NO_MATCH)], minlength=c)
    totals[3] = np.bincount(pc[ignored], minlength=c)
    totals[4] = np.bincount(tc[~t_open & present_t], minlength=c)
    totals[5] = np.bincount(pc[~p_open], minlength=c)

    z = np.zeros(len(tk), np.int64)
    where_t = np.where(t_open, -1, chunk)
    where_p = np.where(p_open, -1, chunk)
    truth = Segments(tk, tc, area_t, z, match_t, best_t, first, bbox, where_t).take(np.flatnonzero(wait_t))
    zp = np.zeros(len(pk), np.int64)
    pred = Segments(pk, pc, area_p, void_p, match_p, best_p, zp, np.zeros((len(pk), 4), np.int64), where_p).take(
        np.flatnonzero(wait_p))
    deferred = ~closed
    pairs = (tk[ti[deferred]], pk[pi[deferred]], inter[deferred])
    tally = Tally(totals, iou_sum, truth, pred, pairs)
    own_p, own_t = ~wait_p, ~wait_t
    return ChunkScoring(
        tally, Decisions(pk[own_p], match_p[own_p], best_p[own_p]), Decisions(tk[own_t], match_t[own_t], best_t[own_t]),
        tk, area_t,
    )


@dataclass(frozen=True)
class ObjectScores:
    """Object metrics per class (arrays of C).

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


def _scores(things: np.ndarray, totals: np.ndarray, iou_sum: np.ndarray) -> ObjectScores:
    tp, fp, fn, ignored, n_truth, n_pred = totals
    counted = tp + fp + fn
    half = tp + 0.5 * fp + 0.5 * fn
    pq, rq = ratio_or_nan(iou_sum, half), ratio_or_nan(tp, half)
    sq = np.where(counted > 0, np.where(tp > 0, ratio_or_nan(iou_sum, tp), 0.0), np.nan)
    return ObjectScores(
        things, tp, fp, fn, ignored, n_truth, n_pred, iou_sum, pq, sq, rq, ratio_or_nan(tp, tp + fp),
        ratio_or_nan(tp, tp + fn), ratio_or_nan(2 * tp, 2 * tp + fp + fn),
    )


def settle(tally: Tally | None, things: np.ndarray) -> tuple[ObjectScores, Segments, Segments]:
    """The scene's scores from all its chunks' tally, and how each segment the chunks left to it fared.

    Returns the scores and the predicted and true segments settled here, with their
    final ``matched`` and ``best`` (and the truth's summed areas, first pixels and boxes).
    """
    things = np.asarray(things, dtype=bool)
    c = len(things)
    if tally is None:
        return _scores(things, np.zeros((6, c), np.int64), np.zeros(c)), Segments.empty(), Segments.empty()
    truth, pred = tally.truth, tally.pred
    t, q, inter = tally.pairs
    ti, pi = np.searchsorted(truth.keys, t), np.searchsorted(pred.keys, q)
    iou = inter / (pred.area[pi] + truth.area[ti] - inter - pred.void[pi]).astype(np.float64)
    best_t, best_p = truth.best.copy(), pred.best.copy()
    np.maximum.at(best_t, ti, iou)
    np.maximum.at(best_p, pi, iou)
    hit = iou > MATCH_IOU
    match_t, match_p = truth.matched.copy(), pred.matched.copy()
    match_t[ti[hit]] = pred.keys[pi[hit]]
    match_p[pi[hit]] = truth.keys[ti[hit]]
    totals = tally.totals.copy()
    iou_sum = tally.iou_sum + np.bincount(truth.classes[ti[hit]], weights=iou[hit], minlength=c)
    totals[0] += np.bincount(truth.classes[ti[hit]], minlength=c)
    present_p, present_t = pred.area > 0, truth.area > 0
    lone_p = present_p & (match_p == NO_MATCH)
    ignored = lone_p & (2 * pred.void > pred.area)
    totals[1] += np.bincount(pred.classes[lone_p & ~ignored], minlength=c)
    totals[2] += np.bincount(truth.classes[present_t & (match_t == NO_MATCH)], minlength=c)
    totals[3] += np.bincount(pred.classes[ignored], minlength=c)
    open_t, open_p = truth.chunk < 0, pred.chunk < 0  # those inside a chunk were counted there
    totals[4] += np.bincount(truth.classes[open_t & present_t], minlength=c)
    totals[5] += np.bincount(pred.classes[open_p & present_p], minlength=c)
    return (
        _scores(things, totals, iou_sum),
        Segments(pred.keys, pred.classes, pred.area, pred.void, match_p, best_p, pred.first, pred.bbox, pred.chunk),
        Segments(truth.keys, truth.classes, truth.area, truth.void, match_t, best_t, truth.first, truth.bbox, truth.chunk),
    )


def object_scores(
    truth: np.ndarray, pred: np.ndarray, count: np.ndarray, truth_classes: np.ndarray, pred_classes: np.ndarray,
    things: np.ndarray,
) -> ObjectScores:
    """The scores of one whole scene from its (truth segment, predicted segment) pixel counts, all segments closed.

    ``count[i]`` pixels lie in truth segment ``truth[i]`` and predicted segment
    ``pred[i]`` (indices into ``truth_classes`` and ``pred_classes``);
    ``truth[i] == len(truth_classes)`` is void. Only pixels with a prediction are counted.
    """
    t = np.asarray(truth, dtype=np.int64)
    void = t == len(truth_classes)
    tc = np.where(void, -1, np.asarray(truth_classes)[np.minimum(t, len(truth_classes) - 1)] if len(truth_classes) else -1)
    scoring = chunk_tally(
        np.where(void, VOID, t + 1), np.asarray(pred, np.int64) + 1, count, tc, np.asarray(pred_classes)[pred],
        truth_open=_EMPTY, pred_open=_EMPTY, things=things, chunk=0,
    )
    return settle(scoring.tally, things)[0]
