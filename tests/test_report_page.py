"""`satseg report RUN_DIR`: a real job's self-contained HTML report holds every section, and every image decodes."""

from __future__ import annotations

import base64
import copy
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

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
    assert page.sections["odd-worst-tiles"]["images"] == 3 * report_page.WORST_TILES


def test_error_map_marks_each_pixel_against_the_labels(run_dir, arrays, tmp_path):
    mask, labels = arrays
    page = Page(write_report(run_dir, tmp_path / "report.html").read_text())
    got = page.image("odd error map")
    assert got.shape == (*mask.shape, 3)  # small scene: shown at full resolution
    assert np.array_equal(got, expected_error_map(mask, labels, np.arange(mask.shape[0]), np.arange(mask.shape[1])))
    assert (got == TP_COLOUR).all(axis=-1).any() and (got == WRONG_COLOUR).all(axis=-1).any()


def test_decimated_quicklook_uses_the_overview_level_and_full_resolution_errors(run_dir, arrays, tmp_path, monkeypatch):
    mask, labels = arrays
    store = run_dir / "masks" / "odd.zarr"
    write_overviews(store, max_size=128)
    monkeypatch.setattr(report_page, "QUICKLOOK_SIDE", 150)
    text = write_report(run_dir, tmp_path / "report.html").read_text()
    page = Page(text)
    assert "from the overview level 1 (1/2)" in text
    assert page.image("odd mask overlay").shape == (123, 150, 3)
    rows, cols = sample_positions(0, 301, 123), sample_positions(0, 367, 150)
    assert np.array_equal(page.image("odd error map"), expected_error_map(mask, labels, rows, cols))


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
    for row in bare.tiles["odd"]:
        row.update(mean_iou=None)
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


@pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(), reason="chromium not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    cmd = [
        shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,4000", page.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (4000, 1400, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # images and plots drawn, not a blank page
    header = pixels[:40, :, :].reshape(-1, 3)
    assert (np.abs(header.astype(int) - (29, 43, 69)).sum(axis=1) < 10).mean() > 0.5  # the inline CSS applied
