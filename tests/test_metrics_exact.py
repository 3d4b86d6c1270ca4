"""Every metric, reduced chunk by chunk with Dask, against independent whole-array implementations.

The references below are written from the definitions (loops, the paper's
erosion, sorted raw scores), not from satseg's functions. Scenes have odd
sizes; chunk sizes do not divide them; masks are random and adversarial.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest

from pipeline.counting import array_raster, chunk_counts
from pipeline.core.metrics import class_indices, pr_curve, scene_scores

C = 5
H, W = 61, 79
CHUNKS = (16, 23, 37)  # none divides 61 or 79
IGNORE = 255


# ---------- references, from the definitions ----------


def ref_confusion(truth_idx, pred_idx):
    m = np.zeros((C, C), dtype=np.int64)
    for t, p in zip(truth_idx.ravel(), pred_idx.ravel()):
        if t >= 0 and p >= 0:
            m[t, p] += 1
    return m


def ref_metrics(m):
    """Textbook formulas, one class at a time."""
    out = {"iou": [], "dice": [], "acc": [], "prec": []}
    total = m.sum()
    for i in range(C):
        tp, g, p = m[i, i], m[i, :].sum(), m[:, i].sum()
        out["iou"].append(tp / (g + p - tp) if g + p > 0 else np.nan)
        out["dice"].append(2 * tp / (g + p) if g + p > 0 else np.nan)
        out["acc"].append(tp / g if g > 0 else np.nan)
        out["prec"].append(tp / p if p > 0 else np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty scene: NaN, as in satseg
        po = np.trace(m) / total
        pe = sum(m[i, :].sum() * m[:, i].sum() for i in range(C)) / total**2
        out["kappa"] = (po - pe) / (1 - pe)
    out["pixel_accuracy"] = po
    out["fw_iou"] = sum(m[i, :].sum() / total * out["iou"][i] for i in range(C) if m[i, :].sum() + m[:, i].sum() > 0)
    return out


def paper_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Cheng et al.'s mask_to_boundary: pad by one zero pixel, erode `dilation` times with a 3x3 kernel, subtract.

    cv2.erode's default border leaves pixels beyond the padded image out of the minimum.
    """
    padded = np.pad(mask.astype(np.uint8), 1, constant_values=0)
    h, w = padded.shape
    eroded = padded.copy()
    for _ in range(dilation):
        nxt = eroded.copy()
        for y in range(h):
            for x in range(w):
                nxt[y, x] = eroded[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].min()
        eroded = nxt
    return (mask.astype(bool)) & ~(eroded[1:-1, 1:-1].astype(bool))


def ref_boundary_iou(truth_idx, pred_idx, d):
    """Pixels scored nowhere (no class in truth or prediction) are neutral: they count as inside every mask."""
    valid = (truth_idx >= 0) & (pred_idx >= 0)
    out = []
    for c in range(C):
        gb = paper_boundary((truth_idx == c) | ~valid, d) & (truth_idx == c) & valid
        pb = paper_boundary((pred_idx == c) | ~valid, d) & (pred_idx == c) & valid
        union = (gb | pb).sum()
        out.append((gb & pb).sum() / union if union else np.nan)
    return np.array(out)


