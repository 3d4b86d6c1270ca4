"""The command line: help, job files, and every bad input as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.cli import main
from tests.conftest import CLASSES, TINY


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("satseg: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def write_tif(path, data, *, transform=None, crs="EPSG:32633", nodata=None):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    with rasterio.open(
        path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0], dtype=data.dtype,
        crs=crs, transform=transform or from_origin(500000, 4600000, 10, 10), nodata=nodata,
    ) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("command", ["run", "evaluate", "query", "train", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: satseg " + command in capsys.readouterr().out


def test_missing_image(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--image", str(tmp_path / "nope.tif"), "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "nope.tif", "not found")
    assert not (tmp_path / "o").exists()


def test_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    code, _, err = run_cli(capsys, "run", "--image", str(bad), "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "bad.tif", "not a readable raster")


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"shape": (40, 50)}, "shape"),
        ({"crs": "EPSG:4326"}, "CRS"),
        ({"transform": from_origin(500010, 4600000, 10, 10)}, "transform"),
    ],
)
def test_labels_that_do_not_line_up(capsys, tmp_path, odd_scene, change, fragment):
    with rasterio.open(odd_scene.image) as src:
        shape = (src.height, src.width)
    labels = write_tif(
        tmp_path / "labels.tif", np.zeros(change.get("shape", shape), np.uint8),
        transform=change.get("transform"), crs=change.get("crs", "EPSG:32633"),
    )
    code, _, err = run_cli(capsys, "run", "--image", str(odd_scene.image), "--labels", str(labels), "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "labels.tif", fragment)
    assert not (tmp_path / "o").exists()


def test_band_that_does_not_exist(capsys, tmp_path, odd_scene):
    code, _, err = run_cli(capsys, "run", "--image", str(odd_scene.image), "--bands", "1,9", "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "band 9 does not exist", "odd.tif")


@pytest.fixture
def three_band_checkpoint(tmp_path):
    from workers.models import create_model, save_checkpoint

    ckpt = tmp_path / "three.safetensors"
    save_checkpoint(ckpt, create_model("hrnet_w18_small_v1", 3, 2, **TINY), model_name="hrnet_w18_small_v1",
                    model_kwargs=TINY, bands=[1, 2, 3], class_names=["a", "b"], mean=[0, 0, 0], std=[1, 1, 1])
    return ckpt


def test_checkpoint_with_other_bands_or_classes(capsys, tmp_path, odd_scene, three_band_checkpoint):
    code, _, err = run_cli(capsys, "run", "--image", str(odd_scene.image), "--checkpoint", str(three_band_checkpoint), "--bands", "1,2,3,4", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "three.safetensors", "bands")
    code, _, err = run_cli(capsys, "run", "--image", str(odd_scene.image), "--checkpoint", str(three_band_checkpoint), "--classes", "x,y,z", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "three.safetensors", "classes")
    code, _, err = run_cli(capsys, "run", "--image", str(odd_scene.image), "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "missing.safetensors")
    assert not (tmp_path / "o").exists()


def test_run_object_flags_set_the_job_and_its_id(tmp_path):
    import argparse
    from types import SimpleNamespace

    from pipeline.cli import objects as objects_cli
    from pipeline.cli import run as run_cli
    from pipeline.run import job_id_of

    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    image = ["--image", "a.tif", "--model", "hrnet_w18_small_v1", "--classes", "road,building,pond"]
    flags = ["--things", " building, ,pond", "--connectivity", "8", "--simplify", "2.5"]
    spec = run_cli.spec_from_args(parser.parse_args(image + flags))
    assert (spec.things, spec.connectivity, spec.simplify) == (["building", "pond"], 8, 2.5)
    assert spec.things == objects_cli.thing_names(" building, ,pond")  # one comma rule for `run` and `objects`
    plain = run_cli.spec_from_args(parser.parse_args(image))
    assert (plain.things, plain.connectivity, plain.simplify) == (None, 4, None)
    assert not {"things", "connectivity", "simplify"} & set(plain.identity())  # LATER_FIELDS at their old values
    model = SimpleNamespace(checkpoint_sha256=None, init_sha256=None)
    ids = {job_id_of(run_cli.spec_from_args(parser.parse_args(image + extra)), model, "cpu") for extra in (
        [], flags[:2], flags[2:4], flags[4:], ["--connectivity", "4"],
    )}
    assert len(ids) == 4  # each object flag is another job; the default connectivity is the same job as none
    job = tmp_path / "job.yaml"  # flags override a job file's fields
    job.write_text("scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\nclasses: [road, building, pond]\nthings: [road]\n")
    spec = run_cli.spec_from_args(parser.parse_args([str(job), "--things", "pond", "--simplify", "1"]))
    assert (spec.things, spec.connectivity, spec.simplify) == (["pond"], 4, 1.0)
    assert run_cli.spec_from_args(parser.parse_args([str(job), "--connectivity", "8"])).things == ["road"]


def test_run_object_flags_refuse_unknown_things_and_connectivity(capsys, tmp_path, three_band_checkpoint):
    out = str(tmp_path / "o")
    code, _, err = run_cli(capsys, "run", "--image", "a.tif", "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--things", "b,nope", "--out", out)
    assert_one_line_error(code, err, "things", "'nope'")
    job = tmp_path / "job.yaml"
    job.write_text("scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\nclasses: [a, b]\n")
    code, _, err = run_cli(capsys, "run", str(job), "--things", "nope", "--out", out)
    assert_one_line_error(code, err, "job.yaml", "things", "'nope'")
    # the class names only in the checkpoint: refused before the image is opened or anything written
    code, _, err = run_cli(capsys, "run", "--image", "a.tif", "--checkpoint", str(three_band_checkpoint), "--things", "nope", "--out", out)
    assert_one_line_error(code, err, "things", "'nope'", "a, b")
    code, _, err = run_cli(capsys, "run", "--image", "a.tif", "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--simplify", "-1", "--out", out)
    assert_one_line_error(code, err, "simplify")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        main(["run", "--image", "a.tif", "--model", "hrnet_w18_small_v1", "--classes", "a,b", "--connectivity", "5"])
    assert exc.value.code == 2
    assert "--connectivity: invalid choice: 5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("scenes: [\n  - image: a.tif\n", "not valid YAML"),
        ("model: hrnet_w18_small_v1\nclasses: [a]\n", "scenes"),
        ("scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\nclasses: [a]\ntile_size: 100\n", "tile_size"),
        ("scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\nclasses: [a]\ntile_sise: 256\n", "tile_sise"),
        ("scenes: [{image: a.tif}]\nmodel: hrnet_w18_small_v1\n", "classes"),
        ("scenes: [{image: a.tif}]\nmodel: no_such_net\nclasses: [a]\n", "unknown model"),
        ("- just\n- a list\n", "YAML mapping"),
    ],
)
def test_invalid_job_files(capsys, tmp_path, text, fragment):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    code, _, err = run_cli(capsys, "run", str(job))
    assert code == 2 and "satseg: error:" in err and fragment in err and len(err.strip().splitlines()) == 1, err


def test_job_file_runs_and_output_of_another_job_is_refused(capsys, tmp_path, odd_scene, ray_local):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"scenes:\n  - image: {odd_scene.image}\n    labels: {odd_scene.labels}\n    name: first\n"
        f"model: hrnet_w18_small_v1\nmodel_options: {{width_multiplier: 0.25}}\nclasses: {CLASSES}\n"
        "tile_size: 64\noverlap: 16\nchunk_size: 128\nout: out\n"
    )
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    assert "mean IoU" in out and "first" in out and str(tmp_path / "out" / "masks" / "first.zarr") in out
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    code, _, err = run_cli(capsys, "run", str(job), "--tile-size", "96", "--quiet")
    assert_one_line_error(code, err, str(tmp_path / "out"), "another job")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    code, out, _ = run_cli(capsys, "query", "SELECT scene, round(mean_iou, 3) AS miou FROM scenes", "--reports", str(tmp_path / "out"), "--format", "csv")
    assert code == 0 and out.startswith("scene,miou\nfirst,")
    code, out, _ = run_cli(capsys, "evaluate", str(tmp_path / "out" / "masks" / "first.zarr"), str(odd_scene.labels))
    assert code == 0 and "mean IoU" in out


def test_query_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "query", "SELECT 1", "--reports", str(tmp_path / "none"))
    assert_one_line_error(code, err, "no reports folder")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "satseg"), "run", "--image", str(tmp_path / "x.tif"), "--model", "hrnet_w18_small_v1", "--classes", "a"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"satseg: error: {tmp_path / 'x.tif'}: image file not found; check the path"]


def test_bad_model_options_are_one_line_before_anything_is_written(capsys, tmp_path, odd_scene):
    job = tmp_path / "job.yaml"
    job.write_text(f"scenes: [{{image: {odd_scene.image}}}]\nmodel: hrnet_w18_small_v1\nclasses: [a, b]\nmodel_options: {{foo: 1}}\nout: o2\n")
    code, _, err = run_cli(capsys, "run", str(job))
    assert_one_line_error(code, err, "model_options", "foo")
    assert not (tmp_path / "o2").exists()


def test_evaluate_refuses_an_unfinished_mask_and_handles_short_scenes(capsys, tmp_path, odd_scene, ray_local):
    import zarr

    from pipeline.run import run_job
    from schemas.job import job_from_dict

    spec = job_from_dict({"scenes": [{"image": str(odd_scene.image), "name": "s"}], "model": "hrnet_w18_small_v1",
                          "model_options": TINY, "classes": CLASSES, "tile_size": 64, "overlap": 16, "chunk_size": 512,
                          "out": str(tmp_path / "out")})
    run_job(spec, show_progress=False)
    store = tmp_path / "out" / "masks" / "s.zarr"
    code, out, err = run_cli(capsys, "evaluate", str(store), str(odd_scene.labels), "--out", str(tmp_path / "ev"))
    assert code == 0, err  # the scene (301 px) is shorter than one chunk (512 px)
    zarr.open_array(str(store), path="mask", mode="r+").attrs["satseg_complete"] = False
    code, _, err = run_cli(capsys, "evaluate", str(store), str(odd_scene.labels))
    assert_one_line_error(code, err, "not complete")


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("SELECT length(content) FROM read_text('{secret}')", "Permission"),  # a file outside the reports
        ("COPY (SELECT 1) TO '{outside}'", "one SELECT"),
        ("COPY (SELECT 'fake' AS scene) TO '{planted}'", "one SELECT"),  # a fake row planted among the reports
        ("ATTACH '{outside}' AS x", "one SELECT"),
        ("SET enable_external_access = true", "one SELECT"),
        ("SELECT 1; COPY (SELECT 1) TO '{outside}'", "one SELECT"),
        ("INSTALL spatial", "one SELECT"),
    ],
)
def test_query_is_read_only_and_confined_to_the_reports(capsys, tmp_path, sql, says):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "out" / "reports" / "scenes" / "job_id=abc"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"scene": ["a"]}), folder / "a.parquet")
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    paths = {"secret": secret, "outside": tmp_path / "written.csv", "planted": folder / "zz.parquet"}
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, "query", sql.format(**paths), "--reports", str(tmp_path / "out"))
    assert_one_line_error(code, err, says)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing planted
    code, out, _ = run_cli(capsys, "query", "WITH s AS (SELECT * FROM scenes) SELECT scene, job_id FROM s", "--reports",
                           str(tmp_path / "out"), "--format", "csv")
    assert code == 0 and out.strip() == "scene,job_id\na,abc"


def test_query_time_memory_and_output_are_bounded(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "reports" / "scenes" / "job_id=abc"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"scene": ["a"]}), folder / "a.parquet")
    reports = ("--reports", str(tmp_path))
    code, _, err = run_cli(capsys, "query", "SELECT count(*) FROM range(10000000000000) a, range(1000) b", *reports,
                           "--timeout", "1")
    assert_one_line_error(code, err, "stopped after 1 s", "--timeout")
    code, _, err = run_cli(capsys, "query", "SELECT string_agg(repeat('x', 1000), '') FROM range(10000000)", *reports)
    assert_one_line_error(code, err, "more than 1GB of memory")
    code, out, err = run_cli(capsys, "query", "SELECT * FROM range(100000)", *reports, "--format", "csv", "--max-rows", "3")
    assert code == 0 and out.strip().splitlines() == ["range", "0", "1", "2"]
    assert "only the first 3 rows" in err
    code, _, err = run_cli(capsys, "query", "SELECT 1 -- " + "x" * 200_000, *reports)
    assert_one_line_error(code, err, "at most 100000")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.parquet", "job_id=abc", "reports", "scenes"]  # no spill


@pytest.mark.parametrize(
    ("transform", "crs", "match"),
    [
        (from_origin(500000 + 1e-6, 4600000, 10, 10), "EPSG:32633", True),  # a ten-millionth of a pixel: the same grid
        (from_origin(500000 + 0.05, 4600000, 10, 10), "EPSG:32633", False),  # a two-hundredth of a pixel: not
        (from_origin(500000, 4600000, 10, 10), "+proj=utm +zone=33 +datum=WGS84 +units=m +no_defs", True),  # same CRS, other text
        (from_origin(500000, 4600000, 10, 10), "EPSG:32634", False),
    ],
)
def test_run_and_evaluate_match_grids_by_one_rule(tmp_path, transform, crs, match):
    """`satseg run` (image vs labels) and `satseg evaluate` (mask vs labels) decide the same for the same pair."""
    from pipeline.evaluate import _check_same_grid, _open_raster
    from schemas.errors import MismatchError
    from workers.reader import check_labels_match, open_scene

    a = write_tif(tmp_path / "a.tif", np.zeros((20, 30), np.uint8))
    b = write_tif(tmp_path / "b.tif", np.zeros((20, 30), np.uint8), transform=transform, crs=crs)
    decisions = []
    for check in (
        lambda: check_labels_match(open_scene(a), open_scene(b, role="label")),
        lambda: _check_same_grid(_open_raster(a, "prediction", 64), _open_raster(b, "label", 64)),
    ):
        try:
            check()
            decisions.append(True)
        except MismatchError:
            decisions.append(False)
    assert decisions == [match, match]


def _corrupt_tif(path: Path) -> Path:
    """A tiled, compressed GeoTIFF whose tile data is overwritten: its header opens, its pixels do not decode."""
    with rasterio.open(
        path, "w", driver="GTiff", height=64, width=64, count=4, dtype="uint16", tiled=True, blockxsize=16,
        blockysize=16, compress="deflate", crs="EPSG:32633", transform=from_origin(500000, 4600000, 10, 10),
    ) as dst:
        dst.write(np.random.default_rng(0).integers(0, 4000, (4, 64, 64), dtype=np.uint16))
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) - 200] = b"\x55" * (len(data) - 200 - len(data) // 3)
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_complex_or_ungeoreferenced_image(capsys, tmp_path, ray_local, recwarn):
    """A corrupt file names GDAL's cause, a complex one is refused, a plain JPEG named .tif runs quietly."""
    run = ("--model", "pixel_linear", "--classes", "a,b", "--tile-size", "32", "--overlap", "0", "--quiet")
    corrupt = _corrupt_tif(tmp_path / "corrupt.tif")
    code, _, err = run_cli(capsys, "run", "--image", str(corrupt), "--out", str(tmp_path / "o1"), *run)
    assert_one_line_error(code, err, "corrupt.tif", "read failed", "IReadBlock")
    complex_tif = write_tif(tmp_path / "complex.tif", np.ones((2, 16, 16), np.complex64))
    code, _, err = run_cli(capsys, "run", "--image", str(complex_tif), "--out", str(tmp_path / "o2"), *run)
    assert_one_line_error(code, err, "complex.tif", "complex values", "amplitude")
    assert not (tmp_path / "o2").exists()
    jpeg = tmp_path / "photo.tif"
    with rasterio.open(jpeg, "w", driver="JPEG", height=40, width=48, count=3, dtype="uint8") as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (3, 40, 48), dtype=np.uint8))
    recwarn.clear()
    code, _, err = run_cli(capsys, "run", "--image", str(jpeg), "--out", str(tmp_path / "o3"), *run)
    assert code == 0, err
    assert "Warning" not in err and not [w for w in recwarn if "georeferenc" in str(w.message).lower()]
