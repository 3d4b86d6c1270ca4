"""Objects across chunks, against whole-array references written from the definitions.

Components: ``scipy.ndimage.label`` on the whole scene, ids ranked by first
pixel. Object metrics: a direct transcription of the COCO panoptic reference
(``pq_compute``) on whole arrays. Scenes hold objects on chunk corners (diagonal
neighbours, where 4- and 8-connectivity differ), objects spanning three chunks,
rings around other objects, and one-pixel objects; chunk sizes divide nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import zarr
from rasterio.crs import CRS
from scipy import ndimage

from pipeline.core.geometry import ChunkGrid
from pipeline.core.objects import local_ids, merge_components, merge_keyed, object_scores, union_find
from pipeline.objects import object_spec, scene_objects
from schemas.errors import SpecError
from schemas.store import OutputLayout
from tests.mask_stores import TRANSFORM, write_store
from workers.objects import chunk_segments, instance_segments, label_components, segment_stats

NAMES = ["ground", "building", "pond", "road"]  # building and pond are things; ground and road stuff
THINGS = [1, 2]
EPSG = 32633


# ---------- references, from the definitions ----------


def ref_objects(classes: np.ndarray, things: list[int], connectivity: int) -> np.ndarray:
    """Whole-scene ids: each thing class's components (scipy), ranked by first pixel in row-major order."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    raw = np.zeros(classes.shape, np.int64)
    n = 0
    for c in things:
        lab, k = ndimage.label(classes == c, structure=structure)
        raw[lab > 0] = lab[lab > 0] + n
        n += k
    first = {}
    for pos, v in enumerate(raw.ravel()):
        if v and v not in first:
            first[v] = pos
    ids = np.zeros(n + 1, np.int64)
    for rank, v in enumerate(sorted(first, key=first.get), start=1):
        ids[v] = rank
    return ids[raw]


def chunked_objects(classes: np.ndarray, things: list[int], connectivity: int, chunk: int):
    """Ids by the chunked path: label each chunk, merge in the core, map local labels to ids."""
    h, w = classes.shape
    grid = ChunkGrid(h, w, chunk)
    parts, labels = [], []
    for r, c in grid:
        win = grid.window(r, c)
        lab, cls = label_components(classes[win.row_off : win.row_stop, win.col_off : win.col_stop], things, connectivity)
        labels.append((win, lab, len(cls)))
        parts.append(chunk_segments(win, lab, cls, w))
    objects = merge_components(parts, grid.shape, connectivity)
    out = np.zeros((h, w), np.int64)
    for (win, lab, n), ids in zip(labels, objects.chunk_ids):
        first = segment_stats(win, lab, n, w)[0]
        out[win.row_off : win.row_stop, win.col_off : win.col_stop] = local_ids(ids, first)[lab]
    return out, objects


