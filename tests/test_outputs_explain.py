"""Outputs that explain themselves: class colours from the job reach every output; the COG carries category names and a
QGIS style; `satseg evaluate` reads a satseg COG's class names; every mask gets a STAC item that validates offline."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import zarr
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from pipeline.cli import main
from pipeline.cog import cog_classes, export_cog
from pipeline.core.geometry import Window
from pipeline.evaluate import evaluate_mask, parse_classes
from pipeline.overviews import write_overviews
from pipeline.palette import class_colour_hexes, class_colours, mask_colours
from pipeline.quicklook import mask_rgb
from pipeline.run import ResolvedModel, job_id_of
from pipeline.stac_output import CLASSIFICATION_EXTENSION, PROJECTION_EXTENSION, write_stac
from schemas.errors import MismatchError, SpecError
from schemas.job import job_from_dict, load_job
from schemas.store import OutputLayout
from tests.mask_stores import TRANSFORM, blob_mask, write_store
from tests.test_cli import assert_one_line_error, run_cli
from workers.mask_store import create_mask_store, mark_complete, open_mask_store, stored_class_colors, write_mask_chunk
from workers.reader import SceneInfo

NAMES = ["water", "built-up area", "crops & grass"]  # a space and an XML special character on purpose
COLOURS = ["#1f78b4", "#e31a1c", "#33a02c"]
SCHEMAS = Path(__file__).parent / "stac_schemas"
SCHEMA_FILES = {PROJECTION_EXTENSION: "projection-v2.0.0.json", CLASSIFICATION_EXTENSION: "classification-v1.1.0.json"}
H, W = 90, 110


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def _coloured_store(path: Path, mask: np.ndarray, names=NAMES, colours=COLOURS, chunk: int = 64) -> Path:
    """A complete store as `satseg run` makes it: names and resolved colours in the attributes."""
    info = SceneInfo(str(path), *mask.shape, 1, "uint8", CRS.from_epsg(32633).to_wkt(), TRANSFORM, None)
    create_mask_store(path, info, chunk, class_names=names, job_id="jobabc", class_colors=class_colour_hexes(names, colours))
    for r in range(0, mask.shape[0], chunk):
        for c in range(0, mask.shape[1], chunk):
            win = Window(r, c, min(chunk, mask.shape[0] - r), min(chunk, mask.shape[1] - c))
            write_mask_chunk(path, win, mask[win.row_off : win.row_stop, win.col_off : win.col_stop])
    mark_complete(path)
    return path


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory):
    """A job folder holding one finished scene (store, a report file, an HTML report) and its exported COG."""
    root = tmp_path_factory.mktemp("explain") / "out"
    layout = OutputLayout(root)
    layout.masks.mkdir(parents=True)
    layout.job_file.write_text(json.dumps({"job_id": "jobabc"}))
    mask = blob_mask(H, W, len(NAMES), seed=4)
    _coloured_store(layout.mask_store("s1"), mask)
    classes_report = layout.report_file("classes", "jobabc", "s1")
    classes_report.parent.mkdir(parents=True)
    classes_report.write_bytes(b"PAR1")  # only its presence matters to the item's links
    layout.html_report.write_text("<html></html>")
    items = write_stac(layout, ["s1", "not_run"])
    (root / "exports").mkdir()
    cog = export_cog(layout.mask_store("s1"), root / "exports" / "s1.tif")
    return layout, mask, items, cog


# ---- the job: colours given with the classes ------------------------------------------------------------------------


def test_plain_names_keep_their_job_ids():
    """Ids as computed before classes could carry colours: an old job folder still resumes."""
    model = ResolvedModel(None, [], None, None, None, None)
    listed = {"scenes": [{"image": "/d/a.tif"}], "model": "pixel_linear", "classes": ["water", "forest", "urban"]}
    mapped = {
        "scenes": [{"image": "/d/a.tif", "labels": "/d/l.tif"}], "model": "hrnet_w18", "classes": {10: "tree", 20: "shrub"},
        "tile_size": 256,
    }
    assert job_id_of(job_from_dict(listed), model, "cpu") == "6376b3dfbb87"
    assert job_id_of(job_from_dict(mapped), model, "cpu") == "225fc94df582"
    named = {**listed, "classes": [{"name": "water"}, "forest", {"name": "urban"}]}  # entries without colour: plain names
    assert job_from_dict(named).identity() == job_from_dict(listed).identity()
    coloured = {**listed, "classes": [{"name": "water", "color": "#1F78B4"}, "forest", "urban"]}
    as_rgb = {**listed, "classes": [{"name": "water", "color": [31, 120, 180]}, "forest", "urban"]}
    assert job_id_of(job_from_dict(coloured), model, "cpu") != "6376b3dfbb87"  # colours change the COG: another job
    assert job_from_dict(coloured).identity() == job_from_dict(as_rgb).identity()  # one colour, however written


def test_both_class_forms_take_colours(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "scenes: [{image: a.tif}]\nmodel: pixel_linear\nclasses:\n"
        '  0: {name: background, color: "#000000"}\n  2: {name: water, color: [31, 120, 180]}\n  5: urban\n'
    )
    spec = load_job(job)
    assert spec.class_names == ["background", "water", "urban"] and spec.label_values == [0, 2, 5]
    assert spec.class_colors == ["#000000", "#1f78b4", None]
    listed = job_from_dict({"scenes": [{"image": "a.tif"}], "model": "m", "classes": [{"name": "a", "color": "#ABCDEF"}, "b"]})
    assert listed.class_names == ["a", "b"] and listed.class_colors == ["#abcdef", None]
    assert job_from_dict({"scenes": [{"image": "a.tif"}], "model": "m", "classes": ["a"]}).class_colors is None
    again = job_from_dict(json.loads(json.dumps(spec.model_dump(mode="json"))))  # the job record reads back the same
    assert again.identity() == spec.identity()


@pytest.mark.parametrize(
    "classes, fragment",
    [
        ("\n  - name: a\n    color: #1f78b4", "quote it"),  # YAML reads an unquoted # as a comment: no colour
        (' [{name: a, color: "blue"}]', "neither \"#rrggbb\" nor [r, g, b]"),
        (" [{name: a, color: [1, 2, 300]}]", "neither"),
        (' [{name: a, colour: "#000000"}]', "unknown key 'colour'"),
        (' [{color: "#000000"}]', "give its `name`"),
        (" [a, 3]", "class 1: give a name"),
        (' {1: a, 2: {name: a, color: "#000000"}}', "must be unique"),
    ],
)
def test_bad_colours_are_one_line_errors(capsys, tmp_path, classes, fragment):
    job = tmp_path / "job.yaml"
    job.write_text(f"scenes: [{{image: a.tif}}]\nmodel: pixel_linear\nclasses:{classes}\n")
    with pytest.raises(SpecError, match="job.yaml"):
        load_job(job)
    code, _, err = run_cli(capsys, "run", str(job))
    assert_one_line_error(code, err, "job.yaml", fragment)


def test_given_colours_win_and_defaults_stay_apart():
    defaults = class_colour_hexes(4)
    assert class_colour_hexes(NAMES, COLOURS) == COLOURS
    assert class_colour_hexes(4, [None, "#ABCDEF"]) == [defaults[0], "#abcdef", defaults[2], defaults[3]]
    taken = class_colour_hexes(3, [None, None, defaults[0]])  # class 2 took class 0's default colour
    assert taken[2] == defaults[0] and taken[0] != defaults[0] and len(set(taken)) == 3
    assert (class_colours(3, [[1, 2, 3]])[0] == [1, 2, 3]).all()


# ---- the mask store, quicklooks and report legend -------------------------------------------------------------------


def test_the_mask_store_carries_names_and_colours(job_folder):
    layout, *_ = job_folder
    store = layout.mask_store("s1")
    attrs = zarr.open_array(str(store), path="mask", mode="r").attrs
    assert json.loads(attrs["class_names"]) == NAMES and json.loads(attrs["class_colors"]) == COLOURS
    assert open_mask_store(store, then="x").class_colors == COLOURS == stored_class_colors(store)
    plain = write_store(layout.root.parent / "plain.zarr", blob_mask(20, 20, 2, seed=1), 16, ["a", "b"])
    assert stored_class_colors(plain) is None  # a store from before colours: readers fall back to the defaults
    assert mask_colours(["a", "b"], plain).tolist() == class_colours(2).tolist()


def test_overview_levels_carry_the_classes_too(tmp_path):
    store = _coloured_store(tmp_path / "big.zarr", blob_mask(1100, 600, len(NAMES), seed=2), chunk=512)
    write_overviews(store)
    level = zarr.open_array(str(store), path="1/mask", mode="r").attrs
    assert json.loads(level["class_names"]) == NAMES and json.loads(level["class_colors"]) == COLOURS


def test_quicklook_and_report_legend_take_the_stores_colours(job_folder):
    layout, mask, *_ = job_folder
    colours = mask_colours(NAMES, layout.mask_store("s1"))
    assert [tuple(c) for c in colours] == [_rgb(c) for c in COLOURS]
    assert mask_colours(NAMES, layout.mask_store("s1") / "mask").tolist() == colours.tolist()  # the array's own path
    rgb, has = mask_rgb(mask, colours)
    for k, colour in enumerate(COLOURS):
        assert (rgb[mask == k] == _rgb(colour)).all()
    assert not has[mask == 255].any()
    assert mask_colours(["x"], layout.mask_store("s1")).tolist() == class_colours(1).tolist()  # other classes: defaults


# ---- the COG: colour table, category names GDAL reads, a QGIS style -------------------------------------------------


def test_cog_colour_table_and_tags_follow_the_job(job_folder):
    *_, cog = job_folder
    with rasterio.open(cog.path) as src:
        cmap, tags = src.colormap(1), src.tags()
    assert [cmap[k][:3] for k in range(len(NAMES))] == [_rgb(c) for c in COLOURS] and cmap[255][3] == 0
    assert json.loads(tags["satseg_class_names"]) == NAMES and json.loads(tags["satseg_class_colors"]) == COLOURS
    assert cog_classes(cog.path) == (NAMES, COLOURS)


def test_gdal_reads_the_category_names_and_attribute_table(job_folder, tmp_path):
    """What GDAL itself makes of OUT.tif with its sidecar: a VRT copy writes out the band's category names and RAT."""
    *_, cog = job_folder
    assert cog.categories == cog.path.with_name("s1.tif.aux.xml")
    vrt = tmp_path / "seen_by_gdal.vrt"
    rasterio.shutil.copy(cog.path, vrt, driver="VRT")
    band = ET.parse(vrt).getroot().find("VRTRasterBand")
    assert [c.text for c in band.find("CategoryNames")] == NAMES
    rat = band.find("GDALRasterAttributeTable")
    fields = [f.find("Name").text for f in rat.findall("FieldDefn")]
    assert fields == ["Value", "Class", "Red", "Green", "Blue", "Alpha"]
    rows = [[f.text for f in row.findall("F")] for row in rat.findall("Row")]
    assert rows == [[str(k), n, *(str(v) for v in _rgb(c)), "255"] for k, (n, c) in enumerate(zip(NAMES, COLOURS))]


