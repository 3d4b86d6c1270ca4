"""The report's plots as PNG bytes: matplotlib figures (Agg, no pyplot state), arrays in, bytes out."""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from pipeline.palette import class_colours

__all__ = ["png", "confusion_png", "class_bars_png", "pr_curves_png", "pr_zoom", "trimap_png", "training_png"]

_DPI = 100


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def png(rgb: np.ndarray, *, photo: bool = False) -> bytes:
    """A uint8 (h, w, 3) array as PNG bytes.

    Exact, pixel for pixel, by default (a palette PNG when at most 256 colours occur). ``photo``
    views (imagery, overlays on it) may take a 256-colour median-cut palette instead: about a
    third of the size, and plenty for a quicklook.
    """
    from PIL import Image

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    keys = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    codes, index = np.unique(keys, return_inverse=True)
    if len(codes) <= 256:
        img = Image.fromarray(index.reshape(rgb.shape[:2]).astype(np.uint8), mode="P")
        img.putpalette(np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.uint8).ravel().tolist())
    elif photo:
        img = Image.fromarray(rgb, mode="RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    else:
        img = Image.fromarray(rgb, mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _colour(i: int, n: int) -> tuple[float, float, float]:
    return tuple(float(v) / 255 for v in class_colours(n)[i])


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def confusion_png(confusion: np.ndarray, names: list[str]) -> bytes:
    """Row-normalised confusion heatmap in percent (rows: truth; cells and colour bar alike); rows without truth stay blank."""
    c = len(names)
    counts = np.asarray(confusion, dtype=np.float64).reshape(c, c)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(totals > 0, counts / totals, np.nan)
    side = min(12.0, 2.4 + 0.55 * c)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    cmap = _cmap("Blues").with_extremes(bad="#eeeeee")
    percent = 100 * norm  # the cells' numbers and the colour bar in one unit
    im = ax.imshow(np.ma.masked_invalid(percent), cmap=cmap, vmin=0.0, vmax=100.0, interpolation="nearest")
    ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(c), names, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 15:
        for i in range(c):
            for j in range(c):
                if not math.isnan(percent[i, j]):
                    ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if percent[i, j] > 60 else "#222222")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of the true class's pixels")
    return _save(fig)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].copy()


def class_bars_png(names: list[str], series: dict[str, Sequence[float | None]]) -> bytes:
    """Grouped bars per class, one bar per metric in ``series`` (missing values leave a gap)."""
    c = len(names)
    k = max(1, len(series))
    fig = _figure(min(14.0, 2.5 + 0.5 * c * k), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / k
    x = np.arange(c)
    shades = ["#1f4e79", "#5b9bd5", "#f4b183", "#a9d18e"]
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, np.nan_to_num(_finite(values), nan=0.0), width, label=label,
               color=shades[i % len(shades)])
    ax.set_xticks(x, names, rotation=30 if c > 6 else 0, ha="right" if c > 6 else "center", fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=k, loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    return _save(fig)


PR_ZOOM_FROM = 0.5
"""A zoomed PR view starting below this would show most of the unit square anyway: precision below it, one panel."""


def _nice_floor(value: float) -> float:
    step = 0.01 if value >= 0.9 else 0.05
    return max(0.0, math.floor(value / step + 1e-9) * step)


def pr_zoom(curves: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float] | None:
    """(recall from, precision from) of a view on where good curves bend, or None when they do not crowd the top.

    Around each class's best-F1 point: from the lowest such precision over the classes, less twice its distance
    to 1, so every knee sits well inside the view; the same for recall (or from 0 when that is below
    `PR_ZOOM_FROM`); rounded down to a hundredth (a twentieth below 0.9), and never narrower than 0.05.
    """
    best_r, best_p = [], []
    for recall, precision in curves.values():
        ok = np.isfinite(recall) & np.isfinite(precision)
        if not ok.any():
            continue
        r, p = recall[ok], precision[ok]
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(r + p > 0, 2 * r * p / (r + p), 0.0)
        k = int(np.argmax(f1))
        best_r.append(r[k])
        best_p.append(p[k])
    if not best_r:
        return None
    lo_r, lo_p = (min(0.95, _nice_floor(min(v) - 2 * (1 - min(v)))) for v in (best_r, best_p))
    if lo_p < PR_ZOOM_FROM:
        return None
    return (lo_r if lo_r >= PR_ZOOM_FROM else 0.0), lo_p


def _pr_axes(ax, curves, names, ap, labels: bool) -> None:
    for i, (recall, precision) in sorted(curves.items()):
        score = ap[i] if i < len(ap) else None
        label = f"{names[i]} (AP {score:.3f})" if score is not None and not math.isnan(score) else names[i]
        ax.plot(recall, precision, color=_colour(i, len(names)), lw=1.6, label=label if labels else None)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)


