"""Metrics against an independent, loop-based computation, and exact chunked reduction."""

import math

import numpy as np
import pytest

from pipeline.core.metrics import confusion_matrix, segmentation_metrics


def reference(truth, pred, c, ignore=255):
    """Textbook definitions pixel by pixel, class by class (no shared code with the module)."""
    pairs = [(int(t), int(p)) for t, p in zip(truth.ravel(), pred.ravel()) if t != ignore and 0 <= t < c and 0 <= p < c]
    n = len(pairs)
    out = {"iou": [], "dice": [], "acc": [], "prec": []}
    for k in range(c):
        tp = sum(1 for t, p in pairs if t == k and p == k)
        fp = sum(1 for t, p in pairs if t != k and p == k)
        fn = sum(1 for t, p in pairs if t == k and p != k)
        out["iou"].append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        out["dice"].append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
        out["acc"].append(tp / (tp + fn) if tp + fn else math.nan)
        out["prec"].append(tp / (tp + fp) if tp + fp else math.nan)
    correct = sum(1 for t, p in pairs if t == p)
    out["pixel_accuracy"] = correct / n
    freq = [sum(1 for t, _ in pairs if t == k) / n for k in range(c)]
    out["fw_iou"] = sum(f * i for f, i in zip(freq, out["iou"]) if not math.isnan(i))
    pe = sum(sum(1 for t, _ in pairs if t == k) * sum(1 for _, p in pairs if p == k) for k in range(c)) / n**2
    out["kappa"] = (out["pixel_accuracy"] - pe) / (1 - pe)
    return out


def nanmean(v):
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_reference(seed):
    rng = np.random.default_rng(seed)
    c = 5
    truth = rng.integers(0, c, size=(37, 41))
    truth[rng.random(truth.shape) < 0.1] = 255
    truth[truth == 3] = 2  # class 3 absent from truth
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, c, size=truth.shape)).astype(np.int64)
    pred[pred == 255] = 0
    pred[pred == 4] = 1  # class 4 only in truth
    pred[rng.random(truth.shape) < 0.05] = 255  # mask nodata
    m = segmentation_metrics(confusion_matrix(truth, pred, c))
    ref = reference(truth, pred, c)
    np.testing.assert_allclose(m.iou, ref["iou"], equal_nan=True)
    np.testing.assert_allclose(m.dice, ref["dice"], equal_nan=True)
    np.testing.assert_allclose(m.class_accuracy, ref["acc"], equal_nan=True)
    np.testing.assert_allclose(m.precision, ref["prec"], equal_nan=True)
    assert m.pixel_accuracy == pytest.approx(ref["pixel_accuracy"])
    assert m.mean_iou == pytest.approx(nanmean(ref["iou"]))
    assert m.mean_dice == pytest.approx(nanmean(ref["dice"]))
    assert m.mean_accuracy == pytest.approx(nanmean(ref["acc"]))
    assert m.frequency_weighted_iou == pytest.approx(ref["fw_iou"])
    assert m.kappa == pytest.approx(ref["kappa"])


def test_class_absent_everywhere_is_nan_and_left_out_of_means():
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    m = segmentation_metrics(confusion_matrix(truth, pred, 3))
    assert math.isnan(m.iou[2]) and math.isnan(m.dice[2])
    assert m.mean_iou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_ignore_nodata_and_out_of_range_count_nowhere():
    truth = np.array([0, 1, 255, 7, 1, -1])
    pred = np.array([0, 1, 0, 0, 255, 1])
    m = confusion_matrix(truth, pred, 2, truth_nodata=None)
    assert m.sum() == 2 and m[0, 0] == 1 and m[1, 1] == 1


@pytest.mark.parametrize("chunk", [7, 13, 29])
def test_chunked_matrices_sum_to_the_whole_scene_exactly(chunk):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, size=(61, 83))
    pred = rng.integers(0, 4, size=(61, 83))
    whole = confusion_matrix(truth, pred, 4)
    total = np.zeros_like(whole)
    for r in range(0, 61, chunk):
        for c in range(0, 83, chunk):
            total += confusion_matrix(truth[r : r + chunk, c : c + chunk], pred[r : r + chunk, c : c + chunk], 4)
    assert np.array_equal(total, whole)
    assert segmentation_metrics(total).scalars() == segmentation_metrics(whole).scalars()
