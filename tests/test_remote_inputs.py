"""Inputs where the data lives: GeoTIFFs read over HTTP (GDAL's /vsicurl/, by byte ranges) and from S3 (/vsis3/),
against real servers on 127.0.0.1, equal to the same files read locally; remote paths kept as written from the job
file to the job id and the reports; the same one-line errors as local files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from pipeline.core.geometry import Window
from schemas.errors import InputFileError
from schemas.job import job_from_dict, load_job
from schemas.rasters import RemotePath, gdal_path
from tests.conftest import CLASSES, TINY
from tests.remote_servers import range_server, s3_server
from workers.reader import grid_difference, open_scene, read_image_window, read_label_window

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(odd_scene, tmp_path_factory):
    """The odd scene's image and labels on an HTTP server that honours Range, with a text file and a denied path."""
    root = tmp_path_factory.mktemp("www")
    (root / "scene.tif").write_bytes(Path(odd_scene.image).read_bytes())
    (root / "labels.tif").write_bytes(Path(odd_scene.labels).read_bytes())
    (root / "notes.txt").write_text("not a raster\n" * 200)
    (root / "secret.tif").write_bytes(Path(odd_scene.image).read_bytes())
    with range_server(root, deny=("/secret.tif",)) as server:
        yield server


def test_the_one_rule_maps_urls_to_gdal_names():
    assert gdal_path("s3://bucket/T32/B04.tif") == "/vsis3/bucket/T32/B04.tif"
    assert gdal_path("gs://bucket/a.tif") == "/vsigs/bucket/a.tif"
    assert gdal_path("az://container/a.tif") == "/vsiaz/container/a.tif"
    assert gdal_path("https://host/a//b.tif?sig=1") == "/vsicurl/https://host/a//b.tif?sig=1"
    assert gdal_path("HTTP://host/a.tif") == "/vsicurl/http://host/a.tif"
    for vsi in ("/vsicurl/https://h/a.tif", "/vsicurl?url=https%3A%2F%2Fh%2Fa.tif", "/vsis3/b/k.tif", "/vsizip//data/a.zip/x.tif",
                "/vsigzip/a.tif.gz"):
        assert gdal_path(vsi) == vsi
    for local in ("/data/a.tif", "a.tif", "./s3/a.tif", "C:\\data\\a.tif", "/vsi", Path("/vsis3/b/k")):
        assert gdal_path(local) is None


def test_remote_paths_survive_the_job_file_the_job_id_and_submission(tmp_path):
    from pipeline.submit import shipped_spec

    urls = ["s3://bucket/T32//B04.tif", "/vsicurl/https://host/x.tif?token=a//b", "/vsizip//data/a.zip/x.tif", "gs://b/labels.tif"]
    (tmp_path / "job.yaml").write_text(
        f"scenes:\n  - {{image: '{urls[0]}', labels: '{urls[3]}'}}\n  - {{image: '{urls[1]}'}}\n  - {{image: '{urls[2]}', name: z}}\n"
        "  - {image: local.tif}\nmodel: pixel_linear\nclasses: [a, b]\n"
    )
    spec = load_job(tmp_path / "job.yaml")
    assert [str(s.image) for s in spec.scenes] == [*urls[:3], str(tmp_path / "local.tif")]
    assert isinstance(spec.scenes[0].image, RemotePath) and str(spec.scenes[0].labels) == urls[3]
    assert [s.scene_name for s in spec.scenes] == ["B04", "x", "z", "local"]
    identity = json.dumps(spec.identity())
    assert all(json.dumps(u)[1:-1] in identity for u in urls)
    assert job_from_dict(spec.model_dump(mode="json")) == spec  # the job record reads back the same
    shipped = shipped_spec(spec)  # `satseg submit` makes local paths absolute, and leaves URLs alone
    assert [str(s.image) for s in shipped.scenes][:3] == urls[:3] and str(shipped.scenes[0].labels) == urls[3]


def test_local_paths_keep_their_job_identity():
    """Job ids of local-path jobs run before remote inputs existed stay the same (their folders still resume)."""
    spec = job_from_dict({
        "scenes": [{"image": "/data//a.tif", "labels": "./l/b.tif"}, {"image": "rel/x/../y.tif", "name": "n"}],
        "model": "m", "classes": ["a"],
    })
    text = json.dumps(spec.identity(), sort_keys=True)
    assert '"scenes": [{"image": "/data/a.tif", "labels": "l/b.tif", "name": null}, ' in text  # pathlib's form, as before
    assert "stac_bands" not in text
    assert hashlib.sha256(text.encode()).hexdigest()[:12] == "8a08e4455993"


