"""Nodata is GDAL's: the reader's valid mask equals rasterio's ``dataset_mask()`` on real files, reflected like the pixels.

Each case writes a small tiled GeoTIFF (blocks smaller than the scene, so a
window reads only some blocks) whose nodata layout is known by construction:
a nodata value shared by the bands, different nodata values per band (a VRT
over a GeoTIFF: a GeoTIFF holds one nodata value for all its bands), NaN
nodata in float32, an alpha band, an internal and an external (``.msk``)
per-dataset mask, and no nodata at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr
from rasterio.enums import ColorInterp, MaskFlags

from pipeline.core.geometry import Window
from workers.reader import normalise, read_image_window

H, W = 41, 53
PAD = 13  # every window below stays within PAD pixels of the scene
WINDOWS = [
    Window(5, 7, 20, 22),  # inside the scene
    Window(-9, -11, 30, 33),  # past the top-left corner
    Window(H - 15, W - 12, 28, 25),  # past the bottom-right corner
    Window(-6, -13, H + 12, W + 26),  # the whole scene and more, every side
    Window(-PAD, 20, PAD, 10),  # wholly above the scene: reflection only
]
PROFILE = dict(
    driver="GTiff", width=W, height=H, crs="EPSG:32633", transform=rasterio.Affine(10, 0, 500000, 0, -10, 4600000),
    tiled=True, blockxsize=16, blockysize=16,
)


@dataclass
class Case:
    path: Path
    bands: list[int]
    valid: np.ndarray  # (H, W) bool: which pixels hold data, by construction
    collide: np.ndarray  # (H, W) bool: holding data while a selected band equals its nodata value, by construction


def _states(rng, n_states: int) -> np.ndarray:
    """A per-pixel state in 0..n_states-1, each present in every corner of the scene."""
    s = rng.integers(0, n_states, size=(H, W))
    for r, c in ((0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)):
        s[r, c] = n_states - 1
    return s


def _uint8_nodata0(d: Path) -> Case:
    rng = np.random.default_rng(1)
    data = rng.integers(1, 256, size=(3, H, W), dtype=np.uint8)
    s = _states(rng, 4)  # 0 all bands data, 1 one band 0, 2 two bands 0, 3 all bands 0
    first = rng.integers(0, 3, size=(H, W))
    for k in range(3):
        data[k][(s == 1) & (first == k)] = 0
        data[k][(s == 2) & (first != k)] = 0
    data[:, s == 3] = 0
    path = d / "uint8_nodata0.tif"
    with rasterio.open(path, "w", count=3, dtype="uint8", nodata=0, **PROFILE) as dst:
        dst.write(data)
    return Case(path, [1, 2, 3], s != 3, (s == 1) | (s == 2))


PER_BAND_NODATA = (7, 300, 65535)


def _per_band_nodata(d: Path) -> Case:
    rng = np.random.default_rng(2)
    data = rng.integers(1000, 60000, size=(3, H, W), dtype=np.uint16)
    s = _states(rng, 5)  # 0 data, 1 one band at its nodata, 2 two bands, 3 another band's nodata values, 4 all at nodata
    first = rng.integers(0, 3, size=(H, W))
    for k, nd in enumerate(PER_BAND_NODATA):
        data[k][(s == 1) & (first == k)] = nd
        data[k][(s == 2) & (first != k)] = nd
        data[k][s == 3] = PER_BAND_NODATA[(k + 1) % 3]  # no band at its own nodata: data, no collision
        data[k][s == 4] = nd
    base = d / "per_band_base.tif"
    with rasterio.open(base, "w", count=3, dtype="uint16", **PROFILE) as dst:
        dst.write(data)
    bands = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{k + 1}"><NoDataValue>{nd}</NoDataValue>'
        f'<SimpleSource><SourceFilename relativeToVRT="1">{base.name}</SourceFilename><SourceBand>{k + 1}</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/><DstRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/>'
        "</SimpleSource></VRTRasterBand>"
        for k, nd in enumerate(PER_BAND_NODATA)
    )
    path = d / "per_band_nodata.vrt"
    path.write_text(f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}"><GeoTransform>500000, 10, 0, 4600000, 0, -10</GeoTransform>'
        f"{bands}</VRTDataset>")
    return Case(path, [1, 2, 3], s != 4, (s == 1) | (s == 2))


def _float_nan(d: Path) -> Case:
    rng = np.random.default_rng(3)
    data = rng.normal(100.0, 30.0, size=(2, H, W)).astype(np.float32)
    s = _states(rng, 3)  # 0 data, 1 one band NaN, 2 both NaN
    first = rng.integers(0, 2, size=(H, W))
    for k in range(2):
        data[k][(s == 1) & (first == k)] = np.nan
    data[:, s == 2] = np.nan
    path = d / "float_nan.tif"
    with rasterio.open(path, "w", count=2, dtype="float32", nodata=np.nan, **PROFILE) as dst:
        dst.write(data)
    return Case(path, [1, 2], s != 2, s == 1)


def _alpha(d: Path) -> Case:
    rng = np.random.default_rng(4)
    data = rng.integers(0, 3, size=(4, H, W), dtype=np.uint8)  # colour bands often 0, which means nothing here
    alpha = np.array([0, 128, 255], dtype=np.uint8)[_states(rng, 3)]
    alpha[0, 0] = 0
    data[3] = alpha
    path = d / "alpha.tif"
    with rasterio.open(path, "w", count=4, dtype="uint8", photometric="RGB", **PROFILE) as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
        dst.write(data)
    return Case(path, [1, 2, 3], alpha > 0, np.zeros((H, W), bool))


def _mask(d: Path, internal: bool) -> Case:
    rng = np.random.default_rng(5 if internal else 6)
    data = rng.integers(0, 3, size=(3, H, W), dtype=np.uint8)
    mask = np.where(_states(rng, 2) == 1, 255, 0).astype(np.uint8)
    mask[0, 0] = 0
    path = d / ("internal_mask.tif" if internal else "external_mask.tif")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal):
        # nodata 0 as well: the mask decides, and a band at 0 where the mask says data is a collision
        with rasterio.open(path, "w", count=3, dtype="uint8", nodata=0, **PROFILE) as dst:
            dst.write(data)
            dst.write_mask(mask)
    assert Path(f"{path}.msk").exists() != internal
    valid = mask > 0
    return Case(path, [1, 2, 3], valid, valid & np.any(data == 0, axis=0))


def _no_nodata(d: Path) -> Case:
    rng = np.random.default_rng(7)
    path = d / "no_nodata.tif"
    with rasterio.open(path, "w", count=3, dtype="uint8", **PROFILE) as dst:
        dst.write(rng.integers(0, 3, size=(3, H, W), dtype=np.uint8))
    return Case(path, [1, 2, 3], np.ones((H, W), bool), np.zeros((H, W), bool))


MAKERS = {
    "uint8_nodata0": _uint8_nodata0,
    "per_band_nodata": _per_band_nodata,
    "float_nan": _float_nan,
    "alpha": _alpha,
    "internal_mask": lambda d: _mask(d, internal=True),
    "external_mask": lambda d: _mask(d, internal=False),
    "no_nodata": _no_nodata,
}
EXPECTED_FLAGS = {
    "uint8_nodata0": [MaskFlags.nodata],
    "per_band_nodata": [MaskFlags.nodata],
    "float_nan": [MaskFlags.nodata],
    "alpha": [MaskFlags.per_dataset, MaskFlags.alpha],
    "internal_mask": [MaskFlags.per_dataset],
    "external_mask": [MaskFlags.per_dataset],
    "no_nodata": [MaskFlags.all_valid],
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("nodata")
    return {name: make(d) for name, make in MAKERS.items()}


def _padded(a: np.ndarray, window: Window) -> np.ndarray:
    """``a`` (..., H, W) reflect-padded (numpy's rule) and cut to ``window``."""
    pad = [(0, 0)] * (a.ndim - 2) + [(PAD, PAD), (PAD, PAD)]
    p = np.pad(a, pad, mode="reflect")
    return p[..., window.row_off + PAD : window.row_stop + PAD, window.col_off + PAD : window.col_stop + PAD]


def _inside(a: np.ndarray, window: Window) -> np.ndarray:
    part = window.intersection(Window(0, 0, H, W))
    return a[part.row_off : part.row_stop, part.col_off : part.col_stop] if part is not None else a[:0, :0]


def _read(case: Case, window: Window):
    n = len(case.bands)
    return read_image_window(str(case.path), window, case.bands, [0.0] * n, [1.0] * n)


@pytest.mark.parametrize("name", list(MAKERS))
def test_the_scene_is_what_the_case_says(cases, name):
    case = cases[name]
    with rasterio.open(case.path) as src:
        assert src.mask_flag_enums[0] == EXPECTED_FLAGS[name]
        assert np.array_equal(src.dataset_mask() > 0, case.valid)
    assert case.valid.any() and (~case.valid).any() or name == "no_nodata"
    assert case.collide.any() or name in ("alpha", "no_nodata")


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w.row_off},{w.col_off},{w.height}x{w.width}")
@pytest.mark.parametrize("name", list(MAKERS))
def test_valid_mask_is_gdal_dataset_mask_reflected_like_the_pixels(cases, name, window):
    case = cases[name]
    with rasterio.open(case.path) as src:
        dataset_mask = src.dataset_mask()
        pixels = src.read(case.bands)
    data = _read(case, window)
    assert data.has_data.dtype == bool and data.has_data.shape == window.shape
    assert np.array_equal(data.has_data, _padded(dataset_mask, window) > 0)
    assert np.array_equal(data.pixels, _padded(pixels, window), equal_nan=True)
    inside = np.zeros((H + 2 * PAD, W + 2 * PAD), bool)
    inside[PAD:-PAD, PAD:-PAD] = True
    inside = inside[window.row_off + PAD : window.row_stop + PAD, window.col_off + PAD : window.col_stop + PAD]
    assert np.array_equal(data.valid, data.has_data & inside)
    assert data.nodata_collisions == int(_inside(case.collide, window).sum())