def test_the_qgis_style_is_a_paletted_renderer_with_names(job_folder):
    *_, cog = job_folder
    assert cog.style == cog.path.with_suffix(".qml")  # QGIS loads a style of the raster's base name by itself
    root = ET.parse(cog.style).getroot()
    assert root.tag == "qgis"
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [(e.get("value"), e.get("color"), e.get("label"), e.get("alpha")) for e in renderer.findall("colorPalette/paletteEntry")]
    assert entries == [(str(k), c, n, "255") for k, (n, c) in enumerate(zip(NAMES, COLOURS))]


def test_sidecars_hold_any_class_name_as_text(tmp_path):
    """Markup characters are escaped; a control character (which XML cannot hold at all) is written as its escape."""
    names = ['a<b>', 'x & "y"', "it's", "tab\there", "bell\x07", "nul\x00"]
    shown = names[:4] + ["bell\\x07", "nul\\x00"]
    store = _coloured_store(tmp_path / "m.zarr", np.arange(6, dtype=np.uint8).reshape(2, 3), names, [None] * 6, chunk=2)
    cog = export_cog(store, tmp_path / "m.tif")
    entries = ET.parse(cog.style).getroot().findall("pipe/rasterrenderer/colorPalette/paletteEntry")
    assert [e.get("label") for e in entries] == shown
    vrt = tmp_path / "seen_by_gdal.vrt"  # GDAL's reading of the PAM sidecar, as in the test above
    rasterio.shutil.copy(cog.path, vrt, driver="VRT")
    band = ET.parse(vrt).getroot().find("VRTRasterBand")
    assert [c.text for c in band.find("CategoryNames")] == shown
    assert [row.findall("F")[1].text for row in band.find("GDALRasterAttributeTable").findall("Row")] == shown
    assert cog_classes(cog.path)[0] == names  # the tags (JSON) keep the names exactly