def ref_trimap_distance(truth_idx, pred_idx, n):
    """Smallest w <= n such that a scored pixel within Chebyshev distance w (inside the scene) has another truth value."""
    h, w = truth_idx.shape
    scored = (truth_idx >= 0) & (pred_idx >= 0)
    dist = np.zeros((h, w), dtype=int)
    for y in range(h):
        for x in range(w):
            if not scored[y, x]:
                continue
            for r in range(1, n + 1):
                win = truth_idx[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
                ok = scored[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
                if (win[ok] != truth_idx[y, x]).any():
                    dist[y, x] = r
                    break
    return dist


def ref_trimap_iou(truth_idx, pred_idx, n):
    dist = ref_trimap_distance(truth_idx, pred_idx, n)
    rows = []
    for r in range(1, n + 1):
        band = (dist > 0) & (dist <= r)
        m = ref_confusion(np.where(band, truth_idx, -1), np.where(band, pred_idx, -1))
        rows.append(ref_metrics(m)["iou"])
    return np.array(rows)


def ref_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP from raw scores sorted descending, ties grouped: sum over distinct thresholds of (R_k - R_{k-1}) P_k."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order]
    ap, tp, fp, prev_recall, total = 0.0, 0, 0, 0.0, y.sum()
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        tp += int(y[i:j].sum())
        fp += int((~y[i:j]).sum())
        recall = tp / total
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
        i = j
    return ap


# ---------- masks ----------


def random_case(seed):
    rng = np.random.default_rng(seed)
    # blocky truth so that bands are not the whole image
    coarse = rng.integers(0, C, (H // 6 + 1, W // 6 + 1))
    truth = np.kron(coarse, np.ones((6, 6), dtype=int))[:H, :W]
    pred = truth.copy()
    flip = rng.random((H, W)) < 0.15
    pred[flip] = rng.integers(0, C, flip.sum())
    truth[rng.random((H, W)) < 0.02] = IGNORE
    truth[20:23, :] = -1  # label nodata (as read from a GeoTIFF)
    pred[:, 40:42] = 255  # image nodata
    return truth, pred.astype(np.uint8)


def adversarial_case(chunk):
    """Empty class 3, class 4 only in truth, one-pixel objects at chunk corners, objects on the scene edge."""
    truth = np.zeros((H, W), dtype=int)
    pred = np.zeros((H, W), dtype=np.uint8)
    truth[:, : W // 2] = 1
    pred[:, : W // 2 + 1] = 1
    for y in range(0, H, chunk):
        for x in range(0, W, chunk):
            for dy, dx in ((0, 0), (-1, -1), (-1, 0), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W:
                    truth[yy, xx] = 2
                    pred[yy, xx] = 2 if (yy + xx) % 2 else 0
    truth[0:4, W - 6 : W] = 4  # class 4 only in truth, touching the top and right edges
    truth[H - 1, :] = 2  # a one-pixel-wide object along the bottom edge
    pred[H - 2 :, 10:30] = 2
    return truth, pred


CASES = [("random-0", *random_case(0)), ("random-1", *random_case(1))] + [
    (f"adversarial-{c}", *adversarial_case(c)) for c in CHUNKS
]


def truth_indices(truth):
    return class_indices(truth, C, ignore_index=IGNORE)


def pred_indices(pred):
    p = pred.astype(int)
    return np.where(p < C, p, -1)


def quantised_probabilities(truth_idx, seed):
    """Random but informative probabilities: float scores and their uint8 storage."""
    rng = np.random.default_rng(seed)
    raw = rng.random((C, H, W)) * 0.6
    for c in range(C):
        raw[c][truth_idx == c] += 0.4 * rng.random(int((truth_idx == c).sum()))
    raw /= raw.sum(axis=0, keepdims=True)
    return raw, np.rint(raw * 255).astype(np.uint8)


def counts_for(truth, pred, chunk, probs=None, width=2, trimap=4):
    mask = array_raster(pred, chunk)
    labels = array_raster(truth, chunk)
    p = array_raster(probs, chunk) if probs is not None else None
    with dask.config.set(scheduler="threads"):
        return chunk_counts(mask, labels, C, ignore_index=IGNORE, probabilities=p, boundary_width=width, trimap_max=trimap)


@pytest.mark.parametrize("name,truth,pred", CASES, ids=[c[0] for c in CASES])
def test_every_metric_equals_the_whole_array_definition_for_every_chunk_size(name, truth, pred):
    t, p = truth_indices(truth), pred_indices(pred)
    conf = ref_confusion(t, p)
    ref = ref_metrics(conf)
    width, trimap = 2, 4
    ref_b = ref_boundary_iou(t, p, width)
    ref_t = ref_trimap_iou(t, p, trimap)
    raw, probs = quantised_probabilities(t, 7)
    first = None
    for chunk in CHUNKS:
        counts = counts_for(truth, pred, chunk, probs, width, trimap)
        assert np.array_equal(counts.total_confusion, conf), chunk
        s = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap, counts.histograms)
        m = s.metrics
        np.testing.assert_allclose(m.iou, ref["iou"], rtol=0, atol=1e-15)
        np.testing.assert_allclose(m.dice, ref["dice"], rtol=0, atol=1e-15)
        np.testing.assert_allclose(m.class_accuracy, ref["acc"], rtol=0, atol=1e-15)
        np.testing.assert_allclose(m.precision, ref["prec"], rtol=0, atol=1e-15)
        assert m.pixel_accuracy == pytest.approx(ref["pixel_accuracy"], abs=1e-15)
        assert m.kappa == pytest.approx(ref["kappa"], abs=1e-12)
        assert m.frequency_weighted_iou == pytest.approx(ref["fw_iou"], abs=1e-12)
        np.testing.assert_allclose(s.boundary_iou, ref_b, rtol=0, atol=1e-15, err_msg=f"boundary IoU, chunk {chunk}")
        np.testing.assert_allclose(s.trimap_iou, ref_t, rtol=0, atol=1e-15, err_msg=f"trimap IoU, chunk {chunk}")
        valid = (t >= 0) & (p >= 0)
        for c in range(C):
            positives = (t == c)[valid]
            if positives.any():
                assert s.average_precision[c] == pytest.approx(
                    ref_average_precision(probs[c][valid].astype(float), positives), abs=1e-12
                )
            else:
                assert np.isnan(s.average_precision[c])
        # exactly the same numbers for every chunking: integer counts, reduced in any order
        key = (m.iou.tobytes(), s.boundary_iou.tobytes(), s.trimap_iou.tobytes(), s.average_precision.tobytes(), m.kappa)
        first = first or key
        assert key == first, f"chunk {chunk} differs from chunk {CHUNKS[0]}"


def test_adversarial_classes_behave():
    truth, pred = adversarial_case(23)
    counts = counts_for(truth, pred, 23)
    s = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap)
    assert np.isnan(s.metrics.iou[3]) and np.isnan(s.boundary_iou[3])  # class 3: nowhere, so out of the means
    assert s.metrics.iou[4] == 0.0 and s.boundary_iou[4] == 0.0  # class 4: only in truth
    assert np.isfinite(s.mean_boundary_iou)


def test_chunk_edges_are_not_boundaries():
    """A uniform scene has boundary only along the scene edge, whatever the chunks."""
    truth = np.ones((H, W), dtype=int)
    pred = np.ones((H, W), dtype=np.uint8)
    counts = counts_for(truth, pred, 16, width=3)
    edge_band = H * W - (H - 6) * (W - 6)
    assert counts.total_boundary[0, 1] == edge_band and counts.total_boundary[2, 1] == edge_band
    assert counts.trimap.sum() == 0  # no true boundary anywhere: the scene edge is not one


@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (9, 9), (40, 8)])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_scenes_and_chunks_smaller_than_the_halo(shape, chunk):
    rng = np.random.default_rng(sum(shape) + chunk)
    truth = rng.integers(0, 3, shape)
    pred = truth.copy().astype(np.uint8)
    pred[rng.random(shape) < 0.3] = 1
    t, p = truth_indices(truth), pred_indices(pred)
    counts = counts_for(truth, pred, chunk, width=3, trimap=10)  # halo 10 > scene and chunk
    s = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap)
    assert np.array_equal(counts.total_confusion, ref_confusion(t, p))
    np.testing.assert_allclose(s.boundary_iou, ref_boundary_iou(t, p, 3), rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.trimap_iou, ref_trimap_iou(t, p, 10), rtol=0, atol=1e-15)


def test_unscored_pixels_neither_make_nor_break_boundaries():
    """A perfect prediction scores 1 everywhere, whatever ignore pixels, label nodata and image nodata holes it has."""
    truth = np.zeros((40, 40), dtype=int)
    truth[:, 20:] = 1
    pred = truth.astype(np.uint8)
    truth[5, 5] = IGNORE
    truth[30, 25] = IGNORE
    truth[10:13, 28:31] = -1
    pred[25:28, 8:11] = 255
    counts = counts_for(truth, pred, 16, width=3, trimap=5)
    s = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap)
    assert list(s.boundary_iou[:2]) == [1.0, 1.0] and np.isnan(s.boundary_iou[2:]).all()
    assert np.all(s.trimap_iou[:, :2] == 1.0)
    clean = counts_for(np.where(truth < 0, 0, np.where(truth == IGNORE, 0, truth)), pred, 16, width=3, trimap=5)
    assert counts.trimap[-1].sum() <= clean.trimap[-1].sum()  # no band grows around unscored pixels


def test_boundary_ratio_follows_the_paper():
    from pipeline.core.boundary import boundary_width_for

    assert boundary_width_for(512, 512, ratio=0.02) == round(0.02 * np.hypot(512, 512))
    assert boundary_width_for(10, 10, ratio=0.02) == 1  # at least one pixel
    assert boundary_width_for(4000, 4000) == 3
    from schemas.errors import SpecError

    with pytest.raises(SpecError, match="--boundary-width"):
        boundary_width_for(50000, 50000, ratio=0.02)  # a 1414 px halo: meant for tiles, not scenes


def test_ap_from_histograms_is_within_a_bin_of_ap_from_raw_scores():
    rng = np.random.default_rng(3)
    for trial in range(5):
        n = 20000
        positive = rng.random(n) < 0.3
        scores = np.clip(rng.normal(0.35 + 0.3 * positive, 0.2), 0, 1)
        q = np.rint(scores * 255).astype(int)
        hist_pos = np.bincount(q[positive], minlength=256)
        hist_neg = np.bincount(q[~positive], minlength=256)
        curve = pr_curve(hist_pos, hist_neg)
        # exactly the AP of the stored (quantised) scores
        assert curve.average_precision == pytest.approx(ref_average_precision(q.astype(float), positive), abs=1e-12)
        # and within the bin width of the AP of the raw float scores
        assert abs(curve.average_precision - ref_average_precision(scores, positive)) <= 1 / 255
        assert curve.recall[-1] == 1.0 and np.all(np.diff(curve.recall) >= 0)


def test_micro_and_macro_aggregates():
    from pipeline.report_tables import aggregates_table, classes_table, curves_table

    rows_s, rows_c, rows_k, parts = [], [], [], []
    for i, (truth, pred) in enumerate([random_case(0), random_case(1)]):
        t = truth_indices(truth)
        _, probs = quantised_probabilities(t, i)
        counts = counts_for(truth, pred, 23, probs)
        s = scene_scores(counts.total_confusion, counts.total_boundary, counts.trimap, counts.histograms)
        parts.append((counts, s))
        name = f"s{i}"
        names = [f"c{k}" for k in range(C)]
        rows_s.append({"scene": name, "num_classes": C, "class_names": names, "confusion": s.metrics.confusion.ravel().tolist()})
        rows_c += classes_table(name, names, s, counts.predicted.sum(axis=(0, 1))).to_pylist()
        rows_k += curves_table(name, names, s).to_pylist()
    agg = {r["aggregate"]: r for r in aggregates_table(rows_s, rows_c, rows_k).to_pylist()}
    pooled = scene_scores(
        parts[0][0].total_confusion + parts[1][0].total_confusion,
        parts[0][0].total_boundary + parts[1][0].total_boundary,
        None,
        parts[0][0].histograms + parts[1][0].histograms,
    )
    assert agg["micro"]["mean_iou"] == pooled.metrics.mean_iou
    assert agg["micro"]["mean_boundary_iou"] == pooled.mean_boundary_iou
    assert agg["micro"]["mean_average_precision"] == pooled.mean_average_precision
    assert agg["macro"]["mean_iou"] == pytest.approx(np.mean([p[1].metrics.mean_iou for p in parts]))
    assert agg["macro"]["kappa"] == pytest.approx(np.mean([p[1].metrics.kappa for p in parts]))
    assert agg["micro"]["scenes"] == agg["macro"]["scenes"] == 2