def test_dataset_mask_counts_every_band_and_collisions_only_the_selected(cases):
    case = cases["per_band_nodata"]
    window = Window(-9, -11, 30, 33)
    with rasterio.open(case.path) as src:
        band1 = src.read(1)
        dataset_mask = src.dataset_mask()
    data = read_image_window(str(case.path), window, [1], [0.0], [1.0])
    assert np.array_equal(data.has_data, _padded(dataset_mask, window) > 0)
    assert data.nodata_collisions == int(_inside(case.valid & (band1 == PER_BAND_NODATA[0]), window).sum()) > 0


def test_corner_window_end_to_end(cases, caplog):
    """NaN nodata at the bottom-right corner: GDAL's mask, reflected; NaN bands normalise to 0; one warning."""
    case = cases["float_nan"]
    window = Window(H - 10, W - 10, 10 + PAD, 10 + PAD)
    mean, std = [100.0, 90.0], [30.0, 20.0]
    with rasterio.open(case.path) as src:
        dataset_mask = src.dataset_mask()
        pixels = src.read([1, 2])
    with caplog.at_level(logging.WARNING, logger="workers.reader"):
        data = read_image_window(str(case.path), window, [1, 2], mean, std)
    expected_valid = _padded(dataset_mask, window) > 0
    assert np.array_equal(data.has_data, expected_valid)
    assert not data.valid[10:, :].any() and not data.valid[:, 10:].any()
    assert np.array_equal(data.valid[:10, :10], expected_valid[:10, :10])
    expected_collisions = int(case.collide[H - 10 :, W - 10 :].sum())
    assert data.nodata_collisions == expected_collisions > 0
    warnings = [r for r in caplog.records if r.name == "workers.reader" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(case.path) in warnings[0].getMessage()
    assert f" {expected_collisions} pixels" in warnings[0].getMessage()

    image = data.image
    raw = _padded(pixels, window)
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    expected = np.where(np.isnan(raw) | ~expected_valid, np.float32(0), (raw - m) / s).astype(np.float32)
    assert np.isfinite(image).all()
    assert np.array_equal(image, expected)
    # host and device agree: the predictor normalises the same arrays with torch
    x = torch.from_numpy(data.pixels.astype(np.float32))
    normalise(x, torch.from_numpy(data.has_data), torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))
    assert np.array_equal(x.numpy(), image)