# ---- evaluate reads a satseg COG's class names ----------------------------------------------------------------------


def _labels(path: Path, values: np.ndarray) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", height=H, width=W, count=1, dtype="uint8", crs="EPSG:32633",
        transform=rasterio.Affine(*TRANSFORM), nodata=255,
    ) as dst:
        dst.write(values, 1)
    return path


def test_evaluate_names_the_classes_of_a_satseg_cog(job_folder, tmp_path, capsys):
    _, mask, _, cog = job_folder
    truth = mask.copy()
    truth[truth == 2] = 1  # class 2 is always wrong, classes 0 and 1 right where the mask says them
    labels = _labels(tmp_path / "labels.tif", truth)
    result = evaluate_mask(cog.path, labels)  # no --classes: the COG's own
    assert result.class_names == NAMES
    assert result.metrics.iou[0] == 1.0 and result.metrics.iou[2] == 0.0
    code, out, err = run_cli(capsys, "evaluate", str(cog.path), str(labels))
    assert code == 0 and "water" in out, err
    # an explicit mapping names the label values; the COG still holds class indices
    mapped = _labels(tmp_path / "mapped.tif", np.where(truth == 255, 255, truth * 10 + 10).astype(np.uint8))
    table = parse_classes(",".join(f"{10 * k + 10}={n}" for k, n in enumerate(NAMES)))
    assert evaluate_mask(cog.path, mapped, classes=table).metrics.iou.tolist() == result.metrics.iou.tolist()
    with pytest.raises(MismatchError, match="differ from the given"):
        evaluate_mask(cog.path, labels, classes=parse_classes("a,b,c"))