def test_cli_flags_keep_urls(served):
    from pipeline.cli.run import add_arguments, spec_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--image", served.url("scene.tif"), "--labels", "s3://b//l.tif", "--model", "pixel_linear",
                              "--classes", "a,b"])
    scene = spec_from_args(args).scenes[0]
    assert str(scene.image) == served.url("scene.tif") and str(scene.labels) == "s3://b//l.tif"


def test_http_reads_use_byte_ranges_and_equal_local_reads(odd_scene, served):
    local = open_scene(odd_scene.image)
    before = len(served.requests)
    for path in (served.url("scene.tif"), "/vsicurl/" + served.url("scene.tif")):
        remote = open_scene(path)
        assert remote.path == path and grid_difference(local, remote) is None
        assert (remote.count, remote.dtype, remote.nodata) == (local.count, local.dtype, local.nodata)
        window = Window(-20, 150, 180, 240)  # crosses the top edge: reflected, as locally
        a = read_image_window(path, window, [1, 2, 3, 4], [0.0] * 4, [1.0] * 4)
        b = read_image_window(str(odd_scene.image), window, [1, 2, 3, 4], [0.0] * 4, [1.0] * 4)
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.has_data, b.has_data)
        assert a.nodata_collisions == b.nodata_collisions
    inside = Window(0, 0, 120, 200)
    assert np.array_equal(read_label_window(served.url("labels.tif"), inside), read_label_window(str(odd_scene.labels), inside))
    gets = [r for r in served.requests[before:] if r.method == "GET" and r.path.endswith(".tif")]
    assert {r.path for r in gets} == {"/scene.tif", "/labels.tif"}
    assert all(r.range and r.status == 206 for r in gets), gets  # read by byte ranges, never downloaded whole
    spans = [tuple(map(int, r.range.removeprefix("bytes=").split("-"))) for r in gets if r.path == "/scene.tif"]
    assert sum(b - a + 1 for a, b in spans) < Path(odd_scene.image).stat().st_size  # a window's blocks, not the file


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("missing.tif", ["image file not found", "HTTP response code: 404", "check the path"]),
        ("secret.tif", ["access denied", "403", "signed URL"]),
        ("notes.txt", ["not a readable raster", "give a GeoTIFF"]),
    ],
)
def test_http_failures_are_one_line(served, name, fragments, capsys, tmp_path):
    url = served.url(name)
    with pytest.raises(InputFileError) as err:
        open_scene(url)
    assert str(err.value).startswith(url + ": ") and "\n" not in str(err.value)
    assert all(f in str(err.value) for f in fragments), str(err.value)
    code = main(["run", "--image", url, "--model", "pixel_linear", "--classes", "a,b", "--out", str(tmp_path / "o"), "--quiet"])
    err_text = capsys.readouterr().err.strip()
    assert code == 2 and err_text.count("\n") == 0 and err_text.startswith(f"satseg: error: {url}: "), err_text
    assert not (tmp_path / "o").exists()


def test_an_unreachable_server_is_one_line():
    with pytest.raises(InputFileError, match=r"^http://127\.0\.0\.1:9/a\.tif: cannot reach the label file .*check the URL"):
        open_scene("http://127.0.0.1:9/a.tif", role="label")


def test_evaluate_takes_remote_labels(odd_scene, served, tmp_path):
    from pipeline.evaluate import evaluate_mask

    local = evaluate_mask(odd_scene.labels, odd_scene.labels, class_names=CLASSES)
    remote = evaluate_mask(odd_scene.labels, served.url("labels.tif"), class_names=CLASSES, out=tmp_path / "o")
    assert local.metrics.mean_iou == remote.metrics.mean_iou == 1.0  # the labels against themselves, read locally or over HTTP
    assert local.metrics.pixel_accuracy == remote.metrics.pixel_accuracy
    import pyarrow.parquet as pq

    rows = pq.read_table(next((tmp_path / "o" / "reports" / "scenes").rglob("*.parquet"))).to_pylist()
    assert rows[0]["labels"] == served.url("labels.tif")


