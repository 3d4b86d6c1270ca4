"""Printing a job's results: per-class IoU, mean IoU, accuracy, throughput, and where outputs are."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

__all__ = ["print_job_summary", "print_metrics"]

_out = Console(soft_wrap=True)  # long paths stay on one line, copyable


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def print_metrics(title: str, class_names: list[str], metrics, scores=None) -> None:
    """Per-class table and scalar metrics; ``scores`` (SceneScores) adds boundary IoU, AP and the trimap."""
    boundary = scores.boundary_iou if scores is not None else None
    ap = scores.average_precision if scores is not None else None
    table = Table(title=title, title_justify="left")
    cols = ["class", "IoU", "Dice", "precision", "recall"]
    cols += ["boundary IoU"] if boundary is not None else []
    cols += ["AP"] if ap is not None else []
    for col in (*cols, "truth px", "predicted px"):
        table.add_column(col, justify="left" if col == "class" else "right")
    m = metrics.confusion
    for i, name in enumerate(class_names):
        extra = ([_fmt(boundary[i])] if boundary is not None else []) + ([_fmt(ap[i])] if ap is not None else [])
        table.add_row(
            name, _fmt(metrics.iou[i]), _fmt(metrics.dice[i]), _fmt(metrics.precision[i]), _fmt(metrics.recall[i]),
            *extra, f"{int(m[i].sum()):,}", f"{int(m[:, i].sum()):,}",
        )
    _out.print(table)
    _out.print(
        f"mean IoU [bold]{_fmt(metrics.mean_iou)}[/]  pixel accuracy {_fmt(metrics.pixel_accuracy)}  "
        f"mean accuracy {_fmt(metrics.mean_accuracy)}  macro Dice {_fmt(metrics.mean_dice)}  "
        f"FW IoU {_fmt(metrics.frequency_weighted_iou)}  kappa {_fmt(metrics.kappa)}"
    )
    if scores is not None and scores.boundary_iou is not None:
        line = f"mean boundary IoU {_fmt(scores.mean_boundary_iou)}"
        if scores.average_precision is not None:
            line += f"  mAP {_fmt(scores.mean_average_precision)}"
        if scores.trimap_miou is not None and len(scores.trimap_miou):
            t = scores.trimap_miou
            line += f"  trimap mIoU {_fmt(t[0])} at 1 px .. {_fmt(t[-1])} at {len(t)} px"
        _out.print(line)


def print_job_summary(result) -> None:
    names = result.model.class_names
    for s in result.scenes:
        head = f"scene {s.name}: {s.info.height}x{s.info.width} px"
        if s.resumed_whole:
            head += " (finished by an earlier run; not recomputed)"
        elif s.chunks_resumed:
            head += f" (resumed: {s.chunks_resumed} of {s.chunks_total} chunks were already done)"
        _out.print(f"[bold]{head}[/]")
        if s.metrics is not None:
            print_metrics(f"{s.name}: per-class metrics", names, s.metrics, s.scores)
        over = f" over the {s.chunks_total - s.chunks_resumed} chunks computed now" if s.chunks_resumed else ""
        _out.print(
            f"throughput {s.megapixels_per_second:.2f} Mpx/s{over} (segmentation {s.predict_seconds:.1f} s, "
            f"total with evaluation {s.seconds:.1f} s)"
        )
        if s.nodata_collisions:
            _out.print(
                f"[yellow]warning:[/] {s.nodata_collisions} input pixels hold data (per GDAL's dataset mask) although a "
                "band equals its nodata value; they were segmented as data. If they are meant as nodata, give the "
                "image a per-dataset mask or an alpha band"
            )
        _out.print(f"mask:    {s.mask}")
    _out.print(f"reports: {result.layout.reports}  (job id {result.job_id}; query with `satseg query \"SELECT * FROM scenes\" --reports {result.layout.reports}`)")
