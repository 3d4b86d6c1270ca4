"""STAC Items as inputs: one-band assets picked by common name (STAC 1.0 eo:bands, STAC 1.1 bands) or asset key,
stacked on the fly as VRT text, equal to the multi-band file they were cut from; read from relative local hrefs
and over HTTP (a real Range-honouring server on 127.0.0.1); every mistake one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.geometry import Window
from pipeline.synthetic import write_synthetic_scene
from schemas.errors import InputFileError
from schemas.job import job_from_dict, load_job
from tests.remote_servers import range_server, stac_asset, write_coarse_band, write_single_bands, write_stac_item
from workers.reader import dataset_name, grid_difference, open_scene, read_image_window
from workers.stac_input import open_stac_scene

NAMES = ["blue", "green", "red", "nir"]  # the synthetic scene's band order


def read_all(path: str, info, bands) -> tuple[np.ndarray, np.ndarray]:
    data = read_image_window(path, Window(-7, -5, info.height + 12, info.width + 9), bands, [0.0] * len(bands), [1.0] * len(bands))
    return data.pixels, data.has_data


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 4-band scene (even size: its 20 m versions cover the same extent), cut into one file per band."""
    root = tmp_path_factory.mktemp("stac")
    scene = write_synthetic_scene(root, "s2", 160, 224, seed=3, cell=40)
    write_single_bands(Path(scene.image), root / "assets", NAMES)
    return scene, root


@pytest.fixture(scope="module")
def served(scene):
    _, root = scene
    with range_server(root) as server:
        write_stac_item(root / "http_item.json", {n: stac_asset(server.url(f"assets/{n}.tif"), n) for n in NAMES})
        write_stac_item(root / "items" / "relative.json", {n: stac_asset(f"../assets/{n}.tif", n) for n in NAMES})
        yield server


def test_relative_local_assets_stack_in_the_order_asked(scene):
    image, root = scene
    item = write_stac_item(root / "items" / "local.json", {n: stac_asset(f"../assets/{n}.tif", n) for n in NAMES})
    order = ["nir", "red", "green", "blue"]
    info = open_scene(str(item), stac_bands=order)
    local = open_scene(image.image)
    assert info.path == str(item) and info.count == 4 and info.dtype == local.dtype and info.nodata == local.nodata
    assert grid_difference(local, info) is None  # same CRS, transform and shape as the file the bands came from
    assert info.dataset.startswith("<VRTDataset") and dataset_name(info.dataset) == f"{item} [nir, red, green, blue]"
    pixels, has_data = read_all(info.dataset, info, [1, 2, 3, 4])
    want_pixels, want_data = read_all(str(image.image), local, [4, 3, 2, 1])
    assert np.array_equal(pixels, want_pixels) and np.array_equal(has_data, want_data)  # nodata swath included


def test_items_and_assets_over_http(scene, served):
    image, _ = scene
    local = open_scene(image.image)
    want = read_all(str(image.image), local, [1, 2, 3, 4])
    before = len(served.requests)
    for item in (served.url("http_item.json"), served.url("items/relative.json")):  # absolute hrefs, and relative to the URL
        info = open_scene(item, stac_bands=NAMES)
        assert info.path == item and grid_difference(local, info) is None
        got = read_all(info.dataset, info, [1, 2, 3, 4])
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    reads = [r for r in served.requests[before:] if r.path.startswith("/assets/") and r.method == "GET"]
    assert {r.path for r in reads} == {f"/assets/{n}.tif" for n in NAMES}
    assert all(r.status == 206 and r.range for r in reads), reads  # assets are read by range, never copied


