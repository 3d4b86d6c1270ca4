"""Printing a job's results: per-class IoU, mean IoU, accuracy, throughput, and where outputs are."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

__all__ = ["print_job_summary", "print_metrics"]

_out = Console(soft_wrap=True)  # long paths stay on one line, copyable


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def print_metrics(title: str, class_names: list[str], metrics) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("class", "IoU", "Dice", "precision", "recall", "truth px", "predicted px"):
        table.add_column(col, justify="left" if col == "class" else "right")
    m = metrics.confusion
    for i, name in enumerate(class_names):
        table.add_row(
            name, _fmt(metrics.iou[i]), _fmt(metrics.dice[i]), _fmt(metrics.precision[i]), _fmt(metrics.recall[i]),
            f"{int(m[i].sum()):,}", f"{int(m[:, i].sum()):,}",
        )
    _out.print(table)
    _out.print(
        f"mean IoU [bold]{_fmt(metrics.mean_iou)}[/]  pixel accuracy {_fmt(metrics.pixel_accuracy)}  "
        f"mean accuracy {_fmt(metrics.mean_accuracy)}  macro Dice {_fmt(metrics.mean_dice)}  "
        f"FW IoU {_fmt(metrics.frequency_weighted_iou)}  kappa {_fmt(metrics.kappa)}"
    )


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
            print_metrics(f"{s.name}: per-class metrics", names, s.metrics)
        _out.print(
            f"throughput {s.megapixels_per_second:.2f} Mpx/s (segmentation {s.predict_seconds:.1f} s, "
            f"total with evaluation {s.seconds:.1f} s)"
        )
        _out.print(f"mask:    {s.mask}")
    _out.print(f"reports: {result.layout.reports}  (job id {result.job_id}; query with `satseg query \"SELECT * FROM scenes\" --reports {result.layout.reports}`)")
