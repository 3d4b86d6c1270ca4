"""`satseg report`: one self-contained HTML page of a run, readable offline.

Reads the run's Parquet reports (classes, scenes, curves, aggregates), its
mask stores, the scenes' rasters and its checkpoint, and writes a page with,
per scene: image, labels, prediction and errors side by side (same extent,
same samples, one legend), TP/FP/FN maps per class, the confusion matrix in
percent of each true class, per-class IoU/Dice/boundary IoU bars, PR curves
(with a view zoomed on where they bend), the trimap curve, and the worst
tiles: the job's tile-size windows with the most wrong pixels, counted at
full resolution; and for the run: throughput, micro/macro aggregates and
the checkpoint's training curves. Every image is an embedded PNG data URI;
no CSS, script or font comes from elsewhere. `pipeline.report_compare`
puts two runs on one page.

Views are read decimated (see :mod:`pipeline.quicklook`) and the worst-tile
count reads a bounded block at a time, so a report of a scene of any size
needs little memory. A metric the run did not compute (no labels, no saved
probabilities, reports older than schema 2) gets a one-line "not computed"
note instead of its plot.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline import __version__
from pipeline.core.geometry import Window
from pipeline.core.metrics import MASK_NODATA, confusion_matrix, segmentation_metrics
from pipeline.palette import mask_colours
from pipeline.quicklook import (
    FN_COLOUR,
    FP_COLOUR,
    TN_COLOUR,
    TP_COLOUR,
    UNSCORED_COLOUR,
    WRONG_COLOUR,
    class_error_rgb,
    display_shape,
    error_rgb,
    label_lookup,
    mask_rgb,
    read_image_rgb,
    read_labels,
    read_mask_raster,
    read_mask_samples,
    sample_positions,
)
from pipeline.report_figures import class_bars_png, confusion_png, png, pr_curves_png, pr_zoom, training_png, trimap_png
from pipeline.report_objects import objects_section
from pipeline.job_folder import read_job_record
from schemas.errors import CheckpointError, InputFileError, SpecError
from schemas.store import OutputLayout, replacing

__all__ = ["SECTIONS", "RUN_SECTIONS", "QUICKLOOK_SIDE", "WORST_TILES", "RunTables", "load_run", "render_report", "write_report"]

SECTIONS = ("quicklook", "metrics", "confusion", "class-metrics", "pr-curves", "trimap", "worst-tiles")
"""Sections every scene gets (``data-section`` attribute), in page order."""

RUN_SECTIONS = ("throughput", "aggregates", "training")
"""Sections of the run as a whole."""

QUICKLOOK_SIDE = 900
CLASS_MAP_SIDE = 300
THUMB_SIDE = 200
MIN_TILE_VIEW = 48
WORST_TILES = 6
DEFAULT_TILE_SIDE = 512
"""Worst-tile windows of runs that record no tile size (`satseg evaluate`)."""
TILE_BLOCK_PIXELS = 1 << 22
"""Pixels the worst-tile count reads at a time: memory stays bounded (about 60 MB) for any scene size."""
MAX_CLASS_MAPS = 12


@dataclass
class RunTables:
    """What the report reads: one job's rows of the scenes, classes, curves and aggregates tables, by scene."""

    run_dir: Path
    job_id: str
    spec: dict | None
    scenes: list[dict]
    classes: dict[str, list[dict]] = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    aggregates: list[dict] = field(default_factory=list)


def _read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


def _which_job(run_dir: Path, reports: Path, job_id: str | None) -> str:
    """The job to report: the one asked for, else the one job.json names, else the only one with reports."""
    found = sorted(p.name.split("=", 1)[1] for p in (reports / "scenes").glob("job_id=*") if p.is_dir())
    if job_id is not None:
        if job_id not in found:
            raise SpecError(f"{run_dir}: no reports of job {job_id}; jobs here: {', '.join(found) or 'none'}")
        return job_id
    recorded = (read_job_record(run_dir) or {}).get("job_id")
    if recorded in found:
        return recorded
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputFileError(f"{run_dir}: no scene reports under reports/scenes/; run a job with --out {run_dir} first")
    raise SpecError(f"{run_dir}: reports of several jobs ({', '.join(found)}); choose one with --job")