# ---- STAC: an item per mask, a collection per job -------------------------------------------------------------------


def _validator():
    """pystac's JSON-schema validator over the official schemas, offline: core from pystac, extensions vendored."""
    pytest.importorskip("pystac")
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    class Offline(JsonSchemaSTACValidator):
        def _get_schema(self, schema_uri: str):
            if schema_uri not in self.schema_cache:
                raise AssertionError(f"{schema_uri}: not vendored; validation would fetch it from the web")
            return super()._get_schema(schema_uri)

    validator = Offline()
    for uri, name in SCHEMA_FILES.items():
        validator.schema_cache[uri] = json.loads((SCHEMAS / name).read_text())
    return validator


def test_items_and_the_collection_validate_against_the_official_schemas(job_folder):
    import pystac
    from pystac.validation import validate_dict

    layout, _, items, cog = job_folder
    validator = _validator()
    assert items == [layout.stac_item("s1")]  # a scene that never ran gets none
    item = json.loads(layout.stac_item("s1").read_text())
    schemas = validate_dict(item, validator=validator)
    assert set(schemas) == {"https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json", *SCHEMA_FILES}
    collection = json.loads(layout.stac_collection.read_text())
    assert validate_dict(collection, validator=validator)
    assert pystac.Item.from_dict(item, migrate=False).validate(validator=validator)
    assert pystac.Collection.from_dict(collection, migrate=False).validate(validator=validator)
    broken = json.loads(json.dumps(item))
    broken["assets"]["mask"]["classification:classes"][0]["color_hint"] = "#1f78b4"  # the spec's hint has no '#'
    with pytest.raises(pystac.errors.STACValidationError):
        validate_dict(broken, validator=validator)


