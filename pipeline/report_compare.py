"""`satseg report RUN_A RUN_B`: two runs on one self-contained page.

For the scenes both runs hold: per-class IoU and Dice pooled over those
scenes (micro, from the stored confusion matrices, so both runs are scored
on exactly the same pixels) with B - A differences, each scene's metrics side
by side, the job settings that differ (job.json, flattened), and for each
common scene its image, labels, both predictions and a map of where they
disagree and which one is right there. Views are decimated reads, as in
:mod:`pipeline.report`, whose page pieces this module shares.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core.geometry import Window
from pipeline.palette import mask_colours
from pipeline.report import (  # the page's pieces: one look for both pages
    _CSS,
    RunTables,
    _class_legend,
    _esc,
    _figure,
    _fmt,
    _missing,
    _note,
    _scene_context,
    _section,
    _slug,
    _swatches,
    _table,
    _views,
    load_run,
)
from pipeline.report_figures import class_bars_png, png
from pipeline.report_tables import aggregates_table
from schemas.errors import SpecError
from schemas.store import replacing

__all__ = ["COMPARE_SECTIONS", "COMPARE_SIDE", "MAX_COMPARED_SCENES", "settings_differences", "agreement_rgb",
           "render_comparison", "write_comparison"]

COMPARE_SECTIONS = ("runs", "settings", "classes", "scenes", "predictions")
"""Sections of the comparison page (``data-section``), in page order."""

COMPARE_SIDE = 600
MAX_COMPARED_SCENES = 12

BOTH_RIGHT, BOTH_WRONG = (150, 206, 150), (214, 39, 40)
ONLY_A_RIGHT, ONLY_B_RIGHT = (31, 119, 180), (255, 127, 14)
SAME, DIFFERENT, UNSCORED = (235, 235, 235), (117, 61, 160), (190, 190, 190)

_SCENE_METRICS = [
    ("mean_iou", "mean IoU"), ("pixel_accuracy", "pixel acc."), ("mean_dice", "mean Dice"),
    ("mean_boundary_iou", "boundary IoU"), ("mean_average_precision", "mAP"),
]


def _flatten(value, key: str = "") -> dict[str, object]:
    """A job spec as ``dotted.key: value``; a list of named items (scenes) keyed by name, other lists whole."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k in sorted(value, key=str):
            out.update(_flatten(value[k], f"{key}.{k}" if key else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        out = {}
        for item in value:
            out.update(_flatten({k: v for k, v in item.items() if k != "name"}, f"{key}[{item['name']}]"))
        return out
    return {key: value}


def settings_differences(a: dict | None, b: dict | None) -> list[tuple[str, object, object]]:
    """(key, A's value, B's value) for every setting of the two job specs that differs; missing is None."""
    fa, fb = _flatten(a or {}), _flatten(b or {})
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _shown(value) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


def _delta(a, b, digits: int = 3) -> str:
    """B - A as signed text, in a span coloured by its sign."""
    if _missing(a) or _missing(b):
        return "—"
    d = float(b) - float(a)
    cls = "up" if d > 0 else "down" if d < 0 else ""
    return f'<span class="{cls}">{d:+.{digits}f}</span>'


def _html_table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Like the report's tables, but cells are HTML already (escaped by the caller): deltas carry a colour."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _by_scene(tables: RunTables) -> dict[str, dict]:
    return {row["scene"]: row for row in tables.scenes}


def _common(a: RunTables, b: RunTables) -> list[str]:
    sb = _by_scene(b)
    return [s for s in _by_scene(a) if s in sb]


def _runs(a: RunTables, b: RunTables) -> str:
    rows = []
    for label, t in (("A", a), ("B", b)):
        first = t.scenes[0]
        ckpt = first.get("checkpoint_sha256")
        rows.append([label, str(t.run_dir.resolve()), t.job_id, first.get("model") or "—",
                     f"{Path(first['checkpoint']).name} ({ckpt[:12]})" if first.get("checkpoint") and ckpt else "—",
                     str(len(t.scenes))])
    body = _table(["run", "folder", "job", "model", "checkpoint", "scenes"], rows)
    common = _common(a, b)
    only_a = [s for s in _by_scene(a) if s not in set(common)]
    only_b = [s for s in _by_scene(b) if s not in set(common)]
    facts = f"{len(common)} scene(s) in both"
    if only_a:
        facts += f"; only in A: {', '.join(only_a)}"
    if only_b:
        facts += f"; only in B: {', '.join(only_b)}"
    body += f'<p class="small">{_esc(facts)}. Differences are B − A.</p>'
    return _section(None, "runs", "Runs compared", body)


def _settings(a: RunTables, b: RunTables) -> str:
    title = "Settings that differ (job.json)"
    if a.spec is None or b.spec is None:
        missing = ", ".join(str(t.run_dir) for t in (a, b) if t.spec is None)
        return _section(None, "settings", title, _note(f"not available: no job record of the reported job in {missing}"))
    diffs = settings_differences(a.spec, b.spec)
    extra = []
    for key in ("checkpoint_sha256", "satseg_version"):
        va, vb = a.scenes[0].get(key), b.scenes[0].get(key)
        if va != vb:
            extra.append((f"({key} of the scenes table)", va, vb))
    if not diffs and not extra:
        return _section(None, "settings", title, '<p class="small">none: both jobs have the same settings</p>')
    rows = [[_esc(k), _esc(_shown(va)), _esc(_shown(vb))] for k, va, vb in diffs + extra]
    return _section(None, "settings", title, _html_table(["setting", "A", "B"], rows))


def _micro(tables: RunTables, scenes: list[str]) -> dict | None:
    """The micro aggregate (pooled counts) of ``tables`` over ``scenes`` only, or None without labels."""
    rows = [r for r in tables.scenes if r["scene"] in scenes]
    classes = [c for s in scenes for c in tables.classes.get(s, [])]
    curves = [c for s in scenes for c in tables.curves.get(s, [])]
    labelled = [r for r in rows if r.get("confusion") is not None]
    if not labelled or len({tuple(r.get("class_names") or []) for r in labelled}) != 1:
        return None
    table = aggregates_table(rows, classes, curves).to_pylist()
    return next((r for r in table if r["aggregate"] == "micro"), None)


def _classes(a: RunTables, b: RunTables) -> str:
    title = "Per class, over the scenes in both runs (pooled counts)"
    common = _common(a, b)
    ma, mb = _micro(a, common), _micro(b, common)
    if ma is None or mb is None:
        return _section(None, "classes", title, _note(
            "not computed: " + ("the runs share no scene" if not common else "a run has no labels for the common scenes")
        ))
    names = list(ma["class_names"]) + [n for n in mb["class_names"] if n not in ma["class_names"]]

    def value(m: dict, key: str, name: str):
        return m[key][m["class_names"].index(name)] if name in m["class_names"] and m.get(key) else None

    rows, series = [], {"IoU A": [], "IoU B": [], "Dice A": [], "Dice B": []}
    for n in names:
        ia, ib, da, db = value(ma, "iou", n), value(mb, "iou", n), value(ma, "dice", n), value(mb, "dice", n)
        rows.append([_esc(n), _fmt(ia), _fmt(ib), _delta(ia, ib), _fmt(da), _fmt(db), _delta(da, db)])
        for k, v in zip(series, (ia, ib, da, db)):
            series[k].append(v)
    rows.append(["<b>mean</b>", _fmt(ma["mean_iou"]), _fmt(mb["mean_iou"]), _delta(ma["mean_iou"], mb["mean_iou"]),
                 _fmt(ma["mean_dice"]), _fmt(mb["mean_dice"]), _delta(ma["mean_dice"], mb["mean_dice"])])
    body = _html_table(["class", "IoU A", "IoU B", "Δ IoU", "Dice A", "Dice B", "Δ Dice"], rows)
    body += _figure(class_bars_png(names, series), "IoU and Dice of both runs", "per-class IoU and Dice of A and B", "plot")
    return _section(None, "classes", title, body)


def _scenes(a: RunTables, b: RunTables) -> str:
    title = "Per scene"
    common = _common(a, b)
    if not common:
        return _section(None, "scenes", title, _note("not computed: the runs share no scene (scenes match by name)"))
    ra, rb = _by_scene(a), _by_scene(b)
    headers = ["scene"] + [f"{label} {x}" for _, label in _SCENE_METRICS for x in ("A", "B", "Δ")] + ["Mpx/s A", "Mpx/s B"]
    rows = []
    for s in common:
        row = [_esc(s)]
        for key, _ in _SCENE_METRICS:
            va, vb = ra[s].get(key), rb[s].get(key)
            row += [_fmt(va), _fmt(vb), _delta(va, vb)]
        row += [_fmt(ra[s].get("megapixels_per_second"), 2), _fmt(rb[s].get("megapixels_per_second"), 2)]
        rows.append(row)
    return _section(None, "scenes", title, f'<div class="wide">{_html_table(headers, rows)}</div>')


def agreement_rgb(truth: np.ndarray | None, pred_a: np.ndarray, pred_b: np.ndarray, num_classes: int) -> np.ndarray:
    """Where two predictions (class indexes in one class list) agree, and with labels which one is right there.

    With labels: both right, both wrong, only A right, only B right; unscored pixels grey. Without: same or different.
    """
    rgb = np.empty((*pred_a.shape, 3), dtype=np.uint8)
    has = (pred_a < num_classes) | (pred_b < num_classes)
    rgb[:] = UNSCORED
    if truth is None:
        rgb[has & (pred_a == pred_b)] = SAME
        rgb[has & (pred_a != pred_b)] = DIFFERENT
        return rgb
    scored = (truth >= 0) & (truth < num_classes) & has
    right_a, right_b = scored & (pred_a == truth), scored & (pred_b == truth)
    rgb[scored & right_a & right_b] = BOTH_RIGHT
    rgb[scored & ~right_a & ~right_b] = BOTH_WRONG
    rgb[right_a & ~right_b] = ONLY_A_RIGHT
    rgb[right_b & ~right_a] = ONLY_B_RIGHT
    return rgb


def _in_classes(pred: np.ndarray, names: list[str], into: list[str]) -> np.ndarray:
    """Class indexes of ``names`` as indexes of ``into`` (255: a class ``into`` does not have)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for i, n in enumerate(names):
        if n in into:
            lut[i] = into.index(n)
    return lut[pred.astype(np.uint8)]


def _predictions(a: RunTables, b: RunTables) -> str:
    title = "Predictions side by side"
    common = _common(a, b)
    if not common:
        return _section(None, "predictions", title, _note("not computed: the runs share no scene"))
    ra, rb = _by_scene(a), _by_scene(b)
    parts, labelled = [], False
    for s in common[:MAX_COMPARED_SCENES]:
        ca, cb = _scene_context(a, ra[s]), _scene_context(b, rb[s])
        shape_a, shape_b = (int(ra[s]["height"]), int(ra[s]["width"])), (int(rb[s]["height"]), int(rb[s]["width"]))
        if shape_a != shape_b:
            parts.append(f"<h4>{_esc(s)}</h4>" + _note(f"not compared: {shape_a[0]} × {shape_a[1]} px in A, {shape_b[0]} × {shape_b[1]} in B"))
            continue
        if ca.store is None or cb.store is None:
            parts.append(f"<h4>{_esc(s)}</h4>" + _note("not compared: a mask store was not found"))
            continue
        whole = Window(0, 0, *shape_a)
        va, vb = _views(ca, whole, COMPARE_SIDE, overview=False), _views(cb, whole, COMPARE_SIDE, overview=False)
        pred_b = _in_classes(vb["pred"], cb.class_names, ca.class_names)
        agree = agreement_rgb(va.get("truth"), va["pred"], pred_b, len(ca.class_names))
        labelled |= "truth" in va
        shown = {k: va[k] for k in ("image", "labels") if k in va}
        figs = [_figure(png(v, photo=k == "image"), f"{s} {k}", _esc(k), "") for k, v in shown.items()]
        figs.append(_figure(png(va["prediction"]), f"{s} prediction A", "prediction A", ""))
        figs.append(_figure(png(vb["prediction"]), f"{s} prediction B", "prediction B", ""))
        figs.append(_figure(png(agree), f"{s} agreement", "where A and B differ", ""))
        legend = _class_legend(ca.class_names, ca.store)
        if not np.array_equal(mask_colours(ca.class_names, ca.store), mask_colours(cb.class_names, cb.store)):
            legend += _class_legend(cb.class_names, cb.store).replace('class="legend"', 'class="legend" title="B"', 1)
        parts.append(f'<h4 id="compare-{_esc(_slug(s))}">{_esc(s)}</h4><div class="panels">{"".join(figs)}</div>{legend}')
    if labelled:
        parts.append(_swatches([("both right", BOTH_RIGHT), ("only A right", ONLY_A_RIGHT), ("only B right", ONLY_B_RIGHT),
                                ("both wrong", BOTH_WRONG), ("not scored", UNSCORED)]))
    else:
        parts.append(_swatches([("same class", SAME), ("different class", DIFFERENT), ("no class in either", UNSCORED)]))
    if len(common) > MAX_COMPARED_SCENES:
        parts.append(_note(f"{len(common) - MAX_COMPARED_SCENES} more common scenes not shown"))
    return _section(None, "predictions", title, "".join(parts))


def render_comparison(a: RunTables, b: RunTables) -> str:
    """The comparison page as one HTML string."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = _runs(a, b) + _settings(a, b) + _classes(a, b) + _scenes(a, b) + _predictions(a, b)
    name = f"{a.run_dir.name} (A) vs {b.run_dir.name} (B)"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>satseg comparison · {_esc(name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>satseg comparison · {_esc(name)}</h1>"
        f"<p>A: job {_esc(a.job_id)} · B: job {_esc(b.job_id)} · written {now} by satseg {__version__}</p></header>"
        f"<main>{sections}</main></body></html>"
    )


def write_comparison(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> Path:
    """Write the page comparing ``run_a`` (A) with ``run_b`` (B) to ``out`` (default ``RUN_A/compare-<B>.html``)."""
    a, b = load_run(run_a), load_run(run_b)
    if a.run_dir.resolve() == b.run_dir.resolve():
        raise SpecError(f"{run_a}: the same folder twice; give two job folders to compare")
    out = Path(out) if out is not None else a.run_dir / f"compare-{_slug(b.run_dir.resolve().name)}.html"
    if not out.parent.is_dir():
        raise SpecError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    page = render_comparison(a, b)
    with replacing(out) as f:
        f.write(page.encode("utf-8"))
    return out