def load_run(run_dir: str | Path, job_id: str | None = None) -> RunTables:
    """The report tables of one job in ``run_dir`` (a job's --out folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputFileError(f"{run_dir}: run folder not found; give the --out folder of a satseg job")
    layout = OutputLayout(run_dir)
    if not (layout.reports / "scenes").is_dir():
        raise InputFileError(f"{run_dir}: no reports/scenes/ here; give the --out folder of a finished satseg job")
    job = _which_job(run_dir, layout.reports, job_id)
    record = read_job_record(run_dir) or {}
    spec = record.get("spec") if record.get("job_id") == job else None
    scene_files = sorted((layout.reports / "scenes" / f"job_id={job}").glob("*.parquet"))
    scenes = [row for f in scene_files for row in _read_rows(f)]
    if not scenes:
        raise InputFileError(f"{run_dir}: job {job} has no scene reports yet; let the job finish, then report")
    tables = RunTables(run_dir, job, spec, sorted(scenes, key=lambda r: r["scene"]))
    for row in tables.scenes:
        name = row["scene"]
        for table in ("classes", "curves"):
            getattr(tables, table)[name] = _read_rows(layout.report_file(table, job, name))
    tables.aggregates = _read_rows(layout.reports / "aggregates" / f"job_id={job}" / "job.parquet")
    return tables


# ---- small HTML pieces (pure) ------------------------------------------------------------------------------


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "scene"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value, digits: int = 3) -> str:
    if _missing(value):
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _img(data: bytes, alt: str, cls: str = "") -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img class="{cls}" alt="{_esc(alt)}" src="{uri}">'


def _figure(data: bytes, alt: str, caption: str, cls: str = "") -> str:
    return f"<figure>{_img(data, alt, cls)}<figcaption>{caption}</figcaption></figure>"


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _table(headers: Iterable[str], rows: Iterable[Iterable], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(scene_slug: str | None, name: str, title: str, body: str) -> str:
    ident = f"{scene_slug}-{name}" if scene_slug else name
    return f'<section class="panel" id="{_esc(ident)}" data-section="{name}"><h3>{_esc(title)}</h3>{body}</section>'


def _swatches(items: list[tuple[str, tuple[int, int, int]]]) -> str:
    spans = "".join(
        f'<span class="swatch"><i style="background: rgb{tuple(int(v) for v in rgb)}"></i>{_esc(label)}</span>'
        for label, rgb in items
    )
    return f'<div class="legend">{spans}</div>'


# ---- per-scene views (decimated reads) ---------------------------------------------------------------------


@dataclass(frozen=True)
class _SceneContext:
    name: str
    row: dict
    class_names: list[str]
    store: Path | None
    image: str | Path | None  # as the job read it: a local file, a remote or virtual path, a STAC item's VRT text
    labels: str | Path | None
    lookup: np.ndarray
    ignore_index: int | None
    unreadable: dict = field(default_factory=dict)  # role -> why it could not be read (one line)


def _existing(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).exists() else None


def _stac_bands(spec: dict | None, scene: str) -> list[str] | None:
    """The bands a scene's image (a STAC item) was stacked from, as its job says; None for any other image."""
    from pydantic import ValidationError

    from schemas.job import JobSpec

    try:
        job = JobSpec.model_validate(spec or {})
    except ValidationError:
        return None
    return next((s.stac_bands for s in job.scenes if s.scene_name == scene), None)


def _raster(path: str | None, role: str, unreadable: dict, stac_bands: list[str] | None = None) -> str | Path | None:
    """Where the report reads a recorded raster: a local file that exists, a remote or virtual path as written (read
    when drawn, as the job read it), or a STAC item's bands stacked as VRT text; None (and why, in ``unreadable``)."""
    from schemas.errors import SatsegError
    from schemas.rasters import gdal_path
    from workers.reader import open_scene

    if not path:
        return None
    if stac_bands:
        try:
            return open_scene(path, role=role, stac_bands=stac_bands).source
        except SatsegError as err:
            unreadable[role] = str(err)
            return None
    return path if gdal_path(path) is not None else _existing(path)


def _scene_context(tables: RunTables, row: dict) -> _SceneContext:
    names = list(row.get("class_names") or [])
    store = _existing(row.get("mask")) or _existing(str(OutputLayout(tables.run_dir).mask_store(row["scene"])))
    spec = tables.spec or {}
    classes = spec.get("classes")
    values = row.get("label_values") or ([int(v) for v in classes] if isinstance(classes, dict) else None)
    ignore = row["ignore_index"] if row.get("ignore_index") is not None else spec.get("ignore_index", 255)
    unreadable: dict = {}
    image = _raster(row.get("image"), "image", unreadable, _stac_bands(tables.spec, row["scene"]))
    return _SceneContext(
        row["scene"], row, names, store, image, _raster(row.get("labels"), "labels", unreadable),
        label_lookup(values, len(names)), ignore, unreadable,
    )


def _mask_samples(store: Path, rows: np.ndarray, cols: np.ndarray, out: tuple[int, int], window: Window) -> np.ndarray:
    """Full-resolution mask pixels at the view's samples, from a Zarr store or a GeoTIFF (``evaluate`` runs)."""
    if not store.is_dir():
        return read_mask_raster(store, out, window)
    from workers.mask_store import zarr_mask

    return read_mask_samples(zarr_mask(store)[0], rows, cols)


def _as_indices(ctx: _SceneContext, samples: np.ndarray) -> np.ndarray:
    """Mask samples as class indices (255: none): a foreign mask evaluated with a mapping holds label values."""
    if not ctx.row.get("mask_label_values"):
        return samples
    idx = ctx.lookup[np.clip(samples.astype(np.int64), 0, ctx.lookup.size - 1)]
    return np.where(idx < 0, MASK_NODATA, idx).astype(np.uint8)


