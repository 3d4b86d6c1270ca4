"""Segmentation metrics from integer confusion matrices.

M[i, j] counts pixels of truth class i predicted as class j. Matrices are
int64 counts, so summing them over chunks in any order gives exactly the
whole-scene matrix, and every metric below is then exactly the whole-scene
value (ARCHITECTURE.md, invariant 7). Classes with no truth and no prediction are
left out of means (NaN in per-class arrays).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.store import MASK_NODATA  # the mask format's nodata value, one home

__all__ = [
    "ratio_or_nan",
    "mean_of_defined",
    "MASK_NODATA",
    "PROBABILITY_LEVELS",
    "confusion_matrix",
    "class_indices",
    "prediction_indices",
    "boundary_counts",
    "trimap_confusions",
    "probability_histograms",
    "SegmentationMetrics",
    "segmentation_metrics",
    "boundary_iou",
    "trimap_iou",
    "PRCurve",
    "pr_curve",
    "SceneScores",
    "scene_scores",
]

PROBABILITY_LEVELS = 256  # stored probabilities are uint8: p = q / 255


def confusion_matrix(
    truth: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    truth_nodata: int | float | None = None,
) -> np.ndarray:
    """(C, C) int64 confusion matrix of two equally shaped class maps.

    Pixels whose truth is ``ignore_index``, ``truth_nodata`` or outside
    ``[0, C)``, or whose prediction is the mask nodata (255) or outside
    ``[0, C)``, count nowhere.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    t = np.asarray(truth).ravel()
    p = np.asarray(pred).ravel()
    keep = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    if truth_nodata is not None and not (isinstance(truth_nodata, float) and np.isnan(truth_nodata)):
        keep &= t != truth_nodata
    t = t[keep].astype(np.int64)
    p = p[keep].astype(np.int64)
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def ratio_or_nan(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den in float64, NaN where den is 0 (a class with nothing to score is left out of means, not 0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def mean_of_defined(values: np.ndarray) -> float:
    """The mean over the values that are not NaN; NaN when none is."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass(frozen=True)
class SegmentationMetrics:
    """Every confusion-matrix metric of one scene (or one chunk, or a run)."""

    confusion: np.ndarray
    pixel_accuracy: float
    class_accuracy: np.ndarray
    mean_accuracy: float
    iou: np.ndarray
    mean_iou: float
    dice: np.ndarray
    mean_dice: float
    frequency_weighted_iou: float
    precision: np.ndarray
    recall: np.ndarray
    mean_precision: float
    mean_recall: float
    kappa: float

    @property
    def valid_pixels(self) -> int:
        return int(self.confusion.sum())

    def scalars(self) -> dict[str, float]:
        """The scalar metrics by name, as stored in the reports."""
        return {
            "pixel_accuracy": self.pixel_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "mean_iou": self.mean_iou,
            "mean_dice": self.mean_dice,
            "frequency_weighted_iou": self.frequency_weighted_iou,
            "mean_precision": self.mean_precision,
            "mean_recall": self.mean_recall,
            "kappa": self.kappa,
        }


def segmentation_metrics(confusion: np.ndarray) -> SegmentationMetrics:
    """All metrics of a (C, C) confusion matrix (textbook definitions; the README lists them)."""
    m = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(m)
    truth = m.sum(axis=1)
    pred = m.sum(axis=0)
    total = int(m.sum())
    present = (truth + pred) > 0
    iou = ratio_or_nan(tp, truth + pred - tp)
    dice = ratio_or_nan(2 * tp, truth + pred)
    iou[~present] = np.nan
    dice[~present] = np.nan
    recall = ratio_or_nan(tp, truth)
    precision = ratio_or_nan(tp, pred)
    if total:
        pixel_accuracy = float(tp.sum() / total)
        freq = truth / total
        fw_iou = float(np.sum(freq[present] * np.nan_to_num(iou[present])))
        chance = float(np.sum(truth.astype(np.float64) * pred) / (float(total) ** 2))
        kappa = float((pixel_accuracy - chance) / (1.0 - chance)) if chance < 1.0 else float("nan")
    else:
        pixel_accuracy = fw_iou = kappa = float("nan")
    return SegmentationMetrics(
        confusion=m,
        pixel_accuracy=pixel_accuracy,
        class_accuracy=recall,
        mean_accuracy=mean_of_defined(recall),
        iou=iou,
        mean_iou=mean_of_defined(iou),
        dice=dice,
        mean_dice=mean_of_defined(dice),
        frequency_weighted_iou=fw_iou,
        precision=precision,
        recall=recall,
        mean_precision=mean_of_defined(precision),
        mean_recall=mean_of_defined(recall),
        kappa=kappa,
    )


def class_indices(
    labels: np.ndarray, num_classes: int, *, ignore_index: int | None = 255, label_values: list[int] | None = None
) -> np.ndarray:
    """Truth class index per pixel (int16); -1 where the pixel is no class.

    ``label_values[i]`` is the label value of class i (default: the value is the
    index). Nodata (read as -1), ``ignore_index`` and values outside the class
    list are no class, so they count nowhere.
    """
    raw = np.asarray(labels).astype(np.int64, copy=False)
    out = np.full(raw.shape, -1, dtype=np.int16)
    if label_values is None:
        keep = (raw >= 0) & (raw < num_classes)
        out[keep] = raw[keep]
    else:
        for index, value in enumerate(label_values):
            out[raw == value] = index
    if ignore_index is not None:
        out[raw == ignore_index] = -1
    return out


def prediction_indices(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Predicted class index per pixel (int16); -1 for the mask nodata and values outside the class list."""
    p = np.asarray(pred).astype(np.int16)
    p[(p < 0) | (p >= num_classes)] = -1
    return p


def _valid(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return (truth >= 0) & (pred >= 0)


def boundary_counts(
    truth: np.ndarray, pred: np.ndarray, truth_band: np.ndarray, pred_band: np.ndarray, num_classes: int
) -> np.ndarray:
    """(3, C) int64: per class |Gb|, |Pb| and |Gb & Pb| over pixels where truth and prediction are classes.

    ``truth``/``pred`` are class indices (-1: no class); Gb of class c is the
    truth band's pixels of class c, Pb the prediction band's pixels of class c.
    """
    valid = _valid(truth, pred)
    g = truth_band & valid
    q = pred_band & valid
    gt = np.bincount(truth[g].astype(np.int64), minlength=num_classes)[:num_classes]
    pr = np.bincount(pred[q].astype(np.int64), minlength=num_classes)[:num_classes]
    both = g & q & (truth == pred)
    inter = np.bincount(truth[both].astype(np.int64), minlength=num_classes)[:num_classes]
    return np.stack([gt, pr, inter]).astype(np.int64)


def trimap_confusions(truth: np.ndarray, pred: np.ndarray, distance: np.ndarray, num_classes: int, max_width: int) -> np.ndarray:
    """(N, C, C) int64: the confusion matrix over the trimap band of each width 1..N.

    ``distance`` is the smallest band width holding each pixel (0: none within N).
    """
    c = num_classes
    keep = _valid(truth, pred) & (distance > 0)
    idx = (distance[keep].astype(np.int64) - 1) * c * c + truth[keep].astype(np.int64) * c + pred[keep]
    exact = np.bincount(idx, minlength=max_width * c * c).reshape(max_width, c, c)
    return np.cumsum(exact, axis=0).astype(np.int64)


def probability_histograms(truth: np.ndarray, pred: np.ndarray, probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """(2, C, 256) int64: per class, histograms of its stored probability (uint8) over its truth pixels (0) and others (1).

    Pixels count where truth and prediction are classes, as in the confusion matrix.
    """
    valid = _valid(truth, pred)
    t = truth[valid]
    hist = np.zeros((2, num_classes, PROBABILITY_LEVELS), dtype=np.int64)
    for c in range(num_classes):
        q = probabilities[c][valid]
        every = np.bincount(q, minlength=PROBABILITY_LEVELS)
        hist[0, c] = np.bincount(q[t == c], minlength=PROBABILITY_LEVELS)
        hist[1, c] = every - hist[0, c]
    return hist


def boundary_iou(counts: np.ndarray) -> np.ndarray:
    """Per-class boundary IoU |Gb & Pb| / |Gb | Pb| from (3, C) counts; NaN where both bands are empty."""
    gt, pr, inter = (np.asarray(counts, dtype=np.int64)[i] for i in range(3))
    return ratio_or_nan(inter, gt + pr - inter)


def trimap_iou(confusions: np.ndarray) -> np.ndarray:
    """(N, C) per-class IoU inside the trimap band of each width."""
    return np.stack([segmentation_metrics(m).iou for m in np.asarray(confusions)]) if len(confusions) else np.zeros((0, 0))


@dataclass(frozen=True)
class PRCurve:
    """One class's precision-recall curve over the stored probability levels, and its average precision."""

    thresholds: np.ndarray  # descending, one per level that holds a pixel
    precision: np.ndarray
    recall: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    average_precision: float


def pr_curve(positive: np.ndarray, negative: np.ndarray) -> PRCurve:
    """PR curve and AP from histograms of scores (uint8 levels) over positives and negatives.

    A pixel is called positive when its level is >= the threshold. AP is the
    step-wise sum over thresholds of (R_k - R_{k-1}) * P_k (no interpolation),
    the same as over the sorted raw scores with ties grouped; NaN with no positive.
    """
    pos = np.asarray(positive, dtype=np.int64)[::-1]
    neg = np.asarray(negative, dtype=np.int64)[::-1]
    levels = np.arange(len(pos) - 1, -1, -1)
    held = (pos + neg) > 0
    tp = np.cumsum(pos)[held]
    fp = np.cumsum(neg)[held]
    thresholds = levels[held] / (len(pos) - 1)
    total = int(pos.sum())
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / total if total else np.full(tp.shape, np.nan)
    if total:
        steps = np.diff(np.concatenate([[0.0], recall]))
        ap = float(np.sum(steps * precision))
    else:
        ap = float("nan")
    return PRCurve(thresholds, precision, recall, tp, fp, ap)


@dataclass(frozen=True)
class SceneScores:
    """Every metric of one scene (or of pooled scenes), from its exact integer counts."""

    metrics: SegmentationMetrics
    boundary_counts: np.ndarray | None  # (3, C)
    boundary_iou: np.ndarray | None  # (C,)
    mean_boundary_iou: float
    trimap_iou: np.ndarray | None  # (N, C): width k+1 in row k
    trimap_miou: np.ndarray | None  # (N,)
    curves: list[PRCurve] | None  # one per class, with probabilities
    average_precision: np.ndarray | None  # (C,)
    mean_average_precision: float


def scene_scores(
    confusion: np.ndarray,
    boundary: np.ndarray | None = None,
    trimap: np.ndarray | None = None,
    histograms: np.ndarray | None = None,
) -> SceneScores:
    """Metrics from counts: confusion (C, C), boundary (3, C), trimap (N, C, C), histograms (2, C, 256)."""
    metrics = segmentation_metrics(confusion)
    b_iou = boundary_iou(boundary) if boundary is not None else None
    t_iou = trimap_iou(trimap) if trimap is not None else None
    t_miou = np.array([mean_of_defined(row) for row in t_iou]) if t_iou is not None else None
    curves = ap = None
    if histograms is not None:
        curves = [pr_curve(histograms[0, c], histograms[1, c]) for c in range(histograms.shape[1])]
        ap = np.array([c.average_precision for c in curves])
    return SceneScores(
        metrics, None if boundary is None else np.asarray(boundary, dtype=np.int64), b_iou,
        mean_of_defined(b_iou) if b_iou is not None else float("nan"), t_iou, t_miou, curves, ap,
        mean_of_defined(ap) if ap is not None else float("nan"),
    )