def pr_curves_png(curves: dict[int, tuple[np.ndarray, np.ndarray]], names: list[str], ap: Sequence[float | None]) -> bytes:
    """Precision against recall per class, labelled with each class's AP: the unit square, and beside it, when the
    curves crowd a corner of it (good models), a view zoomed on where they bend (`pr_zoom`)."""
    zoom = pr_zoom(curves)
    fig = _figure(11.0 if zoom else 6.0, 4.6)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    _pr_axes(axes[0], curves, names, ap, labels=True)
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8, loc="lower left")
    if zoom:
        r0, p0 = zoom
        from matplotlib.patches import Rectangle

        axes[0].add_patch(Rectangle((r0, p0), 1 - r0, 1.0 - p0, fill=False, ls="--", lw=1.0, ec="#555555"))
        axes[0].set_title("whole range", fontsize=10)
        _pr_axes(axes[1], curves, names, ap, labels=False)
        axes[1].set_xlim(r0, 1.0 + (1 - r0) * 0.01)
        axes[1].set_ylim(p0, 1.0 + (1 - p0) * 0.02)
        axes[1].set_title(f"zoomed: recall {r0:.2f}–1, precision {p0:.2f}–1", fontsize=10)
    return _save(fig)


def training_png(loss: Sequence[float | None], validation: Sequence[float | None], best_epoch: int | None) -> bytes:
    """Training loss and validation mean IoU per epoch, side by side; the kept (best) epoch marked."""
    fig = _figure(10.0, 3.6)
    left, right = fig.subplots(1, 2)
    for ax, values, label, colour in ((left, loss, "training loss (mean over the epoch)", "#1f4e79"),
                                      (right, validation, "validation mean IoU", "#c55a11")):
        v = _finite(values)
        if v.size:
            ax.plot(np.arange(1, v.size + 1), v, color=colour, lw=1.8, marker="o", ms=3)
            if best_epoch and 1 <= best_epoch <= v.size:
                ax.axvline(best_epoch, color="#555555", ls="--", lw=1.0)
                ax.annotate(f"kept: epoch {best_epoch}", (best_epoch, v[best_epoch - 1]), textcoords="offset points",
                            xytext=(6, 8), fontsize=8)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#888888")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig)


def trimap_png(miou: Sequence[float | None], per_class: dict[int, Sequence[float | None]], names: list[str]) -> bytes:
    """Trimap IoU against band width: the mean (thick) and each class (thin)."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for i, values in sorted(per_class.items()):
        v = _finite(values)
        ax.plot(np.arange(1, len(v) + 1), v, color=_colour(i, len(names)), lw=1.0, alpha=0.8, label=names[i])
    m = _finite(miou)
    ax.plot(np.arange(1, len(m) + 1), m, color="black", lw=2.4, marker="o", ms=3, label="mean")
    ax.set_xlabel("band width around the true boundary (pixels)")
    ax.set_ylabel("trimap IoU")
    ax.set_ylim(0, 1)
    ax.set_xlim(0.5, max(len(m), 1) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2, loc="lower right")
    return _save(fig)