def _prediction_source(store: Path, display_side: int):
    """The array a prediction view without labels samples: the coarsest overview level still at least the display size."""
    import zarr

    from pipeline.overviews import OverviewLevel, level_for_size, read_overview_levels
    from workers.mask_store import NO_TRANSFORM, is_mask_store, zarr_mask

    if not is_mask_store(store):  # a foreign Zarr mask (`satseg evaluate`): no overviews
        arr = zarr_mask(store)[0]
        return arr, OverviewLevel(0, "", tuple(arr.shape), 1, NO_TRANSFORM)
    level = level_for_size(read_overview_levels(store), display_side)
    return zarr.open_array(str(store), path=level.path, mode="r"), level


def _class_rgb(classes: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class colours of class indexes (255 or -1: no class, white, as the legend says)."""
    rgb, has = mask_rgb(np.where((classes >= 0) & (classes < len(colours)), classes, MASK_NODATA).astype(np.uint8), colours)
    rgb[~has] = 255
    return rgb


def _views(ctx: _SceneContext, window: Window, side: int, *, overview: bool) -> dict:
    """Image, labels, prediction and error map of ``window`` at most ``side`` pixels wide, as RGB arrays.

    All four are the same nearest samples, so they line up pixel for pixel. Without labels the prediction
    may come from an overview level (``overview``): no full-resolution read is needed then.
    """
    out = display_shape(window.height, window.width, side)
    rows = sample_positions(window.row_off, window.height, out[0])
    cols = sample_positions(window.col_off, window.width, out[1])
    c = len(ctx.class_names)
    views: dict = {"shape": out}
    if ctx.image is not None and "image" not in ctx.unreadable:
        try:
            views["image"], _ = read_image_rgb(ctx.image, out, window)
        except InputFileError as err:  # a remote image out of reach now: the report goes on without it
            ctx.unreadable["image"] = str(err)
    if ctx.store is None:
        return views
    colours = mask_colours(ctx.class_names, ctx.store)
    truth = None
    if ctx.labels is not None and "labels" not in ctx.unreadable:
        try:
            truth = read_labels(ctx.labels, out, ctx.lookup, ctx.ignore_index, window)
        except InputFileError as err:
            ctx.unreadable["labels"] = str(err)
    if truth is None and overview and ctx.store.is_dir():
        arr, level = _prediction_source(ctx.store, max(out))
        views["level"] = level
        pred = _as_indices(ctx, read_mask_samples(arr, rows, cols, level.factor))
    else:
        pred = _as_indices(ctx, _mask_samples(ctx.store, rows, cols, out, window))
    views["pred"], views["prediction"] = pred, _class_rgb(pred, colours)
    if truth is not None:
        views["truth"], views["labels"] = truth, _class_rgb(truth, colours)
        views["error"] = error_rgb(truth, pred, c)
    return views


def _class_legend(names: list[str], mask: Path | None) -> str:
    colours = mask_colours(names, mask)  # the colours the mask carries (the job's), as in the panels
    return _swatches([(n, tuple(colours[i])) for i, n in enumerate(names)] + [("nodata: no class colour", (255, 255, 255))])


_ERROR_LEGEND = [
    ("correct class (TP)", TP_COLOUR),
    ("wrong class (FP of the predicted, FN of the true class)", WRONG_COLOUR),
    ("not scored (no label, ignored, nodata)", UNSCORED_COLOUR),
]


PANELS = (("image", "image"), ("labels", "labels"), ("prediction", "prediction"), ("error", "errors"))
"""The views shown side by side, same extent and samples: key in `_views`, caption."""


def _panels(ctx: _SceneContext, views: dict, cls: str = "") -> str:
    """The scene's views side by side, with alt texts ``<scene> <caption>``."""
    figs = []
    for key, caption in PANELS:
        if key in views:
            text = {"image": "image (2–98 % stretch)", "error": "errors: right (TP) / wrong class"}.get(key, caption)
            if key == "prediction" and views.get("level") is not None and views["level"].level:
                text += f" (overview level {views['level'].level}, 1/{views['level'].factor})"
            figs.append(_figure(png(views[key], photo=key == "image"), f"{ctx.name} {caption}", _esc(text), cls))
    return f'<div class="panels">{"".join(figs)}</div>'


def _quicklook(ctx: _SceneContext, slug: str) -> str:
    h, w = int(ctx.row["height"]), int(ctx.row["width"])
    whole = Window(0, 0, h, w)
    if ctx.store is None:
        return _section(slug, "quicklook", "Image, labels, prediction, errors", _note(f"not available: the mask of {ctx.name} was not found"))
    views = _views(ctx, whole, QUICKLOOK_SIDE, overview=True)
    notes = []
    if "image" not in views:
        if "image" in ctx.unreadable:
            notes.append(_note(f"image not shown: {ctx.unreadable['image']}"))
        else:
            notes.append(_note(f"image not shown: {ctx.row['image']} not found") if ctx.row.get("image")
                         else _note("image not shown: this run records no image (an `evaluate` run)"))
    if "labels" not in views:
        notes.append(_note(f"labels and error map not shown: {ctx.unreadable['labels']}") if "labels" in ctx.unreadable
                     else _note("labels and error map not shown: the scene has no labels (or its label file was not found)"))
    shape = views["shape"]
    body = (
        "".join(notes) + _panels(ctx, views)
        + _class_legend(ctx.class_names, ctx.store)
        + (_swatches(_ERROR_LEGEND) if "error" in views else "")
        + f'<p class="small">{h:,} × {w:,} px shown '
        + (
            f"at {shape[0]} × {shape[1]} (about 1 in {h / shape[0]:.1f} pixels each way: "
            "the same nearest samples of image, labels and mask)" if shape != (h, w) else "at full resolution"
        )
        + "</p>"
    )
    if "error" in views:
        body += _class_maps(ctx, whole)
    return _section(slug, "quicklook", "Image, labels, prediction, errors", body)


def _class_maps(ctx: _SceneContext, whole: Window) -> str:
    views = _views(ctx, whole, CLASS_MAP_SIDE, overview=False)
    c = len(ctx.class_names)
    present = [i for i in range(c) if (views["truth"] == i).any() or (views["pred"] == i).any()]
    figs = [
        _figure(png(class_error_rgb(views["truth"], views["pred"], c, i)), f"{ctx.name} {ctx.class_names[i]} errors",
                _esc(ctx.class_names[i]), "small")
        for i in present[:MAX_CLASS_MAPS]
    ]
    more = _note(f"{len(present) - MAX_CLASS_MAPS} more classes not shown") if len(present) > MAX_CLASS_MAPS else ""
    legend = _swatches(
        [("TP", TP_COLOUR), ("FP", FP_COLOUR), ("FN", FN_COLOUR), ("TN", TN_COLOUR), ("not scored", UNSCORED_COLOUR)]
    )
    return f'<h4>Per class: TP / FP / FN</h4><div class="grid">{"".join(figs)}</div>{more}{legend}'


# ---- per-scene metrics -------------------------------------------------------------------------------------

_SCALARS = [
    ("pixel_accuracy", "pixel accuracy"),
    ("mean_accuracy", "mean class accuracy"),
    ("mean_iou", "mean IoU"),
    ("mean_dice", "mean Dice"),
    ("frequency_weighted_iou", "frequency-weighted IoU"),
    ("mean_precision", "mean precision"),
    ("mean_recall", "mean recall"),
    ("kappa", "Cohen's kappa"),
    ("mean_boundary_iou", "mean boundary IoU"),
    ("mean_average_precision", "mean average precision"),
]


def _metrics(ctx: _SceneContext, classes: list[dict], slug: str) -> str:
    row = ctx.row
    if _missing(row.get("mean_iou")) and row.get("confusion") is None:
        return _section(slug, "metrics", "Metrics", _note("not computed: the scene has no labels"))
    scalars = [(label, _fmt(row.get(key))) for key, label in _SCALARS if key in row]
    scalars.append(("labelled pixels", _fmt(row.get("labelled_pixels"))))
    if not _missing(row.get("boundary_width")):
        scalars.append(("boundary band width (px)", _fmt(row.get("boundary_width"))))
    per_class = [
        (r.get("class_name"), _fmt(r.get("truth_pixels")), _fmt(r.get("predicted_pixels")), _fmt(r.get("iou")),
         _fmt(r.get("dice")), _fmt(r.get("boundary_iou")), _fmt(r.get("average_precision")),
         _fmt(r.get("precision")), _fmt(r.get("recall")))
        for r in classes
    ]
    body = (
        '<div class="row2">'
        + _table(["metric", "value"], scalars, "narrow")
        + _table(["class", "truth px", "predicted px", "IoU", "Dice", "boundary IoU", "AP", "precision", "recall"], per_class)
        + "</div>"
    )
    return _section(slug, "metrics", "Metrics", body)


def _confusion(ctx: _SceneContext, slug: str) -> str:
    conf = ctx.row.get("confusion")
    c = len(ctx.class_names)
    if conf is None or len(conf) != c * c or c == 0:
        return _section(slug, "confusion", "Confusion matrix", _note("not computed: the scene has no labels"))
    fig = _figure(confusion_png(np.asarray(conf), ctx.class_names), f"{ctx.name} confusion matrix",
                  "rows: true class, normalised to 100 %; columns: predicted class", "plot")
    return _section(slug, "confusion", "Confusion matrix", fig)


def _class_bars(ctx: _SceneContext, classes: list[dict], slug: str) -> str:
    title = "Per-class IoU, Dice and boundary IoU"
    if not classes or all(_missing(r.get("iou")) for r in classes):
        return _section(slug, "class-metrics", title, _note("not computed: the scene has no labels"))
    names = [r["class_name"] for r in classes]
    series = {"IoU": [r.get("iou") for r in classes], "Dice": [r.get("dice") for r in classes]}
    notes = ""
    if any(not _missing(r.get("boundary_iou")) for r in classes):
        width = ctx.row.get("boundary_width")
        series[f"boundary IoU ({width} px)" if not _missing(width) else "boundary IoU"] = [r.get("boundary_iou") for r in classes]
    else:
        notes = _note("boundary IoU not computed: these reports predate boundary metrics; rerun the job")
    fig = _figure(class_bars_png(names, series), f"{ctx.name} per-class bars", "per-class scores (a gap: class absent)", "plot")
    return _section(slug, "class-metrics", title, fig + notes)


def _pr_curves(ctx: _SceneContext, classes: list[dict], curves: list[dict], slug: str) -> str:
    title = "Precision–recall curves"
    if not curves:
        why = "the scene has no labels" if ctx.labels is None and ctx.row.get("labels") is None else (
            "probabilities were not saved; run the job with --save-probabilities (save_probabilities: true)"
        )
        return _section(slug, "pr-curves", title, _note(f"not computed: {why}"))
    by_class: dict[int, list[dict]] = {}
    for r in curves:
        by_class.setdefault(int(r["class_index"]), []).append(r)
    lines = {}
    for i, rows in by_class.items():
        rows = sorted(rows, key=lambda r: -float(r["threshold"]))
        lines[i] = (_finite_array(r["recall"] for r in rows), _finite_array(r["precision"] for r in rows))
    ap = [r.get("average_precision") for r in classes]
    zoom = pr_zoom(lines)
    caption = "precision against recall per class, from histograms of the saved probabilities" + (
        f"; right: zoomed on where the curves bend (recall from {zoom[0]:.2f}, precision from {zoom[1]:.2f}), "
        "the dashed box on the left" if zoom else ""
    )
    fig = _figure(pr_curves_png(lines, ctx.class_names, ap), f"{ctx.name} PR curves", caption, "plot")
    return _section(slug, "pr-curves", title, fig)


def _finite_array(values: Iterable) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _trimap(ctx: _SceneContext, classes: list[dict], slug: str) -> str:
    title = "Trimap IoU"
    miou = ctx.row.get("trimap_miou")
    if not miou or all(_missing(v) for v in miou):
        why = "the scene has no labels" if ctx.row.get("confusion") is None else (
            "these reports predate trimap metrics; rerun the job"
        )
        return _section(slug, "trimap", title, _note(f"not computed: {why}"))
    per_class = {int(r["class_index"]): r["trimap_iou"] for r in classes if r.get("trimap_iou")}
    fig = _figure(trimap_png(miou, per_class, ctx.class_names), f"{ctx.name} trimap curve",
                  "IoU inside a band of the given width around the true class boundaries", "plot")
    return _section(slug, "trimap", title, fig)


def _span(what: str, start: int, stop: int) -> str:
    return f"{what} {start:,}" if stop - start == 1 else f"{what}s {start:,}–{stop - 1:,}"


def _context_window(win: Window, scene: tuple[int, int], min_side: int) -> Window:
    """``win`` grown (centred, inside the scene) to at least ``min_side`` pixels a side, so slivers stay visible."""
    def grow(off: int, size: int, total: int) -> tuple[int, int]:
        want = min(total, max(size, min_side))
        start = min(max(0, off - (want - size) // 2), total - want)
        return start, want

    r0, h = grow(win.row_off, win.height, scene[0])
    c0, w = grow(win.col_off, win.width, scene[1])
    return Window(r0, c0, h, w)


def _outline(view: Window, win: Window, shape: tuple[int, int]) -> np.ndarray:
    """Display pixels on the edge of ``win`` inside a view of ``view`` sampled to ``shape``."""
    rows = sample_positions(view.row_off, view.height, shape[0])
    cols = sample_positions(view.col_off, view.width, shape[1])
    inside = ((rows >= win.row_off) & (rows < win.row_stop))[:, None] & ((cols >= win.col_off) & (cols < win.col_stop))[None, :]
    padded = np.pad(inside, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def _draw(rgb: np.ndarray, outline: np.ndarray | None) -> np.ndarray:
    if outline is None:
        return rgb
    out = rgb.copy()
    out[outline] = (255, 221, 0)
    return out


def _tile_side(ctx: _SceneContext) -> tuple[int, str]:
    """The side of the windows the worst tiles are picked from: the job's tile size, else a default."""
    size = ctx.row.get("tile_size")
    if not _missing(size) and int(size) > 0:
        return int(size), "the job's tile size"
    return DEFAULT_TILE_SIDE, "this run has no tile size"


def _read_block(ctx: _SceneContext, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """Truth and predicted class indexes of ``win`` at full resolution (-1 / 255 where a pixel is no class)."""
    shape = (win.height, win.width)
    truth = read_labels(ctx.labels, shape, ctx.lookup, ctx.ignore_index, win)
    if ctx.store.is_dir():
        from workers.mask_store import zarr_mask

        raw = np.asarray(zarr_mask(ctx.store)[0][win.row_off : win.row_stop, win.col_off : win.col_stop], dtype=np.uint8)
    else:
        raw = read_mask_raster(ctx.store, shape, win)
    return truth, _as_indices(ctx, raw)


def tile_errors(ctx: _SceneContext, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled and wrongly predicted pixels of each ``tile`` x ``tile`` window of the scene (a grid from its origin).

    Read at full resolution, a block of whole tiles at a time (at most `TILE_BLOCK_PIXELS`), so memory stays
    bounded whatever the scene's size; every pixel is read once.
    """
    h, w = int(ctx.row["height"]), int(ctx.row["width"])
    rows, cols = -(-h // tile), -(-w // tile)
    labelled = np.zeros((rows, cols), dtype=np.int64)
    wrong = np.zeros((rows, cols), dtype=np.int64)
    across = min(cols, max(1, TILE_BLOCK_PIXELS // (tile * tile)))
    down = min(rows, max(1, TILE_BLOCK_PIXELS // (across * tile * tile)))
    c = len(ctx.class_names)
    for tr in range(0, rows, down):
        for tc in range(0, cols, across):
            win = Window(tr * tile, tc * tile, min(down * tile, h - tr * tile), min(across * tile, w - tc * tile))
            truth, pred = _read_block(ctx, win)
            scored = (truth >= 0) & (truth < c) & (pred < c)
            starts_r, starts_c = np.arange(0, win.height, tile), np.arange(0, win.width, tile)
            for total, where in ((labelled, scored), (wrong, scored & (truth != pred))):
                sums = np.add.reduceat(np.add.reduceat(where.astype(np.int32), starts_r, axis=0), starts_c, axis=1)
                total[tr : tr + len(starts_r), tc : tc + len(starts_c)] = sums
    return labelled, wrong


def _worst_tiles(ctx: _SceneContext, slug: str) -> str:
    tile, why = _tile_side(ctx)
    title = f"Worst tiles ({tile} × {tile} px windows with the most wrong pixels)"
    if ctx.labels is None or ctx.row.get("confusion") is None:
        return _section(slug, "worst-tiles", title, _note("not computed: the scene has no labels (or its label file was not found)"))
    if ctx.store is None:
        return _section(slug, "worst-tiles", title, _note("not available: mask store not found"))
    if "labels" in ctx.unreadable:
        return _section(slug, "worst-tiles", title, _note(f"not computed: {ctx.unreadable['labels']}"))
    try:
        labelled, wrong = tile_errors(ctx, tile)
    except InputFileError as err:  # remote labels out of reach now
        return _section(slug, "worst-tiles", title, _note(f"not computed: {err}"))
    bad_r, bad_c = np.nonzero(wrong)
    order = np.lexsort((bad_c, bad_r, -wrong[bad_r, bad_c]))[:WORST_TILES]
    if not order.size:
        return _section(slug, "worst-tiles", title, _note(f"no {tile}-px tile has a wrongly classified labelled pixel"))
    h, w = int(ctx.row["height"]), int(ctx.row["width"])
    cards = []
    try:  # remote images or labels may have gone out of reach since the counts were read
        for r, c in zip(bad_r[order], bad_c[order]):
            win = Window(int(r) * tile, int(c) * tile, min(tile, h - int(r) * tile), min(tile, w - int(c) * tile))
            truth, pred = _read_block(ctx, win)
            m = segmentation_metrics(confusion_matrix(truth, pred, len(ctx.class_names), ignore_index=None))
            view_win = _context_window(win, (h, w), MIN_TILE_VIEW)
            views = _views(ctx, view_win, THUMB_SIDE, overview=False)
            outline = None if view_win == win else _outline(view_win, win, views["shape"])
            imgs = "".join(
                _img(png(_draw(views[k], outline)), f"{ctx.name} tile {r},{c} {k}", "thumb")
                for k, _ in PANELS if k in views
            )
            context = f"; shown with {view_win.height} × {view_win.width} px around it (outlined)" if outline is not None else ""
            n_wrong, n_lab = int(wrong[r, c]), int(labelled[r, c])
            caption = (
                f"tile ({r}, {c}): {_span('row', win.row_off, win.row_stop)}, {_span('col', win.col_off, win.col_stop)}"
                f"{context}. <b>{n_wrong:,} wrong</b> of {n_lab:,} labelled px ({n_wrong / n_lab:.1%}), "
                f"mean IoU {_fmt(m.mean_iou)}"
            )
            cards.append(f'<div class="tile"><div class="thumbs">{imgs}</div><p class="small">{caption}</p></div>')
    except InputFileError as err:
        return _section(slug, "worst-tiles", title, _note(f"not computed: {err}"))
    body = (
        f'<p class="small">{tile}-px windows from the scene origin ({why}), {labelled.size:,} in all, ranked by '
        "wrongly classified labelled pixels (read at full resolution). Each: image · labels · prediction · errors</p>"
        f'<div class="tiles">{"".join(cards)}</div>'
    )
    return _section(slug, "worst-tiles", title, body)


# ---- run level ---------------------------------------------------------------------------------------------


def _throughput(tables: RunTables) -> str:
    rows = []
    total_mpx = total_predict = 0.0
    for r in tables.scenes:
        mpx = int(r["height"]) * int(r["width"]) / 1e6
        total_mpx += mpx
        total_predict += r.get("predict_seconds") or 0.0
        lattice, computed = r.get("tiles_lattice"), r.get("tiles_computed")
        rows.append((
            r["scene"], f"{int(r['height']):,} × {int(r['width']):,}", f"{mpx:.2f}", _fmt(r.get("seconds"), 1),
            _fmt(r.get("predict_seconds"), 1), _fmt(r.get("model_seconds"), 1), _fmt(r.get("evaluate_seconds"), 1),
            _fmt(r.get("megapixels_per_second"), 2),
            f"{_fmt(computed)} / {_fmt(lattice)}", _fmt(r.get("tiles_reused")), _fmt(r.get("chunks_resumed")),
        ))
    headers = ["scene", "size (px)", "Mpx", "seconds", "predict s", "model s", "evaluate s", "Mpx/s", "tiles computed / lattice",
               "tiles reused", "chunks resumed"]
    body = _table(headers, rows)
    if total_predict > 0:
        body += (
            f'<p class="small">run: {total_mpx:.2f} Mpx in {total_predict:.1f} s of prediction = '
            f"<b>{total_mpx / total_predict:.2f} Mpx/s</b></p>"
        )
    first = tables.scenes[0]
    if first.get("model"):
        setup = [f"model {first['model']}", f"tile {_fmt(first.get('tile_size'))}", f"overlap {_fmt(first.get('overlap'))}",
                 f"chunk {_fmt(first.get('chunk_size'))}", f"stitch {first.get('stitch') or '—'}"]
        body += f'<p class="small">{_esc(", ".join(setup))}</p>'
    return _section(None, "throughput", "Throughput", body)


_AGG_COLUMNS = [
    ("scenes", "scenes"), ("labelled_pixels", "labelled px"), ("pixel_accuracy", "pixel acc."), ("mean_accuracy", "mean acc."),
    ("mean_iou", "mean IoU"), ("mean_dice", "mean Dice"), ("frequency_weighted_iou", "FW IoU"), ("kappa", "kappa"),
    ("mean_boundary_iou", "boundary IoU"), ("mean_average_precision", "mAP"),
]


def _aggregates(tables: RunTables) -> str:
    title = "Aggregates over scenes (micro: pooled counts; macro: mean of scenes)"
    aggs = [a for a in tables.aggregates if a.get("aggregate") in ("micro", "macro")]
    if not aggs:
        return _section(None, "aggregates", title, _note(
            "not computed: this job wrote no aggregates table (jobs without labels, `evaluate` runs and reports "
            "before schema 2 have none)"
        ))
    aggs.sort(key=lambda a: a["aggregate"])
    headers = ["aggregate"] + [h for _, h in _AGG_COLUMNS]
    body = _table(headers, [[a["aggregate"]] + [_fmt(a.get(k)) for k, _ in _AGG_COLUMNS] for a in aggs])
    names = aggs[0].get("class_names") or []
    if names:
        cols, rows = ["class"], [[n] for n in names]
        for key, label in (("iou", "IoU"), ("dice", "Dice"), ("boundary_iou", "boundary IoU"), ("average_precision", "AP")):
            for a in aggs:
                values = a.get(key)
                if values:
                    cols.append(f"{label} {a['aggregate']}")
                    for i, row in enumerate(rows):
                        row.append(_fmt(values[i] if i < len(values) else None))
        body += _table(cols, rows)
    micro = next((a for a in aggs if a["aggregate"] == "micro"), None)
    if micro and micro.get("confusion") and len(tables.scenes) > 1 and len(micro["confusion"]) == len(names) ** 2:
        body += _figure(confusion_png(np.asarray(micro["confusion"]), names), "run confusion matrix",
                        "all scenes pooled (micro), rows normalised", "plot")
    return _section(None, "aggregates", title, body)


def _training(tables: RunTables) -> str:
    """Loss and validation mean IoU per epoch, as `satseg train` recorded them in the job's checkpoint."""
    title = "Training curves of the checkpoint"
    first = tables.scenes[0]
    path = first.get("checkpoint") or (tables.spec or {}).get("checkpoint")
    if not path:
        init = (tables.spec or {}).get("init")
        weights = f"published weights ({init}), which record no training history" if init else "random weights"
        return _section(None, "training", title, _note(f"not computed: the job used no checkpoint, but {weights}"))
    if not Path(path).is_file():
        return _section(None, "training", title, _note(f"not available: checkpoint {path} not found here"))
    from workers.models.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        return _section(None, "training", title, _note(f"not available: {err}"))
    recorded = first.get("checkpoint_sha256")
    if recorded and ckpt.sha256 != recorded:
        return _section(None, "training", title, _note(
            f"not shown: {path} changed since the run (SHA-256 {ckpt.sha256[:12]}, the run used {recorded[:12]})"
        ))
    prov = ckpt.provenance
    loss, val = prov.get("loss_history") or [], prov.get("validation_history") or []
    if not loss and not val:
        return _section(None, "training", title, _note(
            f"not recorded: {Path(path).name} holds no per-epoch history (not written by `satseg train`)"
        ))
    best = prov.get("epoch") if isinstance(prov.get("epoch"), int) else None
    facts = [f"{Path(path).name} ({ckpt.model})", f"{len(loss) or len(val)} epochs"]
    if best:
        facts.append(f"kept epoch {best}")
    if prov.get("validation_mean_iou") is not None:
        facts.append(f"validation mean IoU {_fmt(prov.get('validation_mean_iou'))}")
    fig = _figure(training_png(loss, val, best), "training curves",
                  "per epoch: mean training loss, and mean IoU on the held-out rows; the dashed line is the epoch kept",
                  "plot")
    return _section(None, "training", title, f'<p class="small">{_esc(" · ".join(facts))}</p>' + fig)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2b45;color:#fff;padding:18px 32px}
header h1{margin:0 0 6px;font-size:22px}
header p{margin:2px 0;font-size:13px;color:#cfd7e6}
main{max-width:1400px;margin:0 auto;padding:16px 32px 48px}
nav{font-size:13px;margin:8px 0 16px}
nav a{margin-right:12px;color:#1d4ed8}
h2{border-bottom:2px solid #1d2b45;padding-bottom:4px;margin-top:36px}
h3{margin:0 0 10px;font-size:16px}
h4{margin:16px 0 8px;font-size:14px}
.panel{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:14px 18px;margin:14px 0}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:12px}
.row2{display:grid;grid-template-columns:minmax(240px,1fr) 3fr;gap:18px;align-items:start}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
figure{margin:0}
figure img{width:100%;height:auto;image-rendering:pixelated;border:1px solid #d0d4dc}
figure img.plot{width:auto;max-width:100%;image-rendering:auto;border:none}
figcaption{font-size:12px;color:#555;margin-top:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e3e6eb;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f0f2f5}
table.narrow{width:100%}
.note{color:#8a5a00;background:#fff8e6;border-left:3px solid #f0b429;padding:6px 10px;font-size:13px;margin:6px 0}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;font-size:12px;margin:8px 0}
.swatch{display:inline-flex;align-items:center;gap:5px}
.swatch i{display:inline-block;width:14px;height:14px;border:1px solid #888}
.small{font-size:12px;color:#555}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.tile{border:1px solid #e3e6eb;border-radius:4px;padding:8px}
.thumbs{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:4px}
.thumbs img{width:100%;height:auto;image-rendering:pixelated;border:1px solid #d0d4dc;box-sizing:border-box}
.up{color:#17703a}
.wide{overflow-x:auto}
.down{color:#b42318}
"""


def render_report(tables: RunTables) -> str:
    """The whole page as one HTML string."""
    scene_parts, nav = [], []
    for row in tables.scenes:
        ctx = _scene_context(tables, row)
        slug = _slug(ctx.name)
        classes = sorted(tables.classes.get(ctx.name, []), key=lambda r: r["class_index"])
        nav.append(f'<a href="#scene-{_esc(slug)}">{_esc(ctx.name)}</a>')
        sections = [
            _quicklook(ctx, slug),
            _metrics(ctx, classes, slug),
            _confusion(ctx, slug),
            _class_bars(ctx, classes, slug),
            _pr_curves(ctx, classes, tables.curves.get(ctx.name, []), slug),
            _trimap(ctx, classes, slug),
            _worst_tiles(ctx, slug),
            objects_section(  # with `things`: object metrics, the largest misses and false alarms on the map
                OutputLayout(tables.run_dir), tables.job_id, ctx.name, ctx.store, (int(row["height"]), int(row["width"])),
                ctx.class_names, slug,
            ),
        ]
        facts = [f'{int(row["height"]):,} × {int(row["width"]):,} px', f"{len(ctx.class_names)} classes"]
        info = " · ".join(([_esc(row["image"])] if row.get("image") else []) + facts)
        scene_parts.append(
            f'<article class="scene" id="scene-{_esc(slug)}"><h2>Scene {_esc(ctx.name)}</h2><p class="small">{info}</p>'
            + "".join(sections) + "</article>"
        )
    run = _throughput(tables) + _aggregates(tables) + _training(tables)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = tables.scenes[0].get("model") or "—"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>satseg report · {_esc(tables.run_dir.name)} · job {_esc(tables.job_id)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>satseg report · {_esc(tables.run_dir.name)}</h1>"
        f"<p>job {_esc(tables.job_id)} · model {_esc(model)} · {len(tables.scenes)} scene(s) · "
        f"written {now} by satseg {__version__}</p><p>{_esc(tables.run_dir.resolve())}</p></header>"
        f'<main><nav><a href="#run">Run</a>{"".join(nav)}</nav>'
        f'<article id="run"><h2>Run</h2>{run}</article>'
        + "".join(scene_parts)
        + "</main></body></html>"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, *, job_id: str | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``), atomically."""
    tables = load_run(run_dir, job_id)
    out = Path(out) if out is not None else tables.run_dir / "report.html"
    if not out.parent.is_dir():
        raise SpecError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    page = render_report(tables)
    with replacing(out) as f:
        f.write(page.encode("utf-8"))
    layout = OutputLayout(tables.run_dir)
    if out.resolve() == layout.html_report.resolve():  # the job's own report: its STAC items link it now
        from pipeline.stac_output import refresh_stac

        refresh_stac(layout)
    return out
