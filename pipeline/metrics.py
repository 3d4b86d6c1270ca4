"""Segmentation metrics from integer confusion matrices.

M[i, j] counts pixels of truth class i predicted as class j. Matrices are
int64 counts, so summing them over chunks in any order gives exactly the
whole-scene matrix, and every metric below is then exactly the whole-scene
value (DESIGN.md, invariant 7). Classes with no truth and no prediction are
left out of means (NaN in per-class arrays).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MASK_NODATA", "confusion_matrix", "SegmentationMetrics", "segmentation_metrics"]

MASK_NODATA = 255


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


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
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
    """All metrics of a (C, C) confusion matrix (textbook definitions, see DESIGN.md)."""
    m = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(m)
    truth = m.sum(axis=1)
    pred = m.sum(axis=0)
    total = int(m.sum())
    present = (truth + pred) > 0
    iou = _ratio(tp, truth + pred - tp)
    dice = _ratio(2 * tp, truth + pred)
    iou[~present] = np.nan
    dice[~present] = np.nan
    recall = _ratio(tp, truth)
    precision = _ratio(tp, pred)
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
        mean_accuracy=_nanmean(recall),
        iou=iou,
        mean_iou=_nanmean(iou),
        dice=dice,
        mean_dice=_nanmean(dice),
        frequency_weighted_iou=fw_iou,
        precision=precision,
        recall=recall,
        mean_precision=_nanmean(precision),
        mean_recall=_nanmean(recall),
        kappa=kappa,
    )