def test_stac_1_1_bands_asset_keys_and_multi_band_assets(scene):
    image, root = scene
    assets = {
        "visual": stac_asset(str(image.image), *NAMES, version="1.1.0"),  # all four bands in one file
        "B04": stac_asset("../assets/red.tif", "red", version="1.1.0"),  # a one-band asset wins a common name
        "B08": {"href": "../assets/nir.tif", "type": "image/tiff"},  # no band info: found by its key
    }
    item = write_stac_item(root / "items" / "v11.json", assets, version="1.1.0")
    info = open_stac_scene(str(item), ["B08", "red", "green"])
    assert '<SourceFilename relativeToVRT="0">' + str(image.image) + "</SourceFilename>" in info.source
    assert "<SourceBand>2</SourceBand>" in info.source  # green: the second band of the visual asset
    got = read_all(info.dataset, info, [1, 2, 3])
    want = read_all(str(image.image), open_scene(image.image), [4, 3, 2])
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_coarser_bands_over_the_same_extent_are_resampled_by_nearest_neighbour(scene):
    image, root = scene
    coarse = write_coarse_band(Path(image.image), root / "assets" / "swir16_20m.tif", 1, 2)
    assets = {n: stac_asset(f"../assets/{n}.tif", n) for n in NAMES}
    assets["swir16"] = stac_asset("../assets/swir16_20m.tif", "swir16")
    item = write_stac_item(root / "items" / "mixed.json", assets)
    info = open_scene(str(item), stac_bands=["swir16", "red"])  # the grid is the finest band's, whatever the order
    assert grid_difference(open_scene(image.image), info) is None
    pixels, _ = read_all(info.dataset, info, [1, 2])
    inside = pixels[:, 7 : 7 + info.height, 5 : 5 + info.width]
    assert np.array_equal(inside[0], np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1))  # 20 m values, as stored
    shifted = root / "assets" / "swir22_shifted.tif"
    write_coarse_band(Path(image.image), shifted, 1, 2, shift=5.0)
    assets["swir22"] = stac_asset("../assets/swir22_shifted.tif", "swir22")
    item = write_stac_item(root / "items" / "shifted.json", assets)
    with pytest.raises(InputFileError) as err:
        open_scene(str(item), stac_bands=["red", "swir22"])
    assert str(err.value) == (
        f"{item}: asset 'swir22' (swir22) is not on the grid of asset 'red' (red): transform differs; "
        "pick bands that cover the same extent in the same CRS"
    )


def test_a_band_not_in_the_item_lists_what_is(scene, served, capsys, tmp_path):
    _, root = scene
    url = served.url("http_item.json")
    with pytest.raises(InputFileError) as err:
        open_scene(url, stac_bands=["red", "swir16"])
    assert str(err.value) == (
        f"{url}: no asset of band 'swir16'; common names here: blue, green, nir, red; asset keys: blue, green, red, nir; "
        "give stac_bands from those"
    )
    code = main(["run", "--image", url, "--stac-bands", "red,rededge", "--model", "pixel_linear", "--classes", "a,b",
                 "--out", str(tmp_path / "o"), "--quiet"])
    text = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in text and text.startswith(f"satseg: error: {url}: no asset of band 'rededge'; "), text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "STAC item not found; check the path"),
        ("{not json", "not a STAC item (not JSON"),
        ("[" * 100_000, "not a STAC item (not JSON: maximum recursion depth"),  # nested deeper than Python's parser goes
        (json.dumps({"type": "FeatureCollection", "features": []}), "a FeatureCollection (a search result), not one STAC item"),
        (json.dumps({"type": "Collection", "id": "c"}), "a STAC Collection, not an item"),
        (json.dumps({"type": "Feature", "properties": {}}), "not a STAC item (an item is a GeoJSON Feature with `assets`)"),
    ],
)
def test_what_is_not_an_item_is_one_line(tmp_path, content, fragment):
    item = tmp_path / "item.json"
    if content is not None:
        item.write_text(content)
    with pytest.raises(InputFileError) as err:
        open_scene(str(item), stac_bands=["red"])
    assert str(err.value).startswith(f"{item}: {fragment}") and "\n" not in str(err.value), str(err.value)


def test_missing_items_and_assets_over_http(scene, served):
    _, root = scene
    with pytest.raises(InputFileError, match=r": STAC item not found \(HTTP 404\); check the URL$"):
        open_scene(served.url("nope.json"), stac_bands=["red"])
    write_stac_item(root / "broken.json", {"red": stac_asset(served.url("assets/gone.tif"), "red")})
    with pytest.raises(InputFileError) as err:
        open_scene(served.url("broken.json"), stac_bands=["red"])
    assert str(err.value).startswith(f"{served.url('broken.json')}: asset 'red' (red): {served.url('assets/gone.tif')}: ")
    assert "file not found" in str(err.value)


def test_an_item_given_as_a_raster_says_to_give_its_bands(scene, capsys, tmp_path):
    _, root = scene
    item = write_stac_item(root / "items" / "plain.json", {n: stac_asset(f"../assets/{n}.tif", n) for n in NAMES})
    code = main(["run", "--image", str(item), "--model", "pixel_linear", "--classes", "a,b", "--out", str(tmp_path / "o")])
    text = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in text and "--stac-bands blue,green,red,nir" in text, text