def test_the_item_says_where_what_and_which_classes(job_folder):
    layout, _, _, cog = job_folder
    item = json.loads(layout.stac_item("s1").read_text())
    props = item["properties"]
    assert props["proj:code"] == "EPSG:32633" and "UTM zone 33N" in props["proj:wkt2"]
    assert props["proj:shape"] == [H, W] and props["proj:transform"] == list(TRANSFORM)
    x0, y0 = TRANSFORM[2], TRANSFORM[5]
    assert props["proj:bbox"] == [x0, y0 - 10 * H, x0 + 10 * W, y0]
    expected = transform_bounds("EPSG:32633", "EPSG:4326", *props["proj:bbox"], densify_pts=50)
    assert np.allclose(item["bbox"], expected, atol=1e-7)
    ring = item["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:])) > 0  # counterclockwise
    for key in ("mask", "cog"):
        classes = item["assets"][key]["classification:classes"]
        assert [(c["value"], c["name"], c.get("color_hint")) for c in classes] == [
            *((k, n, c[1:]) for k, (n, c) in enumerate(zip(NAMES, COLOURS))), (255, "nodata", None)
        ]
        assert classes[-1]["nodata"] is True
    folder = layout.stac_item("s1").parent
    resolved = {k: (folder / a["href"]).resolve() for k, a in item["assets"].items()}
    assert resolved["mask"] == layout.mask_store("s1").resolve() and resolved["cog"] == cog.path.resolve()
    assert resolved["cog_style"] == cog.style.resolve() and resolved["cog_categories"] == cog.categories.resolve()
    links = {(link["rel"], (folder / link["href"]).resolve()) for link in item["links"]}
    assert ("describedby", layout.report_file("classes", "jobabc", "s1").resolve()) in links
    assert ("describedby", layout.html_report.resolve()) in links
    assert ("collection", layout.stac_collection.resolve()) in links
    assert cog.stac_item == layout.stac_item("s1")


def test_rewriting_an_item_keeps_the_exported_cog_and_the_collection_links_it(job_folder):
    layout, *_ = job_folder
    write_stac(layout, ["s1"])  # what a rerun of the job does
    item = json.loads(layout.stac_item("s1").read_text())
    assert {"mask", "cog", "cog_style", "cog_categories"} <= set(item["assets"])
    collection = json.loads(layout.stac_collection.read_text())
    assert collection["id"] == item["collection"] == "satseg-jobabc"
    assert [link["href"] for link in collection["links"] if link["rel"] == "item"] == ["items/s1.json"]
    assert collection["extent"]["spatial"]["bbox"] == [item["bbox"]]
    assert collection["extent"]["temporal"]["interval"] == [[item["properties"]["datetime"]] * 2]


def test_a_mask_without_a_crs_gets_an_item_without_geometry(tmp_path):
    from pystac.validation import validate_dict

    layout = OutputLayout(tmp_path / "out")
    layout.masks.mkdir(parents=True)
    layout.job_file.write_text(json.dumps({"job_id": "nocrs"}))
    info = SceneInfo("x", 20, 30, 1, "uint8", None, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), None)
    create_mask_store(layout.mask_store("plain"), info, 32, class_names=["a", "b"], job_id="nocrs")
    write_mask_chunk(layout.mask_store("plain"), Window(0, 0, 20, 30), np.zeros((20, 30), np.uint8))
    mark_complete(layout.mask_store("plain"))
    assert write_stac(layout, ["plain"]) == [layout.stac_item("plain")]
    item = json.loads(layout.stac_item("plain").read_text())
    assert item["geometry"] is None and "bbox" not in item
    assert item["properties"]["proj:code"] is None and item["properties"]["proj:shape"] == [20, 30]
    validator = _validator()
    validate_dict(item, validator=validator)
    validate_dict(json.loads(layout.stac_collection.read_text()), validator=validator)