def coco_pq(pred: np.ndarray, truth: np.ndarray, things: list[int], connectivity: int, num_classes: int,
            truth_ids: np.ndarray | None = None) -> dict:
    """COCO panoptic pq_compute transcribed onto whole arrays (class maps: -1 is no class).

    Segments: each thing component (or, with ``truth_ids``, each (id, class) of thing pixels with id > 0), and one
    per stuff class. Truth that is no class is VOID (0). Pixels without prediction count nowhere (satseg invariant 5).
    """
    def panoptic(classes, ids=None):
        pan = np.zeros(classes.shape, np.int64)
        cat = {}
        nxt = 1
        for c in range(num_classes):
            where = classes == c
            if c in things:
                if ids is None:
                    lab, k = ndimage.label(where, structure=np.ones((3, 3)) if connectivity == 8 else None)
                    for i in range(1, k + 1):
                        pan[lab == i] = nxt
                        cat[nxt] = c
                        nxt += 1
                else:
                    for v in np.unique(ids[where & (ids > 0)]):
                        pan[where & (ids == v)] = nxt
                        cat[nxt] = c
                        nxt += 1
            elif where.any():
                pan[where] = nxt
                cat[nxt] = c
                nxt += 1
        return pan, cat

    scored = pred >= 0
    pan_pred, pred_cat = panoptic(pred)
    pan_gt, gt_cat = panoptic(truth, truth_ids)
    pan_pred, pan_gt = pan_pred[scored], pan_gt[scored]
    VOID = 0
    gt_segms = {k: {"category_id": v, "area": int((pan_gt == k).sum())} for k, v in gt_cat.items()}
    gt_segms = {k: s for k, s in gt_segms.items() if s["area"] > 0}
    pred_segms = {k: {"category_id": v, "area": int((pan_pred == k).sum())} for k, v in pred_cat.items()}
    pred_segms = {k: s for k, s in pred_segms.items() if s["area"] > 0}
    offset = 1 << 32
    labels, counts = np.unique(pan_gt * offset + pan_pred, return_counts=True)
    gt_pred_map = {(int(l // offset), int(l % offset)): int(n) for l, n in zip(labels, counts)}
    stat = {c: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in range(num_classes)}
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                 - gt_pred_map.get((VOID, pred_label), 0))
        iou = intersection / union
        if iou > 0.5:
            stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
            stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    for gt_label, gt_info in gt_segms.items():
        if gt_label not in gt_matched:
            stat[gt_info["category_id"]]["fn"] += 1
    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        if gt_pred_map.get((VOID, pred_label), 0) / pred_info["area"] > 0.5:
            continue
        stat[pred_info["category_id"]]["fp"] += 1
    out = {}
    for c, s in stat.items():
        tp, fp, fn, iou = s["tp"], s["fp"], s["fn"], s["iou"]
        if tp + fp + fn == 0:
            continue
        out[c] = {"tp": tp, "fp": fp, "fn": fn, "pq": iou / (tp + 0.5 * fp + 0.5 * fn),
                  "sq": iou / tp if tp else 0.0, "rq": tp / (tp + 0.5 * fp + 0.5 * fn)}
    return out


# ---------- scenes ----------


def corner_scene() -> np.ndarray:
    """Objects at chunk corners (chunk 5): diagonal neighbours across corners, one-pixel objects, a ring around a
    pond, and a building spanning three chunks."""
    m = np.zeros((17, 23), np.int16)
    m[4, 4] = m[5, 5] = 1  # diagonal across the corner of four chunks: one object if 8-connected
    m[4, 10] = m[5, 9] = 1  # the other diagonal across a corner
    m[0, 22] = 2  # one pixel at the scene corner
    m[9, 12] = 1  # one pixel, alone
    m[11, 1:14] = 1  # spans three chunks
    m[1:8, 14:21] = 2
    m[2:7, 15:20] = 0  # a ring of pond ...
    m[4, 17] = 2  # ... around a one-pixel pond in its hole
    m[13:17, 16:23] = 3  # stuff
    m[16, 0:4] = 2
    return m


def random_scene(seed: int, h: int, w: int, classes: int = 4, smooth: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, classes, (h, w))
    return (ndimage.median_filter(m, 3) if smooth else m).astype(np.int16)


# ---------- components and ids ----------


@pytest.mark.parametrize("connectivity", [4, 8])
def test_merged_components_equal_whole_scene_labelling(connectivity):
    scenes = [corner_scene()] + [random_scene(s, 13 + s, 29 - s, smooth=s % 2 == 0) for s in range(6)]
    for m in scenes:
        ref = ref_objects(m, THINGS, connectivity)
        for chunk in (1, 2, 3, 5, 7, 64):
            ids, objects = chunked_objects(m, THINGS, connectivity, chunk)
            np.testing.assert_array_equal(ids, ref, err_msg=f"chunk {chunk}")
            assert len(objects) == ref.max()
            # the driver holds exactly the objects with a pixel on a chunk border, with their whole-scene numbers
            on_border = np.zeros(m.shape, bool)
            on_border[::chunk], on_border[chunk - 1 :: chunk], on_border[-1] = True, True, True
            on_border[:, ::chunk], on_border[:, chunk - 1 :: chunk], on_border[:, -1] = True, True, True
            np.testing.assert_array_equal(objects.ids, np.unique(ref[on_border & (ref > 0)]))
            np.testing.assert_array_equal(objects.pixels, np.bincount(ref.ravel())[objects.ids])
            for k, i in enumerate(objects.ids):
                rows, cols = np.nonzero(ref == i)
                assert objects.chunks[k] == len({(r // chunk, c // chunk) for r, c in zip(rows, cols)})
                assert tuple(objects.bbox[k]) == (rows.min(), cols.min(), rows.max(), cols.max())
                assert objects.first[k] == rows[0] * m.shape[1] + cols[0]
                assert objects.classes[k] == m[rows[0], cols[0]]


def test_corners_join_only_when_8_connected():
    m = corner_scene()
    four, _ = chunked_objects(m, THINGS, 4, 5)
    eight, _ = chunked_objects(m, THINGS, 8, 5)
    assert four[4, 4] != four[5, 5] and eight[4, 4] == eight[5, 5]
    assert four[4, 10] != four[5, 9] and eight[4, 10] == eight[5, 9]
    assert len(np.unique(four[11, 1:14])) == 1  # across three chunks, one object
    assert four[4, 17] not in (0, four[1, 14])  # the pond in the ring's hole is an object of its own


def test_union_find_joins_long_chains():
    n = 1000
    a = np.arange(n - 1)[::-1]
    roots = union_find(n, a, a + 1)
    assert (roots == 0).all()
    roots = union_find(6, np.array([4, 1]), np.array([5, 2]))
    np.testing.assert_array_equal(roots, [0, 1, 1, 3, 4, 4])


def test_instance_segments_merge_by_key_whatever_the_chunks():
    rng = np.random.default_rng(3)
    classes = random_scene(4, 19, 26)
    ids = rng.integers(0, 4, (19, 26))
    for chunk in (4, 7, 30):
        grid = ChunkGrid(19, 26, chunk)
        parts = []
        for r, c in grid:
            win = grid.window(r, c)
            block = (slice(win.row_off, win.row_stop), slice(win.col_off, win.col_stop))
            parts.append(instance_segments(classes[block], ids[block], THINGS)[2])
        objects = merge_keyed(parts)
        pairs = {(int(v), int(c)) for v, c in zip(ids.ravel(), classes.ravel()) if v > 0 and c in THINGS}
        assert len(objects) == len(pairs)
        # a key is open (settled by the scene) exactly when two chunks hold it, and counted in each
        holders = {}
        for k, keys in enumerate(parts):
            for key in keys.tolist():
                holders.setdefault(key, set()).add(k)
        shared = sorted(key for key, ks in holders.items() if len(ks) > 1)
        np.testing.assert_array_equal(objects.shared, shared)
        np.testing.assert_array_equal(objects.chunks, [len(holders[key]) for key in shared])
        for k, keys in enumerate(parts):
            np.testing.assert_array_equal(objects.chunk_open[k], sorted(set(keys.tolist()) & set(shared)))


# ---------- object metrics ----------


def _metrics_rows(layout: OutputLayout, scene: str = "s") -> dict:
    rows = pq.read_table(layout.report_file("object_metrics", "j", scene)).to_pylist()
    return {r["class_index"] if r["level"] == "class" else r["level"]: r for r in rows}


def _labels_tif(path, values: np.ndarray, nodata: int = 255, epsg: int = EPSG):
    h, w = values.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=1, dtype="uint8", crs=CRS.from_epsg(epsg),
                       transform=rasterio.Affine(*TRANSFORM), nodata=nodata) as f:
        f.write(values.astype(np.uint8), 1)
    return path


def _run(tmp_path, name: str, mask: np.ndarray, chunk: int, labels=None, instances=None, connectivity: int = 4, **kw):
    store = write_store(tmp_path / f"{name}.zarr", mask, chunk, NAMES)
    layout = OutputLayout(tmp_path / f"out-{name}")
    spec = object_spec(NAMES, [NAMES[i] for i in THINGS], connectivity=connectivity, **kw)
    result = scene_objects(layout, "j", "s", store, spec, transform=TRANSFORM, crs=CRS.from_epsg(EPSG).to_wkt(),
                           labels=labels, instances=instances)
    return store, layout, result


def _pair_scene(seed: int):
    """Prediction and truth that overlap partly: some objects match, some split, some are missed or false."""
    pred = random_scene(seed, 37, 43)
    truth = pred.copy()
    truth[10:20] = random_scene(seed + 100, 10, 43)
    truth[:, 30:33] = random_scene(seed + 200, 37, 3, smooth=False)
    shifted = np.roll(pred, 1, axis=1)
    truth[25:] = shifted[25:]
    return pred, truth


@pytest.mark.parametrize("connectivity", [4, 8])
def test_object_metrics_equal_the_coco_reference_for_any_chunking(tmp_path, connectivity):
    pred, truth = _pair_scene(7)
    mask = pred.astype(np.uint8)
    mask[:3, :6] = 255  # nodata in the mask: counted nowhere
    labels = truth.astype(np.uint8)
    labels[30:34, 2:20] = 255  # ignore_index: void
    labels[0, :] = 9  # outside the class list: void too
    tif = _labels_tif(tmp_path / "labels.tif", labels)
    as_classes = lambda a: np.where(a >= len(NAMES), -1, a.astype(np.int64))  # noqa: E731  (255, 9: no class)
    ref = coco_pq(as_classes(mask), as_classes(labels), THINGS, connectivity, len(NAMES))
    seen = []
    for chunk in (6, 11, 50):
        _, layout, result = _run(tmp_path, f"c{chunk}-{connectivity}", mask, chunk, labels=str(tif), connectivity=connectivity)
        rows = _metrics_rows(layout)
        for c in range(len(NAMES)):
            if c not in ref:
                assert rows[c]["pq"] is None
                continue
            got = rows[c]
            assert (got["true_positives"], got["false_positives"], got["false_negatives"]) == (
                ref[c]["tp"], ref[c]["fp"], ref[c]["fn"]), (chunk, c)
            for k in ("pq", "sq", "rq"):
                assert got[k] == pytest.approx(ref[c][k], abs=1e-12)
            assert got["f1"] == pytest.approx(2 * ref[c]["tp"] / (2 * ref[c]["tp"] + ref[c]["fp"] + ref[c]["fn"]))
        means = {
            g: np.mean([ref[c]["pq"] for c in ref if (c in THINGS) == (g == "things") or g == "all"])
            for g in ("all", "things", "stuff")
        }
        for g, v in means.items():
            assert rows[g]["pq"] == pytest.approx(v, abs=1e-12)
        seen.append([(r["true_positives"], r["false_positives"], r["false_negatives"]) for r in rows.values()])
        assert result.scores.true_positives.sum() > 0 and result.scores.false_positives.sum() > 0
    assert seen[0] == seen[1] == seen[2]


def ref_matches(pred_ids: np.ndarray, truth_ids: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> tuple[dict, dict]:
    """Per predicted and per true thing object: (matched partner id or -1, best IoU with one of its class), from the
    definitions on whole arrays (COCO's union: |P| + |G| - |P & G| - |P & void|; pixels without prediction count
    nowhere; ``truth`` -1 is void)."""
    scored = pred >= 0
    out_p, out_t = {}, {}
    void = scored & (truth < 0)
    for t in np.unique(truth_ids[truth_ids > 0]):
        out_t[int(t)] = (-1, 0.0)
    for p in np.unique(pred_ids[pred_ids > 0]):
        where = pred_ids == p
        cls = pred[where][0]
        area_p, void_p = int((where & scored).sum()), int((where & void).sum())
        best, match = 0.0, -1
        for t in np.unique(truth_ids[where & scored & (truth_ids > 0)]):
            tw = (truth_ids == t) & scored
            if truth[tw][0] != cls:
                continue
            inter = int((where & tw).sum())
            iou = inter / (area_p + int(tw.sum()) - inter - void_p)
            best = max(best, iou)
            out_t[int(t)] = (out_t[int(t)][0], max(out_t[int(t)][1], iou))
            if iou > 0.5:
                match = int(t)
                out_t[int(t)] = (int(p), out_t[int(t)][1])
        out_p[int(p)] = (match, best)
    return out_p, out_t


@pytest.mark.parametrize("connectivity", [4, 8])
def test_each_object_match_and_each_miss_with_its_outline_equal_the_whole_scene(tmp_path, connectivity):
    import geopandas as gpd
    from rasterio.features import rasterize

    pred, truth = _pair_scene(13)
    mask = pred.astype(np.uint8)
    mask[:3, :6] = 255  # nodata: counted nowhere
    labels = truth.astype(np.uint8)
    labels[30:34, 2:20] = 255  # void
    tif = _labels_tif(tmp_path / "labels.tif", labels)
    p = np.where(mask >= len(NAMES), -1, mask.astype(np.int64))
    t = np.where(labels >= len(NAMES), -1, labels.astype(np.int64))
    pred_ids, truth_ids = ref_objects(p, THINGS, connectivity), ref_objects(t, THINGS, connectivity)
    want_p, want_t = ref_matches(pred_ids, truth_ids, p, t)
    scored = p >= 0
    missed = sorted(k for k, (m, _) in want_t.items() if m < 0 and ((truth_ids == k) & scored).any())
    assert 5 < len(missed) and any(m >= 0 for m, _ in want_p.values())
    seen = []
    for chunk in (6, 11, 50):
        _, layout, result = _run(tmp_path, f"m{chunk}-{connectivity}", mask, chunk, labels=str(tif),
                                 connectivity=connectivity)
        objects = gpd.read_parquet(layout.report_file("objects", "j", "s")).sort_values("object_id")
        got = {r.object_id: (r.truth_id if r.matched else -1, r.iou) for r in objects.itertuples()}
        assert got.keys() == want_p.keys()
        for k, (m, iou) in want_p.items():
            assert got[k][0] == m and got[k][1] == pytest.approx(iou, abs=1e-12), (chunk, k)
        misses = gpd.read_parquet(layout.report_file("object_misses", "j", "s")).sort_values("truth_id")
        assert misses.crs.to_epsg() == EPSG and misses.geometry.is_valid.all()
        assert list(misses.truth_id) == missed, chunk
        for r in misses.itertuples():
            rows, cols = np.nonzero(truth_ids == r.truth_id)
            assert r.pixels == int(((truth_ids == r.truth_id) & scored).sum())
            assert r.iou == pytest.approx(want_t[r.truth_id][1], abs=1e-12)
            assert (r.first_row, r.first_col) == (rows[0], cols[0])
            assert (r.row_off, r.col_off, r.height, r.width) == (
                rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        burnt = rasterize(zip(misses.geometry, misses.truth_id), out_shape=mask.shape,
                          transform=rasterio.Affine(*TRANSFORM), dtype="uint32")
        np.testing.assert_array_equal(burnt, np.where(np.isin(truth_ids, missed), truth_ids, 0))  # outlines, pixel-exact
        assert result.merged < result.objects  # the driver held only the objects on chunk borders
        seen.append(misses.drop(columns=["geometry"]).reset_index(drop=True))
    assert seen[0].equals(seen[1]) and seen[0].equals(seen[2])


def test_object_metrics_against_an_instance_raster(tmp_path):
    pred, truth = _pair_scene(11)
    ids = np.zeros(truth.shape, np.int64)
    ids[:, :20], ids[:, 20:] = 5, 7  # each class's pixels split at column 20: two true objects per thing class
    ids[:4] = 0  # thing pixels without an id: void
    tif = _labels_tif(tmp_path / "labels.tif", truth)
    inst = _labels_tif(tmp_path / "ids.tif", ids, nodata=0)
    ref = coco_pq(pred.astype(np.int64), truth.astype(np.int64), THINGS, 4, len(NAMES), truth_ids=ids)
    _, layout, _ = _run(tmp_path, "inst", pred.astype(np.uint8), 9, labels=str(tif), instances=str(inst))
    rows = _metrics_rows(layout)
    for c in ref:
        assert (rows[c]["true_positives"], rows[c]["false_positives"], rows[c]["false_negatives"]) == (
            ref[c]["tp"], ref[c]["fp"], ref[c]["fn"])
        assert rows[c]["pq"] == pytest.approx(ref[c]["pq"], abs=1e-12)
    assert rows["all"]["truth"] == "instances"
    misses = pq.read_table(layout.report_file("object_misses", "j", "s")).to_pylist()
    assert {m["truth_id"] for m in misses} <= {5, 7}


def test_scores_from_counts_follow_the_void_rules():
    # truth segments 0 (class 1), 1 (class 1); predicted 0 (class 1), 1 (class 1), 2 (class 1); truth 2 is void
    t = np.array([0, 2, 1, 2])
    p = np.array([0, 0, 1, 2])
    n = np.array([6, 2, 1, 3])
    s = object_scores(t, p, n, np.array([1, 1]), np.array([1, 1, 1]), np.array([False, True]))
    # pred 0: IoU 6 / (8 + 6 - 6 - 2) = 1 -> TP; pred 1: 1/(1+1-1) = 1 -> TP; pred 2: all on void -> ignored
    assert (s.true_positives[1], s.false_positives[1], s.false_negatives[1], s.ignored_predictions[1]) == (2, 0, 0, 1)
    assert s.pq[1] == 1.0 and np.isnan(s.pq[0])


# ---------- polygons, the store, the table ----------


def test_polygons_are_pixel_exact_one_row_per_object_and_the_same_for_any_chunking(tmp_path):
    import geopandas as gpd
    from rasterio.features import rasterize

    m = corner_scene()
    tables, stores = [], []
    for chunk in (5, 8):
        store, layout, result = _run(tmp_path, f"p{chunk}", m.astype(np.uint8), chunk)
        ids = zarr.open_array(str(store), path="instances")[:]
        np.testing.assert_array_equal(ids, ref_objects(m, THINGS, 4))
        frame = gpd.read_parquet(layout.report_file("objects", "j", "s")).sort_values("object_id").reset_index(drop=True)
        assert frame.crs.to_epsg() == EPSG
        assert list(frame.object_id) == list(range(1, ids.max() + 1)) and result.objects == ids.max()
        assert frame.geometry.is_valid.all() and (frame.geom_type == "Polygon").all()
        np.testing.assert_allclose(frame.geometry.area, frame.pixels * 100.0)
        np.testing.assert_allclose(frame.geometry.length, frame.perimeter)
        burnt = rasterize(zip(frame.geometry, frame.object_id), out_shape=m.shape, transform=rasterio.Affine(*TRANSFORM),
                          dtype="uint32")
        np.testing.assert_array_equal(burnt, ids)  # pixel-exact: every polygon covers exactly its pixels
        ring = frame[frame.object_id == ids[1, 14]].geometry.iloc[0]
        assert len(ring.interiors) == 1  # the hole is kept
        tables.append(frame)
        stores.append(store)
    a, b = tables
    assert a.drop(columns=["geometry", "chunks"]).equals(b.drop(columns=["geometry", "chunks"]))
    assert a.geometry.geom_equals_exact(b.geometry, 0).all()
    attrs = json.loads((stores[0] / "instances" / "zarr.json").read_text())["attributes"]
    assert attrs["satseg_complete"] is True and attrs["connectivity"] == 4
    import rioxarray  # noqa: F401
    import xarray as xr

    with xr.open_zarr(stores[0], decode_coords="all") as ds:  # beside the mask, georeferenced like it
        assert ds["instances"].rio.crs.to_epsg() == EPSG and int(ds["instances"].max()) == len(a)


def test_8_connected_objects_and_simplified_polygons(tmp_path):
    import geopandas as gpd

    m = corner_scene()
    _, layout, _ = _run(tmp_path, "eight", m.astype(np.uint8), 5, connectivity=8)
    frame = gpd.read_parquet(layout.report_file("objects", "j", "s"))
    diagonal = frame[frame.pixels == 2]
    assert (diagonal.geom_type == "MultiPolygon").all() and len(diagonal) == 2
    _, layout, _ = _run(tmp_path, "simple", random_scene(1, 40, 40).astype(np.uint8), 16, simplify=15.0)
    frame = gpd.read_parquet(layout.report_file("objects", "j", "s"))
    assert frame.geometry.is_valid.all()
    assert not np.allclose(frame.geometry.area, frame.pixels * 100.0)  # simplified...
    np.testing.assert_allclose(frame["area"], frame.pixels * 100.0)  # ...but area is the object's


def test_a_thing_that_is_no_class_is_one_line():
    with pytest.raises(SpecError, match="things 'car' is not a class; the classes are ground, building"):
        object_spec(NAMES, ["car"], source="job.yaml")


def test_satseg_objects_on_a_finished_job_folder_and_query(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.job_folder import claim_output

    out = tmp_path / "job"
    pred, truth = _pair_scene(5)
    tif = _labels_tif(tmp_path / "labels.tif", truth)
    spec = {"scenes": [{"image": str(tmp_path / "img.tif"), "labels": str(tif), "name": "s"}], "model": "pixel_linear",
            "classes": NAMES, "out": str(out)}
    claim_output(OutputLayout(out), "jobid", spec)
    write_store(OutputLayout(out).mask_store("s"), pred.astype(np.uint8), 16, NAMES, job_id="jobid")
    assert main(["objects", str(out), "--things", "car"]) == 2
    assert "things 'car' is not a class" in capsys.readouterr().err
    assert main(["objects", str(out)]) == 2
    assert "give --things" in capsys.readouterr().err
    assert main(["objects", str(out), "--things", "building,pond"]) == 0
    said = capsys.readouterr().out
    assert "objects: s:" in said and "PQ" in said
    sql = "SELECT count(*) AS n, min(object_id) AS lo FROM objects"
    assert main(["query", sql, "--reports", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["lo"] == 1 and rows[0]["n"] == int(zarr.open_array(str(out / "masks/s.zarr"), path="instances")[:].max())
    assert main(["query", "SELECT level, pq FROM object_metrics WHERE level = 'things'", "--reports", str(out)]) == 0
    assert "things" in capsys.readouterr().out
    from pipeline.report_objects import objects_section

    item = OutputLayout(out).stac_item("s")  # satseg objects refreshed the scene's STAC item: it links the tables
    links = {(item.parent / link["href"]).resolve() for link in json.loads(item.read_text())["links"]}
    for table in ("objects", "object_metrics", "object_misses"):
        assert OutputLayout(out).report_file(table, "jobid", "s").resolve() in links
    page = objects_section(OutputLayout(out), "jobid", "s", out / "masks/s.zarr", pred.shape, NAMES, "s")
    assert 'data-section="objects"' in page and "Largest false alarms" in page and "data:image/png" in page
    assert objects_section(OutputLayout(out), "jobid", "other", None, pred.shape, NAMES, "o") == ""


def test_the_report_outlines_large_misses_and_false_alarms_and_boxes_tiny_ones():
    import shapely

    from pipeline.report_objects import _outline

    rgb = np.full((60, 60, 3), 255, np.uint8)
    square = shapely.to_wkb(shapely.box(10, 10, 30, 40).difference(shapely.box(15, 15, 20, 20)))
    assert _outline(rgb, square, lambda xy: xy[:, ::-1] - 0.5, (255, 0, 0))  # x, y are columns, rows here
    red = (rgb == (255, 0, 0)).all(axis=2)
    assert red[10:41, 9:11].any() and red[10:41, 29:31].any() and red[14:21, 14:16].any()  # shell and hole
    assert not red[25:35, 20:26].any() and not red[50:].any()  # not filled, nothing outside
    tiny = shapely.to_wkb(shapely.box(5, 5, 7, 7))
    assert not _outline(rgb, tiny, lambda xy: xy[:, ::-1], (0, 0, 255))  # too small to outline: the caller boxes it


def test_the_report_draws_each_miss_with_its_own_polygon_when_an_id_has_two_classes(tmp_path):
    import shapely

    from pipeline.report_objects import _largest

    labels = np.zeros((10, 10), np.uint8)
    labels[1:4, 1:4], labels[6:9, 5:9] = 1, 2  # a building and a pond ...
    ids = np.where(labels > 0, 5, 0)  # ... of one instance id: two true objects, both missed
    _, layout, _ = _run(tmp_path, "two", np.zeros((10, 10), np.uint8), 4, labels=str(_labels_tif(tmp_path / "l.tif", labels)),
                        instances=str(_labels_tif(tmp_path / "i.tif", ids, nodata=0)))
    path = layout.report_file("object_misses", "j", "s")
    rows = _largest(path, "truth_id", ["class_name", "pixels", "iou", "row_off", "col_off", "height", "width"], None)
    assert sorted((r["truth_id"], r["class_name"]) for r in rows) == [(5, "building"), (5, "pond")]
    for r in rows:
        want = (labels == NAMES.index(r["class_name"])).sum() * 100.0  # a pixel is 10 x 10 map units
        assert shapely.from_wkb(r["geometry"]).area == want


def test_satseg_objects_scores_against_an_instance_raster(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.job_folder import claim_output

    out = tmp_path / "job"
    pred, truth = _pair_scene(2)
    ids = np.where(np.arange(truth.shape[1]) < 20, 3, 4)[None].repeat(truth.shape[0], 0)
    tif, inst = _labels_tif(tmp_path / "labels.tif", truth), _labels_tif(tmp_path / "ids.tif", ids, nodata=0)
    spec = {"scenes": [{"image": str(tmp_path / "img.tif"), "labels": str(tif), "name": "s"}], "model": "pixel_linear",
            "classes": NAMES, "things": ["building", "pond"], "out": str(out)}
    claim_output(OutputLayout(out), "jobid", spec)
    write_store(OutputLayout(out).mask_store("s"), pred.astype(np.uint8), 16, NAMES)
    assert main(["objects", str(out), "--instances", "t=x.tif"]) == 2
    assert "no scene 't' in the job" in capsys.readouterr().err
    assert main(["objects", str(out), "--instances", str(inst), "--connectivity", "8"]) == 0, capsys.readouterr().err
    rows = pq.read_table(OutputLayout(out).report_file("object_metrics", "jobid", "s")).to_pylist()
    assert {r["truth"] for r in rows} == {"instances"} and {r["connectivity"] for r in rows} == {8}
    assert {r["truth_segments"] for r in rows if r["class_name"] == "building"} == {2}


def test_satseg_objects_takes_a_scenes_instances_from_its_job(tmp_path, capsys):
    """A job whose scene names `instances` (true object ids): `satseg objects OUT` scores against them, no flag needed."""
    import geopandas as gpd

    from pipeline.cli import main
    from pipeline.job_folder import claim_output

    out = tmp_path / "job"
    pred, truth = _pair_scene(2)
    ids = np.where(np.arange(truth.shape[1]) < 20, 3, 4)[None].repeat(truth.shape[0], 0)
    tif, inst = _labels_tif(tmp_path / "labels.tif", truth), _labels_tif(tmp_path / "ids.tif", ids, nodata=0)
    spec = {"scenes": [{"image": str(tmp_path / "img.tif"), "labels": str(tif), "instances": str(inst), "name": "s"}],
            "model": "pixel_linear", "classes": NAMES, "things": ["building", "pond"], "out": str(out)}
    claim_output(OutputLayout(out), "jobid", spec)
    write_store(OutputLayout(out).mask_store("s"), pred.astype(np.uint8), 16, NAMES)
    assert main(["objects", str(out)]) == 0, capsys.readouterr().err
    rows = pq.read_table(OutputLayout(out).report_file("object_metrics", "jobid", "s")).to_pylist()
    assert {r["truth"] for r in rows} == {"instances"}
    ref = coco_pq(pred.astype(np.int64), truth.astype(np.int64), THINGS, 4, len(NAMES), truth_ids=ids)
    by_class = {r["class_index"]: r for r in rows if r["level"] == "class"}
    for c in ref:
        assert (by_class[c]["true_positives"], by_class[c]["false_positives"], by_class[c]["false_negatives"]) == (
            ref[c]["tp"], ref[c]["fp"], ref[c]["fn"])
    misses = gpd.read_parquet(OutputLayout(out).report_file("object_misses", "jobid", "s"))
    assert set(misses.truth_id) == {3, 4} and misses.geometry.is_valid.all()  # the raster's own ids
    assert (misses.geom_type == "MultiPolygon").any()  # an id's pixels of one class need not touch, and the file says so
    geo = json.loads(pq.read_schema(OutputLayout(out).report_file("object_misses", "jobid", "s")).metadata[b"geo"])
    assert "MultiPolygon" in geo["columns"]["geometry"]["geometry_types"]


def test_instance_ids_too_large_for_their_key_are_one_line_and_nothing_is_written(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.job_folder import claim_output

    out = tmp_path / "job"
    pred, truth = _pair_scene(2)
    ids = np.full(truth.shape, 3, np.int64)
    ids[-1, -1] = 2**56 + 3  # would share its key (id x 256 + class) with id 3
    tif = _labels_tif(tmp_path / "labels.tif", truth)
    with rasterio.open(tmp_path / "ids.tif", "w", driver="GTiff", height=ids.shape[0], width=ids.shape[1], count=1,
                       dtype="int64", crs=CRS.from_epsg(EPSG), transform=rasterio.Affine(*TRANSFORM)) as f:
        f.write(ids, 1)
    spec = {"scenes": [{"image": str(tmp_path / "img.tif"), "labels": str(tif), "name": "s"}], "model": "pixel_linear",
            "classes": NAMES, "things": ["building"], "out": str(out)}
    claim_output(OutputLayout(out), "jobid", spec)
    write_store(OutputLayout(out).mask_store("s"), pred.astype(np.uint8), 16, NAMES)
    assert main(["objects", str(out), "--instances", str(tmp_path / "ids.tif")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ids.tif: instance id 72057594037927939 is out of range" in err
    assert not (OutputLayout(out).mask_store("s") / "instances").exists()
    assert not OutputLayout(out).report_file("objects", "jobid", "s").exists()
    assert main(["objects", str(out), "--things", " , "]) == 2
    assert "--things ' , ' names no class" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["out", "out [1]"])  # `[1]` is a pattern to DuckDB's and Python's globs
def test_query_reads_objects_of_scenes_in_different_crss(tmp_path, folder):
    from pipeline.query import run_query

    m = corner_scene().astype(np.uint8)
    layout = OutputLayout(tmp_path / folder)
    spec = object_spec(NAMES, [NAMES[i] for i in THINGS])
    truth = np.roll(m, 3, axis=1)  # some true objects missed, in both scenes
    for scene, epsg in (("north", 32633), ("east", 32634)):
        store = write_store(tmp_path / f"{scene}.zarr", m, 8, NAMES)
        labels = _labels_tif(tmp_path / f"{scene}.tif", truth, epsg=epsg)
        scene_objects(layout, "j", scene, store, spec, transform=TRANSFORM, crs=CRS.from_epsg(epsg).to_wkt(),
                      labels=str(labels))
    n = int(ref_objects(m.astype(np.int16), THINGS, 4).max())
    for table in ("objects", "object_misses"):  # both GeoParquet in their scene's CRS
        result = run_query(layout.reports, "SELECT scene, count(*) > 0 AS n, min(ST_AsText(geometry)) LIKE 'POLYGON%' "
                                           f"AS poly FROM {table} GROUP BY scene ORDER BY scene")
        assert result.rows == [("east", True, True), ("north", True, True)], table
    result = run_query(layout.reports, "SELECT count(*) FROM objects")
    assert result.rows == [(2 * n,)]


# ---------- inputs: grids, folders, versions ----------


def test_truth_on_another_grid_is_one_line_before_any_chunk(tmp_path, capsys):
    """An instance raster (or labels) of another grid would be read window by window as other pixels' ids."""
    from pipeline.cli import main
    from pipeline.job_folder import claim_output
    from schemas.errors import MismatchError

    pred, truth = _pair_scene(3)
    tif = _labels_tif(tmp_path / "labels.tif", truth)
    for h, w in ((60, 60), (10, 10)):  # larger: read silently as a corner of it; smaller: a chunk fails
        inst = _labels_tif(tmp_path / f"ids{h}.tif", np.ones((h, w)), nodata=0)
        with pytest.raises(MismatchError, match=rf"ids{h}.tif: instance raster shape {h}x{w} differs from 37x43 \("):
            _run(tmp_path, f"g{h}", pred.astype(np.uint8), 9, labels=str(tif), instances=str(inst))
    with rasterio.open(tif) as src:
        profile = src.profile | {"transform": rasterio.Affine(*TRANSFORM) @ rasterio.Affine.translation(1, 0)}
        values = src.read(1)
    with rasterio.open(tmp_path / "shifted.tif", "w", **profile) as dst:
        dst.write(values, 1)
    with pytest.raises(MismatchError, match="shifted.tif: label transform differs"):
        _run(tmp_path, "shifted", pred.astype(np.uint8), 9, labels=str(tmp_path / "shifted.tif"))
    out = tmp_path / "job"  # `satseg objects --instances`: the same line, exit 2
    spec = {"scenes": [{"image": str(tmp_path / "img.tif"), "labels": str(tif), "name": "s"}], "model": "pixel_linear",
            "classes": NAMES, "things": ["building"], "out": str(out)}
    claim_output(OutputLayout(out), "jobid", spec)
    write_store(OutputLayout(out).mask_store("s"), pred.astype(np.uint8), 16, NAMES)
    assert main(["objects", str(out), "--instances", str(tmp_path / "ids60.tif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instance raster shape 60x60 differs" in err[0] and "resample or crop" in err[0], err


def test_satseg_objects_finds_relative_labels_from_any_folder(tmp_path, monkeypatch, capsys):
    """A job run with relative paths keeps them so in job.json; its scenes row holds the labels by absolute path."""
    from pipeline.cli import main
    from pipeline.job_folder import claim_output
    from pipeline.report_tables import scenes_table, write_table
    from schemas.rasters import recorded_path

    pred, truth = _pair_scene(5)
    monkeypatch.chdir(tmp_path)
    _labels_tif(tmp_path / "labels.tif", truth)
    layout = OutputLayout(tmp_path / "job")
    spec = {"scenes": [{"image": "img.tif", "labels": "labels.tif", "name": "s"}], "model": "pixel_linear",
            "classes": NAMES, "things": ["building", "pond"], "out": "job"}
    claim_output(layout, "jobid", spec)
    write_store(layout.mask_store("s"), pred.astype(np.uint8), 16, NAMES)
    write_table(scenes_table({"scene": "s", "image": recorded_path("img.tif"), "labels": recorded_path("labels.tif")}, None),
                layout.report_file("scenes", "jobid", "s"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["objects", str(layout.root)]) == 0, capsys.readouterr().err
    rows = pq.read_table(layout.report_file("object_metrics", "jobid", "s")).to_pylist()
    assert {r["truth"] for r in rows} == {"components"} and sum(r["true_positives"] for r in rows if r["level"] == "all") > 0


def test_shapely_without_2_1_is_one_line_before_any_work(monkeypatch):
    import shapely

    monkeypatch.delattr(shapely, "orient_polygons")  # as in shapely 2.0, which imports fine but cannot orient polygons
    monkeypatch.setattr(shapely, "__version__", "2.0.7")
    with pytest.raises(SpecError, match=r"shapely 2.1 or later .*\(shapely 2.0.7 is installed\); pip install 'satseg\[objects"):
        object_spec(NAMES, ["building"])


@pytest.mark.slow  # resolving the job's model imports torch
def test_a_job_refuses_an_instance_raster_on_another_grid_before_it_starts(tmp_path, capsys):
    from pipeline.cli import main

    _, truth = _pair_scene(3)
    image, labels = _labels_tif(tmp_path / "image.tif", truth), _labels_tif(tmp_path / "labels.tif", truth)
    ids = _labels_tif(tmp_path / "ids.tif", np.ones((37, 44)), nodata=0)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "scenes": [{"image": str(image), "labels": str(labels), "instances": str(ids), "name": "s"}], "model": "pixel_linear",
        "classes": NAMES, "things": ["building"], "out": str(tmp_path / "out"),
    }))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ids.tif: instance raster shape 37x44 differs from 37x43" in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything is written