def test_no_warning_without_collisions(cases, caplog):
    with caplog.at_level(logging.WARNING, logger="workers.reader"):
        data = _read(cases["alpha"], Window(-9, -11, 30, 33))
    assert data.nodata_collisions == 0
    assert not [r for r in caplog.records if r.name == "workers.reader"]


def test_a_job_reports_each_nodata_collision_once_and_masks_only_gdal_nodata(ray_local, tmp_path):
    """Through a real job: collisions summed over chunks equal the whole-scene count (halos count nothing twice)."""
    from rasterio.transform import from_origin

    from pipeline.run import run_job
    from schemas.job import job_from_dict

    rng = np.random.default_rng(3)
    data = rng.integers(0, 3, (3, 150, 170), dtype=np.uint8)  # many zeros: nodata=0 collides with valid data
    path = tmp_path / "dark.tif"
    with rasterio.open(
        path, "w", driver="GTiff", height=150, width=170, count=3, dtype="uint8", nodata=0, crs="EPSG:32633",
        transform=from_origin(500000, 4600000, 10, 10),
    ) as dst:
        dst.write(data)
    all_zero = (data == 0).all(axis=0)
    expected = int(((data == 0).any(axis=0) & ~all_zero).sum())
    spec = job_from_dict({
        "scenes": [{"image": str(path), "name": "dark"}], "model": "pixel_linear", "classes": ["a", "b"],
        "tile_size": 64, "overlap": 16, "chunk_size": 64, "num_actors": 1, "out": str(tmp_path / "out"),
    })
    result = run_job(spec, show_progress=False)
    assert result.scenes[0].nodata_collisions == expected > 0
    mask = zarr.open_array(str(result.layout.mask_store("dark")), path="mask", mode="r")[:]
    assert np.array_equal(mask == 255, all_zero)  # nodata exactly where every band is 0, as GDAL says