def test_a_stac_scene_in_a_job_file(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "scenes:\n"
        "  - {image: items/S2B_32UQD.json, stac_bands: [nir, red, green]}\n"
        "  - {image: 'https://stac.example/items/S2A_33UUP', stac_bands: [red], labels: 'gs://bucket/l.tif'}\n"
        "model: pixel_linear\nclasses: [a, b]\n"
    )
    spec = load_job(tmp_path / "job.yaml")
    first, second = spec.scenes
    assert str(first.image) == str(tmp_path / "items" / "S2B_32UQD.json") and first.stac_bands == ["nir", "red", "green"]
    assert str(second.image) == "https://stac.example/items/S2A_33UUP" and [first.scene_name, second.scene_name] == ["S2B_32UQD", "S2A_33UUP"]
    assert [s.get("stac_bands") for s in spec.identity()["scenes"]] == [["nir", "red", "green"], ["red"]]
    assert job_from_dict(spec.model_dump(mode="json")) == spec
    other = job_from_dict({**spec.model_dump(mode="json"), "scenes": [{**spec.model_dump(mode="json")["scenes"][0], "stac_bands": ["red"]}]})
    assert other.identity() != spec.identity()
    for bad, message in ((["red", "red"], "listed twice"), ([], "give 1 to 64 band names"), ([""], "1 to 64 characters")):
        with pytest.raises(ValueError, match=message):
            job_from_dict({"scenes": [{"image": "i.json", "stac_bands": bad}], "model": "pixel_linear", "classes": ["a"]})


@pytest.mark.slow
def test_a_job_over_a_stac_item_and_an_http_raster_equals_the_local_job(ray_local, scene, served, tmp_path):
    """One job through Ray: the local file, the same file over HTTP, and its bands stacked from a STAC item over
    HTTP give one mask, bit for bit; the reports name the inputs as given."""
    import pyarrow.parquet as pq
    import zarr

    from pipeline.run import run_job
    from tests.conftest import TINY

    image, _ = scene
    labels = served.url("s2_labels.tif")
    scenes = [
        {"image": str(image.image), "labels": str(image.labels), "name": "local"},
        {"image": served.url("s2.tif"), "labels": labels, "name": "http"},
        {"image": served.url("http_item.json"), "stac_bands": NAMES, "labels": labels, "name": "stac"},
    ]
    spec = job_from_dict({
        "scenes": scenes, "model": "hrnet_w18_small_v1", "model_options": TINY, "classes": ["a", "b", "c", "d", "e"],
        "tile_size": 64, "overlap": 16, "chunk_size": 100, "batch_size": 4, "stitch": "blend", "num_actors": 1,
        "out": str(tmp_path / "out"),
    })
    result = run_job(spec, show_progress=False)
    masks = {s.name: zarr.open_array(str(s.mask), path="mask", mode="r")[:] for s in result.scenes}
    assert np.array_equal(masks["http"], masks["local"]) and np.array_equal(masks["stac"], masks["local"])
    assert len({s.metrics.mean_iou for s in result.scenes}) == 1
    rows = {r["scene"]: r for r in pq.read_table(tmp_path / "out" / "reports" / "scenes").to_pylist()}
    assert rows["stac"]["image"] == served.url("http_item.json") and rows["http"]["labels"] == labels
    # the HTML report shows each scene's image and labels, read as the job read them: a file, HTTP, a STAC item's bands
    from pipeline.report import load_run, _scene_context, _views
    from pipeline.core.geometry import Window

    tables = load_run(tmp_path / "out")
    views = {}
    for row in tables.scenes:
        ctx = _scene_context(tables, row)
        assert not ctx.unreadable, ctx.unreadable
        views[row["scene"]] = _views(ctx, Window(0, 0, int(row["height"]), int(row["width"])), 96, overview=True)
    for name in ("http", "stac"):
        for key in ("image", "labels", "error"):
            assert np.array_equal(views[name][key], views["local"][key]), (name, key)
    from pipeline.report import write_report

    page = write_report(tmp_path / "out").read_text()
    assert "image not shown" not in page and "labels and error map not shown" not in page
