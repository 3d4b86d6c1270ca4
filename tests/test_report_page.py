"""`satseg report RUN_DIR`: a real job's self-contained HTML report holds every section, and every image decodes."""

from __future__ import annotations

import base64
import copy
import io
from html.parser import HTMLParser

import numpy as np
import pytest
import rasterio
import zarr
from PIL import Image

from pipeline import report as report_page
from pipeline.cli import main
from pipeline.report import RUN_SECTIONS, SECTIONS, load_run, render_report, write_report
from pipeline.overviews import write_overviews
from pipeline.quicklook import TP_COLOUR, UNSCORED_COLOUR, WRONG_COLOUR, sample_positions
from pipeline.run import run_job
from tests.conftest import CLASSES
from tests.test_pipeline import job


class Page(HTMLParser):
    """Sections (by ``data-section``), the images in each, and whether a section holds a "not computed" note."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.images: list[tuple[str | None, str, str]] = []  # (section id, alt, src)
        self._current: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-section" in a:
            self._current = a["id"]
            self.sections[a["id"]] = {"kind": a["data-section"], "images": 0, "tables": 0, "notes": []}
        elif tag == "img":
            self.images.append((self._current, a.get("alt", ""), a["src"]))
            if self._current:
                self.sections[self._current]["images"] += 1
        elif tag == "table" and self._current:
            self.sections[self._current]["tables"] += 1
        elif tag == "p" and a.get("class") == "note" and self._current:
            self.sections[self._current]["notes"].append("")

    def handle_data(self, data):
        if self._current and self.sections[self._current]["notes"] and self.sections[self._current]["notes"][-1] == "":
            self.sections[self._current]["notes"][-1] = data

    def handle_endtag(self, tag):
        if tag == "section":
            self._current = None

    def image(self, alt: str) -> np.ndarray:
        src = next(s for _, a, s in self.images if a == alt)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def run_dir(ray_local, odd_scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    run_job(job(odd_scene, out, chunk_size=128, save_probabilities=True), show_progress=False)
    return out


@pytest.fixture(scope="module")
def arrays(run_dir, odd_scene):
    mask = zarr.open_array(str(run_dir / "masks" / "odd.zarr"), path="mask", mode="r")[:]
    with rasterio.open(odd_scene.labels) as src:
        labels = src.read(1).astype(np.int64)
        labels[src.read_masks(1) == 0] = -1
    return mask, labels


def expected_error_map(mask: np.ndarray, labels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    m, t = mask[np.ix_(rows, cols)], labels[np.ix_(rows, cols)]
    scored = (t >= 0) & (t < len(CLASSES)) & (t != 255) & (m < len(CLASSES))
    out = np.empty((*m.shape, 3), dtype=np.uint8)
    out[:] = UNSCORED_COLOUR
    out[scored & (m == t)] = TP_COLOUR
    out[scored & (m != t)] = WRONG_COLOUR
    return out


def test_report_holds_every_section_and_every_image_decodes(run_dir, tmp_path):
    path = write_report(run_dir, tmp_path / "report.html")
    text = path.read_text()
    page = Page(text)
    kinds = {(sid, s["kind"]) for sid, s in page.sections.items()}
    assert {(f"odd-{k}", k) for k in SECTIONS} | {(k, k) for k in RUN_SECTIONS} <= kinds
    assert page.images and all(src.startswith("data:image/png;base64,") for _, _, src in page.images)
    for _, alt, src in page.images:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) >= 1, alt
    assert "<script" not in text and "<link" not in text and "url(" not in text and 'src="http' not in text
    tables = load_run(run_dir)
    # Every section the run has data for shows it; the rest say why not.
    with_data = {"quicklook", "metrics", "confusion", "class-metrics", "worst-tiles", "throughput", "aggregates"}
    if tables.curves["odd"]:
        with_data.add("pr-curves")
    if tables.scenes[0].get("trimap_miou"):
        with_data.add("trimap")
    for sid, section in page.sections.items():
        if section["kind"] in ("metrics", "throughput", "aggregates"):  # tables (aggregates: a plot only for several scenes)
            assert section["tables"] > 0 and not section["notes"], (sid, section)
        elif section["kind"] in with_data:
            assert section["images"] > 0 and not section["notes"], (sid, section)
        elif section["kind"] not in with_data:
            assert section["notes"] and section["notes"][0].startswith("not computed"), (sid, section)
    assert page.sections["odd-worst-tiles"]["images"] == 4 * report_page.WORST_TILES  # image, labels, prediction, errors
    for panel in ("image", "labels", "prediction", "errors"):  # side by side, one extent: the scene's
        assert page.image(f"odd {panel}").shape == (301, 367, 3), panel


def test_error_map_marks_each_pixel_against_the_labels(run_dir, arrays, tmp_path):
    mask, labels = arrays
    page = Page(write_report(run_dir, tmp_path / "report.html").read_text())
    got = page.image("odd errors")
    assert got.shape == (*mask.shape, 3)  # small scene: shown at full resolution
    assert np.array_equal(got, expected_error_map(mask, labels, np.arange(mask.shape[0]), np.arange(mask.shape[1])))
    assert (got == TP_COLOUR).all(axis=-1).any() and (got == WRONG_COLOUR).all(axis=-1).any()


def test_panels_share_samples_and_labels_and_prediction_show_class_colours(run_dir, arrays, tmp_path, monkeypatch):
    from pipeline.palette import mask_colours

    mask, labels = arrays
    monkeypatch.setattr(report_page, "QUICKLOOK_SIDE", 150)
    page = Page(write_report(run_dir, tmp_path / "report.html").read_text())
    rows, cols = sample_positions(0, 301, 123), sample_positions(0, 367, 150)
    assert np.array_equal(page.image("odd errors"), expected_error_map(mask, labels, rows, cols))
    colours = mask_colours(CLASSES, run_dir / "masks" / "odd.zarr")
    m, t = mask[np.ix_(rows, cols)], labels[np.ix_(rows, cols)]
    pred = page.image("odd prediction")
    assert np.array_equal(pred[m < 5], colours[m[m < 5]]) and (pred[m == 255] == 255).all()
    shown = page.image("odd labels")
    scored = (t >= 0) & (t < 5)
    assert np.array_equal(shown[scored], colours[t[scored]]) and (shown[~scored] == 255).all()
    assert page.image("odd image").shape == pred.shape == shown.shape == (123, 150, 3)


def test_without_labels_the_prediction_comes_from_the_overview_level(run_dir, tmp_path, monkeypatch):
    store = run_dir / "masks" / "odd.zarr"
    write_overviews(store, max_size=128)
    monkeypatch.setattr(report_page, "QUICKLOOK_SIDE", 150)
    tables = load_run(run_dir)
    tables.scenes[0]["labels"] = None
    text = render_report(tables)
    page = Page(text)
    assert "(overview level 1, 1/2)" in text and page.image("odd prediction").shape == (123, 150, 3)
    assert "labels and error map not shown" in page.sections["odd-quicklook"]["notes"][0]


def test_worst_tiles_are_tile_windows_with_the_most_wrong_pixels(run_dir, arrays):
    """Counted at full resolution in bounded blocks: the same as counting over the whole arrays at once."""
    mask, labels = arrays
    tables = load_run(run_dir)
    ctx = report_page._scene_context(tables, tables.scenes[0])
    tile = int(tables.scenes[0]["tile_size"])
    scored = (labels >= 0) & (labels < len(CLASSES)) & (mask < len(CLASSES))
    wrong = scored & (labels != mask)
    for block in (1 << 22, tile * tile, 3 * tile * tile):  # one block, one tile a block, three tiles a block
        report_page.TILE_BLOCK_PIXELS, old = block, report_page.TILE_BLOCK_PIXELS
        try:
            got_labelled, got_wrong = report_page.tile_errors(ctx, tile)
        finally:
            report_page.TILE_BLOCK_PIXELS = old
        assert got_labelled.shape == (-(-301 // tile), -(-367 // tile))
        for r in range(got_labelled.shape[0]):
            for c in range(got_labelled.shape[1]):
                window = (slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
                assert got_labelled[r, c] == scored[window].sum() and got_wrong[r, c] == wrong[window].sum()
    text = render_report(tables)
    worst = np.unravel_index(np.argmax(got_wrong), got_wrong.shape)
    assert f"tile ({worst[0]}, {worst[1]})" in text and f"{tile} × {tile} px windows" in text


def test_missing_metrics_become_notes_and_present_ones_plots(run_dir):
    full = load_run(run_dir)
    names = list(full.scenes[0]["class_names"])
    rich = copy.deepcopy(full)
    rich.curves["odd"] = [
        {"scene": "odd", "class_index": i, "class_name": n, "threshold": t, "precision": 1 - 0.5 * r, "recall": r,
         "true_positives": 1, "false_positives": 1}
        for i, n in enumerate(names) for t, r in ((0.9, 0.2), (0.5, 0.6), (0.1, 0.9))
    ]
    rich.scenes[0]["trimap_miou"] = [0.3, 0.5, 0.6]
    for row in rich.classes["odd"]:
        row.update(average_precision=0.7, trimap_iou=[0.2, 0.4, 0.5], boundary_iou=0.4)
    page = Page(render_report(rich))
    for kind in SECTIONS:
        section = page.sections[f"odd-{kind}"]
        assert not section["notes"], (kind, section)
        assert section["tables" if kind == "metrics" else "images"] > 0, kind
    bare = copy.deepcopy(full)
    bare.curves["odd"] = []
    bare.aggregates = []
    bare.scenes[0].update(trimap_miou=None, labels=None, confusion=None, mean_iou=None)
    for row in bare.classes["odd"]:
        row.update(iou=None, dice=None, boundary_iou=None, trimap_iou=None, average_precision=None)
    page = Page(render_report(bare))
    for kind in ("metrics", "confusion", "class-metrics", "pr-curves", "trimap", "worst-tiles"):
        notes = page.sections[f"odd-{kind}"]["notes"]
        assert notes and notes[0].startswith("not computed"), kind
    assert "no labels" in page.sections["odd-confusion"]["notes"][0]
    assert page.sections["aggregates"]["notes"][0].startswith("not computed")
    assert page.sections["odd-quicklook"]["images"] >= 2  # image and mask still shown without labels
    probabilities = copy.deepcopy(full)
    probabilities.curves["odd"] = []
    assert "--save-probabilities" in Page(render_report(probabilities)).sections["odd-pr-curves"]["notes"][0]


def test_pr_curves_of_good_models_get_a_zoomed_view():
    from pipeline.core.metrics import pr_curve
    from pipeline.report_figures import pr_zoom

    rng = np.random.default_rng(0)
    good = {}
    for i, (separation, share) in enumerate([(5.0, 0.2), (6.5, 0.3), (4.5, 0.1)]):  # AP about 0.995 to 1.0
        pos, neg = int(200_000 * share), int(200_000 * (1 - share))
        scores = [1 / (1 + np.exp(-rng.normal(sign * separation / 2, 1, n))) for sign, n in ((1, pos), (-1, neg))]
        hist = [np.bincount(np.round(v * 255).astype(int), minlength=256) for v in scores]
        curve = pr_curve(*hist)
        good[i] = (curve.recall, curve.precision)
    r0, p0 = pr_zoom(good)
    assert 0.5 <= r0 < 0.99 and 0.5 <= p0 < 0.99
    for recall, precision in good.values():  # each curve's knee (best F1) lies inside the zoomed view
        f1 = 2 * recall * precision / (recall + precision)
        k = np.nanargmax(f1)
        assert recall[k] > r0 and precision[k] > p0
    poor = {0: (np.linspace(0, 1, 50), np.full(50, 0.3))}
    assert pr_zoom(poor) is None  # curves that fill the square: the whole range only


@pytest.mark.slow  # loads torch for the checkpoint
def test_training_curves_from_the_checkpoint(run_dir, tmp_path):
    from workers.models.checkpoint import save_checkpoint
    from workers.models.registry import create_model

    ckpt = tmp_path / "model.safetensors"
    provenance = {"epoch": 3, "loss_history": [1.2, 0.8, 0.6, 0.55], "validation_history": [0.3, 0.5, 0.62, 0.6],
                  "validation_mean_iou": 0.62}
    sha = save_checkpoint(ckpt, create_model("pixel_linear", 4, 5), model_name="pixel_linear", model_kwargs={},
                          bands=[1, 2, 3, 4], class_names=CLASSES, mean=[0.0] * 4, std=[1.0] * 4, provenance=provenance)
    tables = load_run(run_dir)
    tables.scenes[0].update(checkpoint=str(ckpt), checkpoint_sha256=sha)
    page = Page(render_report(tables))
    assert page.sections["training"]["images"] == 1 and not page.sections["training"]["notes"]
    assert page.image("training curves").shape[1] > 500
    tables.scenes[0]["checkpoint_sha256"] = "0" * 64
    assert "changed since the run" in Page(render_report(tables)).sections["training"]["notes"][0]
    tables.scenes[0].update(checkpoint=None, checkpoint_sha256=None)
    assert "no checkpoint" in Page(render_report(tables)).sections["training"]["notes"][0]


def test_comparison_page_of_two_runs(run_dir):
    """B: the same job with other settings and other numbers (in memory); the page shows what differs, B - A."""
    from pipeline.report_compare import COMPARE_SECTIONS, render_comparison

    a = load_run(run_dir)
    b = copy.deepcopy(a)
    b.run_dir = run_dir.parent / "other"
    b.job_id = "b" * 12
    b.spec = {**a.spec, "overlap": 32, "stitch": "crop"}
    b.scenes[0]["mean_iou"] = a.scenes[0]["mean_iou"] + 0.25
    text = render_comparison(a, b)
    page = Page(text)
    assert {s["kind"] for s in page.sections.values()} == set(COMPARE_SECTIONS)
    assert not any(s["notes"] for s in page.sections.values())
    settings = text[text.index('data-section="settings"'):text.index('data-section="classes"')]
    assert "<td>overlap</td><td>16</td><td>32</td>" in settings and "<td>stitch</td><td>blend</td><td>crop</td>" in settings
    assert "chunk_size" not in settings  # only what differs
    assert '<span class="up">+0.250</span>' in text  # mean IoU of the scene, B - A
    assert page.sections["predictions"]["images"] == 5  # image, labels, prediction A, prediction B, where they differ
    same = page.image("odd agreement")  # B's mask is A's: every scored pixel is both right or both wrong
    from pipeline.report_compare import BOTH_RIGHT, BOTH_WRONG, UNSCORED

    colours = {tuple(c) for c in np.unique(same.reshape(-1, 3), axis=0)}
    assert colours <= {BOTH_RIGHT, BOTH_WRONG, UNSCORED} and BOTH_RIGHT in colours


def test_settings_differences_and_agreement_map():
    from pipeline.report_compare import ONLY_A_RIGHT, ONLY_B_RIGHT, agreement_rgb, settings_differences

    a = {"tile_size": 64, "scenes": [{"name": "x", "image": "x.tif"}, {"name": "y", "image": "y.tif"}], "classes": ["a", "b"]}
    b = {"tile_size": 128, "scenes": [{"name": "x", "image": "x2.tif"}], "classes": ["a", "b"], "tta": "flip"}
    assert settings_differences(a, b) == [
        ("scenes[x].image", "x.tif", "x2.tif"), ("scenes[y].image", "y.tif", None), ("tile_size", 64, 128), ("tta", None, "flip")
    ]
    truth = np.array([[0, 1, -1]])
    rgb = agreement_rgb(truth, np.array([[0, 0, 1]], np.uint8), np.array([[1, 1, 0]], np.uint8), 2)
    assert tuple(rgb[0, 0]) == ONLY_A_RIGHT and tuple(rgb[0, 1]) == ONLY_B_RIGHT


def test_report_command_and_its_one_line_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.exists() and f"report: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # written atomically, nothing else left
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, fragment in [
        (["report", str(tmp_path / "missing")], "run folder not found"),
        (["report", str(empty)], "no reports/scenes/"),
        (["report", str(run_dir), "--out", str(tmp_path / "no" / "r.html")], "does not exist"),
        (["report", str(run_dir), "--job", "0000"], "no reports of job 0000"),
        (["report", str(run_dir), str(run_dir)], "the same folder twice"),
        (["report", str(run_dir), str(empty)], "no reports/scenes/"),
        (["report", str(run_dir), str(tmp_path / "missing")], "run folder not found"),
        (["report", str(run_dir), str(empty), "--job", "0000"], "--job picks a job of one RUN_DIR"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("satseg: error: ") and fragment in lines[0], err
    with pytest.raises(SystemExit) as exited:
        main(["report", "--help"])
    assert exited.value.code == 0 and "usage: satseg report" in capsys.readouterr().out


def test_job_mask_exports_as_a_valid_cog(run_dir, arrays, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    out = tmp_path / "odd.tif"
    assert main(["export", str(run_dir / "masks" / "odd.zarr"), "--cog", str(out)]) == 0
    assert cog_validate(str(out))[0]
    with rasterio.open(out) as src:
        assert np.array_equal(src.read(1), arrays[0])


def test_the_jobs_own_report_is_linked_from_its_stac_items_once_written(run_dir):
    import json

    from schemas.store import OutputLayout

    layout = OutputLayout(run_dir)
    item = layout.stac_item("odd")

    def html_linked() -> bool:
        return any(link.get("type") == "text/html" for link in json.loads(item.read_text())["links"])

    assert not layout.html_report.exists() and not html_linked()  # satseg run writes no HTML report
    assert write_report(run_dir) == layout.html_report
    assert html_linked()  # satseg report refreshed the item ...
    collection = json.loads(layout.stac_collection.read_text())
    assert any(link.get("type") == "text/html" for link in collection["links"])  # ... and the collection