def test_a_mask_without_a_crs_exports_quietly(tmp_path):
    """A plain image's mask (no CRS, the identity transform the reader gives it) exports without rasterio's warnings."""
    from rasterio.errors import NotGeoreferencedWarning

    info = SceneInfo("x", 20, 30, 1, "uint8", None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), None)
    create_mask_store(tmp_path / "plain.zarr", info, 16, class_names=["a", "b"], job_id="nocrs")
    for r in (0, 16):
        for c in (0, 16):
            win = Window(r, c, min(16, 20 - r), min(16, 30 - c))
            write_mask_chunk(tmp_path / "plain.zarr", win, np.ones((win.height, win.width), np.uint8))
    mark_complete(tmp_path / "plain.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)
        cog = export_cog(tmp_path / "plain.zarr", tmp_path / "plain.tif")
        assert cog_classes(cog.path) == (["a", "b"], class_colour_hexes(["a", "b"], None))
    with rasterio.open(cog.path) as src:
        assert src.crs is None and (src.read(1) == 1).all()


# ---- end to end: a job with coloured classes ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_with_coloured_classes_colours_every_output(capsys, tmp_path, odd_scene, ray_local):
    from tests.conftest import CLASSES

    colours = ["#a6cee3", "#1f78b4", "#b2df8a", "#33a02c", "#fb9a99"]
    classes = "".join(f'\n  - {{name: {n}, color: "{c}"}}' for n, c in zip(CLASSES, colours))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"scenes: [{{image: {odd_scene.image}, labels: {odd_scene.labels}, name: odd}}]\nmodel: pixel_linear\n"
        f"classes:{classes}\ntile_size: 64\noverlap: 0\nnum_actors: 1\nout: out\n"
    )
    code, _, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    layout = OutputLayout(tmp_path / "out")
    assert stored_class_colors(layout.mask_store("odd")) == colours
    item = json.loads(layout.stac_item("odd").read_text())
    assert [c.get("color_hint") for c in item["assets"]["mask"]["classification:classes"]][:-1] == [c[1:] for c in colours]
    assert main(["export", str(layout.mask_store("odd")), "--cog", str(tmp_path / "odd.tif")]) == 0
    assert cog_classes(tmp_path / "odd.tif") == (CLASSES, colours)
    assert 'label="water"' in (tmp_path / "odd.qml").read_text()
    item = json.loads(layout.stac_item("odd").read_text())
    assert "cog" in item["assets"]
    assert main(["report", str(layout.root)]) == 0
    page = layout.html_report.read_text()
    for c in colours:
        assert f"background: rgb{_rgb(c)}" in page  # the legend swatches
    code, out, err = run_cli(capsys, "evaluate", str(tmp_path / "odd.tif"), str(odd_scene.labels))
    assert code == 0 and "per-class metrics" in out and "water" in out, err
    from pystac.validation import validate_dict

    validator = _validator()
    validate_dict(json.loads(layout.stac_item("odd").read_text()), validator=validator)
    validate_dict(json.loads(layout.stac_collection.read_text()), validator=validator)
