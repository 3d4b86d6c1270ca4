"""Decimated views: samples line up with GDAL's, colours mean what the legend says, palettes stay distinct."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.core.geometry import Window
from pipeline.palette import class_colours
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
    read_labels,
    rgb_bands,
    sample_positions,
    stretch,
)

H, W = 301, 367


@pytest.fixture(scope="module")
def index_raster(tmp_path_factory):
    """Each pixel holds row * 1000 + col, so a decimated read says which pixels GDAL sampled."""
    path = tmp_path_factory.mktemp("idx") / "idx.tif"
    values = (np.arange(H)[:, None] * 1000 + np.arange(W)[None, :]).astype("int32")
    with rasterio.open(path, "w", driver="GTiff", height=H, width=W, count=1, dtype="int32",
                       transform=from_origin(0, 3000, 10, 10), tiled=True, blockxsize=128, blockysize=128) as dst:
        dst.write(values, 1)
    return path


@pytest.mark.parametrize(
    ("window", "out"),
    [((0, 0, H, W), (76, 92)), ((0, 0, H, W), (100, 123)), ((0, 0, H, W), (H, W)), ((100, 173, 100, 100), (50, 50)),
     ((7, 11, 173, 99), (60, 34)), ((300, 0, 1, 367), (1, 160))],
)
def test_sample_positions_are_the_pixels_gdal_reads(index_raster, window, out):
    r0, c0, h, w = window
    with rasterio.open(index_raster) as src:
        got = src.read(1, window=rasterio.windows.Window(c0, r0, w, h), out_shape=out)
    assert np.array_equal(got // 1000, np.broadcast_to(sample_positions(r0, h, out[0])[:, None], out))
    assert np.array_equal(got % 1000, np.broadcast_to(sample_positions(c0, w, out[1])[None, :], out))


def test_display_shape_keeps_aspect_and_never_upsamples():
    assert display_shape(301, 367, 900) == (301, 367)
    assert display_shape(2100, 1900, 900) == (900, 814)
    assert display_shape(1, 5000, 160) == (1, 160)


def test_rgb_bands_prefers_descriptions_then_3_2_1():
    assert rgb_bands(("blue", "green", "red", "nir"), 4) == [3, 2, 1]
    assert rgb_bands(("Red", "Green", "Blue"), 3) == [1, 2, 3]
    assert rgb_bands((None,) * 6, 6) == [3, 2, 1]
    assert rgb_bands((None,), 1) == [1]


def test_stretch_clips_percentiles_and_blacks_out_invalid():
    band = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    valid = np.ones((10, 10), dtype=bool)
    valid[0, 0] = False
    rgb = stretch(band, valid)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[9, 9].tolist() == [255, 255, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all()  # a single band is grey


def test_error_colours_follow_truth_and_prediction():
    truth = np.array([[0, 1, 2, -1, 1]])
    pred = np.array([[0, 2, 2, 1, 255]], dtype=np.uint8)
    overall = error_rgb(truth, pred, 3)
    assert [tuple(v) for v in overall[0]] == [TP_COLOUR, WRONG_COLOUR, TP_COLOUR, UNSCORED_COLOUR, UNSCORED_COLOUR]
    cls1 = class_error_rgb(truth, pred, 3, 1)
    assert [tuple(v) for v in cls1[0]] == [TN_COLOUR, FN_COLOUR, TN_COLOUR, UNSCORED_COLOUR, UNSCORED_COLOUR]
    cls2 = class_error_rgb(truth, pred, 3, 2)
    assert [tuple(v) for v in cls2[0]] == [TN_COLOUR, FP_COLOUR, TP_COLOUR, UNSCORED_COLOUR, UNSCORED_COLOUR]


def test_labels_map_values_to_classes_and_drop_ignored(tmp_path):
    path = tmp_path / "labels.tif"
    values = np.array([[10, 20, 30, 99, 0]], dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", height=1, width=5, count=1, dtype="uint8", nodata=0,
                       transform=from_origin(0, 10, 1, 1)) as dst:
        dst.write(values, 1)
    lookup = label_lookup([10, 20, 30], 3)
    assert read_labels(path, (1, 5), lookup, 20).tolist() == [[0, -1, 2, -1, -1]]  # 20 ignored, 99 unknown, 0 nodata
    assert read_labels(path, (1, 2), lookup, None, Window(0, 1, 1, 2)).tolist() == [[1, 2]]


def test_class_colours_are_distinct_for_every_class_count():
    for n in (1, 5, 20, 21, 255):
        colours = class_colours(n)
        assert colours.shape == (n, 3) and len({tuple(c) for c in colours}) == n
    with pytest.raises(ValueError):
        class_colours(256)