@pytest.fixture(scope="module")
def s3(odd_scene):
    with s3_server() as server:
        server.client.create_bucket(Bucket="scenes")
        server.client.upload_file(str(odd_scene.image), "scenes", "T32/odd.tif")
        server.client.upload_file(str(odd_scene.labels), "scenes", "T32/odd_labels.tif")
        yield server


def test_s3_reads_equal_local_reads(odd_scene, s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    local = open_scene(odd_scene.image)
    remote = open_scene("s3://scenes/T32/odd.tif")
    assert grid_difference(local, remote) is None and remote.path == "s3://scenes/T32/odd.tif"
    window = Window(100, -30, 150, 260)
    a = read_image_window("s3://scenes/T32/odd.tif", window, [3, 1], [0.0] * 2, [1.0] * 2)
    b = read_image_window(str(odd_scene.image), window, [3, 1], [0.0] * 2, [1.0] * 2)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.has_data, b.has_data)
    inside = Window(50, 60, 100, 100)
    assert np.array_equal(read_label_window("/vsis3/scenes/T32/odd_labels.tif", inside), read_label_window(str(odd_scene.labels), inside))
    with pytest.raises(InputFileError, match=r"^s3://scenes/T32/nope\.tif: image file not found \(.*\); check the path$"):
        open_scene("s3://scenes/T32/nope.tif")
    with pytest.raises(InputFileError, match=r"^s3://nobucket/a\.tif: label file not found"):
        open_scene("s3://nobucket/a.tif", role="label")


def test_s3_without_credentials_says_which_to_give(s3, monkeypatch, tmp_path):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputFileError) as err:
        open_scene("s3://scenes/T32/odd_labels.tif")
    text = str(err.value)
    assert text.startswith("s3://scenes/T32/odd_labels.tif: access denied (") and "AWS_ACCESS_KEY_ID" in text, text
    assert "AWS_NO_SIGN_REQUEST=YES" in text and "\n" not in text


# ---- a whole job through Ray (slow; the HTTP and STAC job is in test_stac_inputs.py) ------------------------------


@pytest.mark.slow
def test_satseg_run_reads_s3_with_gdal_config_from_the_environment(odd_scene, s3, tmp_path):
    """As a user would: AWS_* exported, `satseg run` in its own process, whose local Ray's workers inherit the
    environment; the mask of the scene read from S3 equals, bit for bit, the same job's over the local file."""
    scenes = [
        {"image": "s3://scenes/T32/odd.tif", "labels": "/vsis3/scenes/T32/odd_labels.tif", "name": "s3"},
        {"image": str(odd_scene.image), "labels": str(odd_scene.labels), "name": "local"},
    ]
    job = tmp_path / "job.yaml"  # a job file: flags take no model options (the tiny width)
    job.write_text(json.dumps({
        "scenes": scenes, "model": "hrnet_w18_small_v1", "model_options": TINY, "classes": CLASSES, "tile_size": 64,
        "overlap": 16, "chunk_size": 100, "batch_size": 4, "stitch": "blend", "num_actors": 1, "out": "out",
    }))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(job), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, **s3.env, "PYTHONPATH": str(ROOT)}, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    masks = {n: zarr.open_array(str(tmp_path / "out" / "masks" / f"{n}.zarr"), path="mask", mode="r")[:] for n in ("s3", "local")}
    assert np.array_equal(masks["s3"], masks["local"])


def test_report_views_read_remote_rasters_as_the_job_does(odd_scene, served):
    from pipeline.quicklook import label_lookup, read_image_rgb, read_labels

    window = Window(10, 20, 200, 150)
    a, valid_a = read_image_rgb(served.url("scene.tif"), (50, 40), window)
    b, valid_b = read_image_rgb(odd_scene.image, (50, 40), window)
    assert np.array_equal(a, b) and np.array_equal(valid_a, valid_b)
    lut = label_lookup(None, len(CLASSES))
    assert np.array_equal(read_labels(served.url("labels.tif"), (50, 40), lut, 255, window),
                          read_labels(odd_scene.labels, (50, 40), lut, 255, window))
    with pytest.raises(InputFileError, match="missing.tif: image file not found .*check the path"):  # the report's note
        read_image_rgb(served.url("missing.tif"), (8, 8))
    with pytest.raises(InputFileError, match="secret.tif: access denied .*signed URL"):  # its hint, not "read failed"
        read_labels(served.url("secret.tif"), (8, 8), lut, 255)
