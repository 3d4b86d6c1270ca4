"""Bad inputs, one table: each case builds its files, runs one `satseg` command, and says what a user gets.

Every case is one row of `CASES`: an id, a builder that writes the inputs under ``tmp_path`` and returns the
command line, and the expected outcome: `ok` (exit status 0, and optionally a check of the outputs), or
`one_line` (exit status 2, exactly one stderr line ``satseg: error: ...`` naming the fragments, no traceback,
and for `satseg run` nothing in ``--out`` that looks complete). Jobs are tiny: the `pixel_linear` model,
two classes, 32 px tiles, images of about 40 x 50 px, so the table runs in seconds.

A case where satseg falls short today is marked ``xfail(strict=True)`` with the reason, so it turns into a
failure (and the mark must go) the moment it is fixed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine, from_origin

from pipeline.cli import main
from tests.test_cli import assert_one_line_error, run_cli, write_tif

# ----------------------------------------------------------------------------------------------------------------
# outcomes

Check = Callable[[Path, str], None]  # (tmp_path, stdout) -> None; asserts on the outputs


@dataclass(frozen=True)
class Outcome:
    code: int
    fragments: tuple[str, ...] = ()
    check: Check | None = None


def ok(check: Check | None = None) -> Outcome:
    """Exit status 0; ``check(tmp_path, stdout)`` may look at the outputs."""
    return Outcome(0, (), check)


def one_line(*fragments: str) -> Outcome:
    """Exit status 2, one stderr line ``satseg: error: ...`` holding every fragment, no traceback."""
    return Outcome(2, fragments)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[..., list[str]]  # (tmp_path) -> argv, or (tmp_path, finished job folder) -> argv when `finished`
    expect: Outcome
    marks: tuple = field(default=())
    finished: bool = False  # the builder also takes the output folder of a finished job (a fixture, run once)


# ----------------------------------------------------------------------------------------------------------------
# inputs

H, W = 40, 50
RUN = ("--model", "pixel_linear", "--classes", "a,b", "--tile-size", "32", "--overlap", "0", "--num-actors", "1", "--quiet")


def _pixels(dtype="uint8", bands=3, shape=(H, W), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(100, 30, (bands, *shape)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 250), (bands, *shape), endpoint=True).astype(dtype)


def _image(tmp: Path, name="img.tif", data=None, **kw) -> Path:
    return write_tif(tmp / name, _pixels() if data is None else data, **kw)


def _run(tmp: Path, image, *extra: str) -> list[str]:
    return ["run", "--image", str(image), *RUN, "--out", str(tmp / "out"), *extra]


def _run_image(data=None, *extra: str, name="img.tif", **kw) -> Callable[[Path], list[str]]:
    """A builder: one image from ``data`` (default: 3 random uint8 bands), run with flags."""
    return lambda tmp: _run(tmp, _image(tmp, name, data, **kw), *extra)


def _job_text(image: str, *, scenes: str | None = None, extra: str = "") -> str:
    scenes = scenes if scenes is not None else f"[{{image: {json.dumps(image)}}}]"
    return f"scenes: {scenes}\nmodel: pixel_linear\nclasses: [a, b]\ntile_size: 32\noverlap: 0\nnum_actors: 1\nout: out\n{extra}"


def _job(text_or_bytes, name="job.yaml") -> Callable[[Path], list[str]]:
    """A builder: a job file whose text may name ``{img}`` (a valid image written beside it)."""

    def build(tmp: Path) -> list[str]:
        img = _image(tmp)
        path = tmp / name
        if isinstance(text_or_bytes, bytes):
            path.write_bytes(text_or_bytes)
        else:
            path.write_text(text_or_bytes.replace("{img}", str(img)))
        return ["run", str(path), "--quiet"]

    return build


def _labels_run(labels_data, **kw) -> Callable[[Path], list[str]]:
    """A builder: the standard image and a label raster (``kw`` to write_tif: transform, crs, nodata)."""

    def build(tmp: Path) -> list[str]:
        img = _image(tmp)
        labels = write_tif(tmp / "labels.tif", labels_data, **kw)
        return _run(tmp, img, "--labels", str(labels))

    return build


def _file(name: str, content: bytes) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(content)
        return _run(tmp, tmp / name)

    return build


def _truncated(tmp: Path) -> list[str]:
    img = write_tif(tmp / "whole.tif", _pixels("uint16", 4, (64, 64)))
    data = img.read_bytes()
    (tmp / "truncated.tif").write_bytes(data[: len(data) // 2])
    return _run(tmp, tmp / "truncated.tif")


def _corrupt(tmp: Path) -> list[str]:
    from tests.test_cli import _corrupt_tif

    return _run(tmp, _corrupt_tif(tmp / "corrupt.tif"))


def _jpeg_named_tif(tmp: Path) -> list[str]:
    path = tmp / "photo.tif"
    with rasterio.open(path, "w", driver="JPEG", height=H, width=W, count=3, dtype="uint8") as dst:
        dst.write(_pixels())
    return _run(tmp, path)


def _png(tmp: Path) -> list[str]:
    path = tmp / "picture.png"
    with rasterio.open(path, "w", driver="PNG", height=H, width=W, count=3, dtype="uint8") as dst:
        dst.write(_pixels())
    return _run(tmp, path)


def _vrt_missing_source(tmp: Path) -> list[str]:
    img = _image(tmp, "source.tif")
    vrt = tmp / "mosaic.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}">\n'
        '  <SRS>EPSG:32633</SRS>\n  <GeoTransform>500000, 10, 0, 4600000, 0, -10</GeoTransform>\n'
        + "".join(
            f'  <VRTRasterBand dataType="Byte" band="{b}">\n    <SimpleSource>\n'
            f'      <SourceFilename relativeToVRT="1">gone.tif</SourceFilename>\n      <SourceBand>{b}</SourceBand>\n'
            "    </SimpleSource>\n  </VRTRasterBand>\n"
            for b in (1, 2, 3)
        )
        + "</VRTDataset>\n"
    )
    img.unlink()
    return _run(tmp, vrt)


def _unreadable(tmp: Path) -> list[str]:
    img = _image(tmp, "secret.tif")
    img.chmod(0)
    return _run(tmp, img)


def _complex_int16(tmp: Path) -> Path:
    path = tmp / "cint16.tif"
    with rasterio.open(path, "w", driver="GTiff", height=H, width=W, count=1, dtype="complex_int16", crs="EPSG:32633",
                       transform=from_origin(500000, 4600000, 10, 10)) as dst:
        dst.write(np.ones((1, H, W), np.complex64))
    return path


def _folder_named_tif(tmp: Path) -> list[str]:
    (tmp / "folder.tif").mkdir()
    return _run(tmp, tmp / "folder.tif")


def _rotated() -> Affine:
    return Affine(8.660254, 5.0, 500000, 5.0, -8.660254, 4600000)  # 10 m pixels turned by 30 degrees


def _nan_inf() -> np.ndarray:
    data = _pixels("float32", 2)
    data[:, :5, :] = np.nan  # both bands NaN: nodata (with nodata = NaN)
    data[0, 10, :] = np.nan  # one band NaN: the other holds data, so the pixel does
    data[1, 20, :] = np.inf
    data[0, 30, :] = -np.inf
    return data


def _hostile_name(name: str) -> Callable[[Path], list[str]]:
    return lambda tmp: _run(tmp, _image(tmp, name))


def _float_labels() -> np.ndarray:
    """Float labels: a quarter class 1, a quarter NaN, a quarter 0.5 (no class value), a quarter +-inf."""
    labels = np.ones((H, W), np.float32)
    labels[10:20] = np.nan
    labels[20:30] = 0.5
    labels[30:35] = np.inf
    labels[35:] = -np.inf
    return labels


# ----------------------------------------------------------------------------------------------------------------
# checks of the outputs

def _masks(tmp: Path) -> dict[str, np.ndarray]:
    """Every mask store under tmp/out, each complete, as arrays by scene name."""
    import zarr

    from workers.mask_store import is_complete

    stores = sorted((tmp / "out" / "masks").glob("*.zarr"))
    assert stores, "no mask store written"
    out = {}
    for store in stores:
        assert is_complete(store), store
        out[store.name.removesuffix(".zarr")] = zarr.open_array(str(store), path="mask", mode="r")[:]
    return out


def _one_mask(tmp: Path, shape=(H, W)) -> np.ndarray:
    masks = _masks(tmp)
    assert len(masks) == 1, masks.keys()
    mask = next(iter(masks.values()))
    assert mask.shape == shape
    assert set(np.unique(mask)) <= {0, 1, 255}
    return mask


def says(text: str) -> Check:
    def check(tmp: Path, stdout: str) -> None:
        assert text in stdout, stdout

    return check


def mask_shape(shape) -> Check:
    def check(tmp: Path, stdout: str) -> None:
        assert not (_one_mask(tmp, shape) == 255).any()

    return check


def all_valid(tmp: Path, stdout: str) -> None:
    assert not (_one_mask(tmp) == 255).any()


def all_nodata(tmp: Path, stdout: str) -> None:
    assert (_one_mask(tmp) == 255).all()


def nodata_where_every_band_is_nan(tmp: Path, stdout: str) -> None:
    mask = _one_mask(tmp)
    expected = np.zeros((H, W), bool)
    expected[:5, :] = True
    np.testing.assert_array_equal(mask == 255, expected)


def scene_named(name: str) -> Check:
    def check(tmp: Path, stdout: str) -> None:
        assert list(_masks(tmp)) == [name]

    return check


def labelled_pixels(n: int) -> Check:
    """Labels outside the class list (or not a class value at all) count nowhere: the confusion matrix holds ``n``."""

    def check(tmp: Path, stdout: str) -> None:
        import pyarrow.parquet as pq

        _one_mask(tmp)
        (report,) = (tmp / "out" / "reports" / "scenes").glob("*/*.parquet")
        row = pq.read_table(report).to_pylist()[0]
        assert sum(row["confusion"]) == row["labelled_pixels"] == n

    return check


def _nothing_looks_complete(out: Path) -> None:
    """After a failed `satseg run`: no complete mask store and no scene report in ``out``."""
    from workers.mask_store import is_complete

    if not out.exists():
        return
    assert not [s for s in out.glob("masks/*.zarr") if is_complete(s)]
    assert not list(out.glob("reports/scenes/*/*.parquet"))


# ----------------------------------------------------------------------------------------------------------------
# evaluate, query, report, export, status, schedule inputs

def _evaluate(pred_data, labels_data, *extra: str, pred_kw=None, labels_kw=None) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        pred = write_tif(tmp / "pred.tif", pred_data, **(pred_kw or {}))
        labels = write_tif(tmp / "labels.tif", labels_data, **(labels_kw or {}))
        return ["evaluate", str(pred), str(labels), "--classes", "a,b", *extra]

    return build


def _evaluate_out_file(tmp: Path) -> list[str]:
    argv = _evaluate(np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8))(tmp)
    (tmp / "taken").write_text("a file")
    return [*argv, "--out", str(tmp / "taken")]


def _reports(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp / "out" / "reports" / "scenes" / "job_id=abc"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"scene": ["a"], "mean_iou": [0.5]}), folder / "a.parquet")
    return tmp / "out"


def _query(sql: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["query", sql, "--reports", str(_reports(tmp))]


def _query_garbage_parquet(tmp: Path) -> list[str]:
    out = _reports(tmp)
    (out / "reports" / "scenes" / "job_id=abc" / "b.parquet").write_bytes(b"not parquet at all")
    return ["query", "SELECT * FROM scenes", "--reports", str(out)]


def _unfinished_store(tmp: Path) -> Path:
    from workers.mask_store import create_mask_store
    from workers.reader import open_scene

    img = _image(tmp)
    store = tmp / "out" / "masks" / "img.zarr"
    create_mask_store(store, open_scene(img), 32, class_names=["a", "b"], job_id="abc", source_image=str(img))
    return store


def _report_out_is_a_folder(tmp: Path, finished: Path) -> list[str]:
    (tmp / "page.html").mkdir()
    return ["report", str(finished), "--out", str(tmp / "page.html")]


def _cog_exists(tmp: Path, finished: Path) -> list[str]:
    (tmp / "c.tif").write_text("mine")
    return ["export", str(finished / "masks" / "img.zarr"), "--cog", str(tmp / "c.tif")]


def _status_garbage_job(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "job.json").write_bytes(b"\xff\xfe not json")
    return ["status", str(tmp / "out")]


def _status_garbage_state(tmp: Path) -> list[str]:
    (tmp / "out" / "state" / "s").mkdir(parents=True)
    (tmp / "out" / "job.json").write_text(json.dumps({"job_id": "abc"}))
    (tmp / "out" / "state" / "s" / "status.json").write_text('{"scene": "s", "status": 7}')
    return ["status", str(tmp / "out")]


def _schedule(text: str | bytes) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = tmp / "schedule.yaml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return ["schedule", str(tmp / "schedule.yaml"), "--once"]

    return build


_SCHEDULE = "name: nightly\ncron: '0 2 * * *'\nscenes: {glob: 'in/*.tif'}\nout: sched\n"
_JOB = "job: {model: pixel_linear, classes: [a, b], tile_size: 32, overlap: 0}\n"

_ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)

_ROOT = os.geteuid() == 0

# ----------------------------------------------------------------------------------------------------------------
# the table

CASES = [
    # pixel types and values
    Case("float32-nan-inf-nodata-nan", _run_image(_nan_inf(), nodata=float("nan")), ok(nodata_where_every_band_is_nan)),
    Case("float32-all-nan-nodata-nan", _run_image(np.full((2, H, W), np.nan, np.float32), nodata=float("nan")), ok(all_nodata)),
    # without a nodata value GDAL calls NaN pixels valid: they are read as data (a non-finite value becomes the band mean)
    Case("float32-nan-inf-without-nodata", _run_image(_nan_inf()), ok(all_valid)),
    Case("float64-beyond-float32", _run_image(_pixels("float64") * 1e300), ok(all_valid)),
    Case("int8", _run_image(_pixels("int8")), ok(all_valid)),
    Case("uint32", _run_image(_pixels("uint32") * 10_000_000), ok(all_valid)),
    Case("complex64", _run_image(np.ones((2, H, W), np.complex64), name="complex.tif"),
         one_line("complex.tif", "complex values", "amplitude")),
    Case("complex-int16", lambda tmp: _run(tmp, _complex_int16(tmp)), one_line("cint16.tif", "complex_int16")),
    # sizes and georeferencing
    Case("1x1-scene", _run_image(_pixels(shape=(1, 1))), ok(mask_shape((1, 1)))),
    Case("1xN-scene", _run_image(_pixels(shape=(1, W))), ok(mask_shape((1, W)))),
    Case("smaller-than-a-tile", _run_image(_pixels(shape=(20, 25))), ok(mask_shape((20, 25)))),
    Case("rotated-transform", _run_image(transform=_rotated()), ok(all_valid)),
    Case("no-crs", _run_image(crs=None), ok(all_valid)),
    # labels
    Case("labels-other-shape", _labels_run(np.zeros((H, W + 1), np.uint8)), one_line("labels.tif", "shape 40x51")),
    Case("labels-other-crs", _labels_run(np.zeros((H, W), np.uint8), crs="EPSG:4326"), one_line("labels.tif", "CRS")),
    Case("labels-other-transform", _labels_run(np.zeros((H, W), np.uint8), transform=from_origin(500005, 4600000, 10, 10)),
         one_line("labels.tif", "transform")),
    Case("labels-without-crs", _labels_run(np.zeros((H, W), np.uint8), crs=None), one_line("labels.tif", "CRS")),
    Case("labels-outside-the-classes",
         _labels_run(np.concatenate([np.ones((H // 2, W), np.uint8), np.full((H // 2, W), 7, np.uint8)])),
         ok(labelled_pixels(H * W // 2))),
    Case("labels-float-nan-inf-fractions", _labels_run(_float_labels()), ok(labelled_pixels(10 * W))),
    Case("labels-missing", lambda tmp: _run(tmp, _image(tmp), "--labels", str(tmp / "nolabels.tif")),
         one_line("nolabels.tif", "label file not found")),
    Case("labels-text-file",
         lambda tmp: (tmp / "l.tif").write_text("x") and _run(tmp, _image(tmp), "--labels", str(tmp / "l.tif")),
         one_line("l.tif", "not a readable raster")),
    # files that are not images
    Case("text-named-tif", _file("notes.tif", b"just some text\n"), one_line("notes.tif", "not a readable raster")),
    Case("empty-file", _file("empty.tif", b""), one_line("empty.tif", "not a readable raster")),
    Case("folder-named-tif", _folder_named_tif, one_line("folder.tif", "is a folder")),
    Case("missing-file", lambda tmp: _run(tmp, tmp / "nope.tif"), one_line("nope.tif", "not found")),
    Case("no-read-permission", _unreadable, one_line("secret.tif", "not a readable raster"),
         marks=(pytest.mark.skipif(_ROOT, reason="root reads any file"),)),
    Case("truncated-geotiff", _truncated, one_line("truncated.tif", "read failed")),
    Case("corrupt-geotiff", _corrupt, one_line("corrupt.tif", "read failed", "IReadBlock")),
    Case("jpeg-named-tif", _jpeg_named_tif, ok(all_valid)),
    Case("png", _png, ok(all_valid)),
    Case("vrt-with-missing-source", _vrt_missing_source, one_line("mosaic.vrt", "gone.tif", "does not exist")),
    # bands
    Case("no-band-selected", lambda tmp: _run(tmp, _image(tmp), "--bands", ","), one_line("bands")),
    Case("band-out-of-range", lambda tmp: _run(tmp, _image(tmp), "--bands", "1,5"), one_line("band 5 does not exist", "img.tif")),
    Case("band-zero", lambda tmp: _run(tmp, _image(tmp), "--bands", "0,1"), one_line("bands", "start at 1")),
    Case("bands-not-numbers", lambda tmp: _run(tmp, _image(tmp), "--bands", "red,nir"), one_line("--bands", "integers")),
    # names
    Case("duplicate-scene-names", _job(_job_text("", scenes="[{image: '{img}', name: s}, {image: '{img}', name: s}]")),
         one_line("job.yaml", "unique")),
    Case("same-stem-twice", _job(_job_text("", scenes="[{image: '{img}'}, {image: '{img}'}]")), one_line("unique", "img")),
    Case("scene-name-with-slash", lambda tmp: _run(tmp, _image(tmp), "--name", "a/b"), one_line("name", "letters, digits")),
    Case("scene-name-dotdot", _job(_job_text("", scenes="[{image: '{img}', name: '..'}]")), one_line("job.yaml", "name")),
    # quotes, a newline, a space and 243 characters: the scene name is the stem made safe, cut to 128 characters
    Case("image-name-hostile-and-long", _hostile_name("my 'scene';\nrm -rf " + "x" * 220 + ".tif"),
         ok(scene_named(("my__scene___rm_-rf_" + "x" * 220)[:128]))),
    Case("missing-image-name-with-newline", lambda tmp: _run(tmp, tmp / "gone\nsatseg: error: fake.tif"),
         one_line("gone\\nsatseg: error: fake.tif", "not found")),
    Case("missing-image-name-right-to-left", lambda tmp: _run(tmp, tmp / "photo\u202egnp.tif"),
         one_line("photo\\u202egnp.tif", "not found")),
    Case("out-folder-name-of-300-characters", lambda tmp: [*_run(tmp, _image(tmp))[:-2], "--out", str(tmp / ("o" * 300))],
         one_line("o" * 40, "shorter one")),
    # job files
    Case("job-a-list", _job("- just\n- a list\n"), one_line("job.yaml", "YAML mapping")),
    Case("job-empty", _job(""), one_line("job.yaml", "YAML mapping")),
    Case("job-not-utf8", _job(b"scenes: [{image: caf\xe9.tif}]\n"), one_line("job.yaml", "not UTF-8", "0xe9")),
    Case("job-alias-bomb", _job(_ALIAS_BOMB), one_line("job.yaml", "aliases")),
    Case("job-unknown-key", _job(_job_text("{img}", extra="tile_sise: 64\n")), one_line("job.yaml", "tile_sise")),
    Case("job-no-scenes", _job(_job_text("", scenes="[]")), one_line("job.yaml", "scenes")),
    Case("job-empty-band-list", _job(_job_text("{img}", extra="bands: []\n")), one_line("job.yaml", "bands")),
    Case("job-tile-size-a-word", _job(_job_text("{img}").replace("tile_size: 32", "tile_size: big")), one_line("tile_size")),
    Case("job-file-missing", lambda tmp: ["run", str(tmp / "nojob.yaml")], one_line("nojob.yaml")),
    Case("job-file-a-folder", lambda tmp: (tmp / "j.yaml").mkdir() or ["run", str(tmp / "j.yaml")], one_line("j.yaml", "folder")),
    Case("job-second-scene-missing", _job(_job_text("", scenes="[{image: '{img}'}, {image: gone.tif, name: two}]")),
         one_line("gone.tif", "not found")),
    Case("job-scenes-with-different-band-counts",
         lambda tmp: _job(_job_text("", scenes=f"[{{image: '{{img}}'}}, {{image: '{_image(tmp, 'two.tif', _pixels(bands=2))}'}}]")
                          )(tmp),
         one_line("different band counts")),
    Case("checkpoint-a-text-file", lambda tmp: (tmp / "m.safetensors").write_text("no") and
         ["run", "--image", str(_image(tmp)), "--checkpoint", str(tmp / "m.safetensors"), "--out", str(tmp / "out"), "--quiet"],
         one_line("m.safetensors")),
    # tiling
    Case("tile-size-not-a-multiple-of-32", lambda tmp: _run(tmp, _image(tmp), "--tile-size", "100"), one_line("tile_size", "32")),
    Case("tile-size-zero", lambda tmp: _run(tmp, _image(tmp), "--tile-size", "0"), one_line("tile_size", "32")),
    Case("overlap-as-large-as-the-tile", lambda tmp: _run(tmp, _image(tmp), "--overlap", "32"), one_line("overlap")),
    Case("negative-overlap", lambda tmp: _run(tmp, _image(tmp), "--overlap", "-2"), one_line("overlap")),
    Case("chunk-size-too-small", lambda tmp: _run(tmp, _image(tmp), "--chunk-size", "16"), one_line("chunk_size")),
    Case("256-classes", lambda tmp: _run(tmp, _image(tmp), "--classes", ",".join(f"c{i}" for i in range(256))),
         one_line("255 classes")),
    Case("no-classes", lambda tmp: _run(tmp, _image(tmp), "--classes", ","), one_line("classes")),
    Case("out-is-a-file", lambda tmp: [*_run(tmp, _image(tmp))[:-2], "--out", str(_image(tmp, "out"))], one_line("is a file")),
    # satseg evaluate
    Case("evaluate-out-is-a-file", _evaluate_out_file, one_line("taken", "is a file")),
    Case("evaluate-labels-other-shape", _evaluate(np.zeros((H, W), np.uint8), np.zeros((H + 1, W), np.uint8)),
         one_line("labels.tif", "shape")),
    Case("evaluate-missing-prediction", lambda tmp: ["evaluate", str(tmp / "none.tif"), str(_image(tmp)), "--classes", "a,b"],
         one_line("none.tif", "not found")),
    Case("evaluate-text-prediction", lambda tmp: (tmp / "p.tif").write_text("text") and
         ["evaluate", str(tmp / "p.tif"), str(_image(tmp)), "--classes", "a,b"], one_line("p.tif", "not a readable raster")),
    Case("evaluate-float-prediction-with-nan",
         _evaluate(np.where(np.eye(H, W) > 0, np.nan, 1).astype(np.float32), np.ones((H, W), np.uint8),
                   pred_kw={"nodata": float("nan")}), ok(says("mean IoU"))),
    Case("evaluate-unfinished-store", lambda tmp: ["evaluate", str(_unfinished_store(tmp)), str(tmp / "img.tif")],
         one_line("not complete")),
    Case("evaluate-bad-class-mapping", _evaluate(np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8), "--classes", "10=a,x"),
         one_line("--classes", "value=name")),
    Case("evaluate-boundary-width-zero",
         _evaluate(np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8), "--boundary-width", "0"),
         one_line("--boundary-width")),
    # satseg query
    Case("query-not-a-select", _query("DELETE FROM scenes"), one_line("one SELECT")),
    Case("query-syntax-error", _query("SELEC mean_iou FROM scenes"), one_line("query")),
    Case("query-folder-without-reports", lambda tmp: ["query", "SELECT 1", "--reports", str(tmp)], one_line("no report tables")),
    Case("query-missing-folder", lambda tmp: ["query", "SELECT 1", "--reports", str(tmp / "gone")],
         one_line("no reports folder")),
    Case("query-garbage-parquet", _query_garbage_parquet, one_line("b.parquet", "unreadable")),
    # satseg report
    Case("report-folder-without-reports", lambda tmp: (tmp / "out").mkdir() or ["report", str(tmp / "out")],
         one_line("reports/scenes")),
    Case("report-missing-folder", lambda tmp: ["report", str(tmp / "nowhere")], one_line("nowhere", "not found")),
    Case("report-unknown-job",
         lambda tmp, finished: ["report", str(finished), "--job", "nosuchjob", "--out", str(tmp / "r.html")],
         one_line("nosuchjob"), finished=True),
    Case("report-out-is-a-folder", _report_out_is_a_folder, one_line("page.html"), finished=True),
    # satseg export --cog
    Case("export-cog-of-a-geotiff", lambda tmp: ["export", str(_image(tmp)), "--cog", str(tmp / "c.tif")],
         one_line("img.tif", "not a satseg mask store")),
    Case("export-cog-of-an-unfinished-store", lambda tmp: ["export", str(_unfinished_store(tmp)), "--cog", str(tmp / "c.tif")],
         one_line("not complete")),
    Case("export-cog-not-a-tif", lambda tmp: ["export", str(_unfinished_store(tmp)), "--cog", str(tmp / "c.png")],
         one_line("c.png", "GeoTIFF")),
    Case("export-cog-onto-an-existing-file", _cog_exists, one_line("c.tif", "already exists"), finished=True),
    Case("export-cog-into-a-missing-folder",
         lambda tmp, finished: ["export", str(finished / "masks" / "img.zarr"), "--cog", str(tmp / "no" / "c.tif")],
         one_line("does not exist"), finished=True),
    # satseg status
    Case("status-empty-folder", lambda tmp: ["status", str(tmp)], one_line("no job.json")),
    Case("status-a-file", lambda tmp: ["status", str(_image(tmp))], one_line("img.tif", "no job.json")),
    # an unreadable job record is one line; an unreadable scene state is no state yet
    Case("status-garbage-job-record", _status_garbage_job, one_line("job.json", "not a job record satseg can read")),
    Case("status-garbage-scene-state", _status_garbage_state, ok(says("no scene state recorded yet"))),
    # satseg schedule
    Case("schedule-a-list", _schedule("- a\n- b\n"), one_line("schedule.yaml", "YAML mapping")),
    Case("schedule-empty", _schedule(""), one_line("schedule.yaml", "YAML mapping")),
    Case("schedule-not-utf8", _schedule(b"name: caf\xe9\n"), one_line("schedule.yaml", "not UTF-8")),
    Case("schedule-bad-cron", _schedule(_SCHEDULE.replace("0 2 * * *", "every night") + _JOB), one_line("cron")),
    Case("schedule-job-with-out", _schedule(_SCHEDULE + "job: {model: pixel_linear, classes: [a], out: x}\n"),
         one_line("belong to the schedule")),
    Case("schedule-job-tile-size", _schedule(_SCHEDULE + "job: {model: pixel_linear, classes: [a], tile_size: 33}\n"),
         one_line("tile_size")),
    Case("schedule-name-with-slash", _schedule(_SCHEDULE.replace("nightly", "a/b") + _JOB), one_line("name")),
]


# These start a real job (about 2 s each, mostly a model actor starting): `make test-slow` runs them, and CI.
RUNS_A_JOB = {
    "float32-nan-inf-nodata-nan", "float32-all-nan-nodata-nan", "jpeg-named-tif", "labels-float-nan-inf-fractions",
    "image-name-hostile-and-long", "no-crs", "float64-beyond-float32", "rotated-transform", "png",
    "labels-outside-the-classes", "1x1-scene", "float32-nan-inf-without-nodata", "smaller-than-a-tile", "1xN-scene",
    "vrt-with-missing-source", "int8", "report-unknown-job", "corrupt-geotiff", "uint32", "truncated-geotiff",
}


def _param(case: Case):
    marks = [*case.marks, pytest.mark.slow] if case.id in RUNS_A_JOB else case.marks
    return pytest.param(case, id=case.id, marks=marks)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert RUNS_A_JOB <= set(ids)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local) -> Path:
    """The output folder of one finished tiny job (scene ``img``), for the commands that read one."""
    tmp = tmp_path_factory.mktemp("finished")
    code = main(_run(tmp, _image(tmp)))
    assert code == 0
    return tmp / "out"


def _own_warnings(caught) -> list[str]:
    """Warnings raised from satseg's own code (not its libraries')."""
    root = str(Path(__file__).resolve().parents[1])
    own = [os.path.join(root, d) for d in ("pipeline", "workers", "schemas")]
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if any(w.filename.startswith(d) for d in own)]


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, request):
    request.getfixturevalue("ray_local")
    argv = case.build(tmp_path, request.getfixturevalue("finished_run")) if case.finished else case.build(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(capsys, *argv)
    assert not _own_warnings(caught)
    if case.expect.code == 0:
        assert code == 0, err
        assert "Traceback" not in err
        if case.expect.check is not None:
            case.expect.check(tmp_path, out)
        return
    assert_one_line_error(code, err, *case.expect.fragments)
    if argv[0] == "run":
        _nothing_looks_complete(tmp_path / "out")
