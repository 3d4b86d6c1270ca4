"""Overview levels of mask stores: mode downsampling against a loop transcription, layout metadata, readers."""

from __future__ import annotations

from collections import Counter

import dask
import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
import zarr

from pipeline.counting import dask_scheduler
from pipeline.overviews import mode_downsample, overview_shapes, read_overview_levels, write_overviews
from tests.mask_stores import TRANSFORM, write_store

NAMES = ["a", "b", "c", "d"]


def reference_mode(a: np.ndarray) -> np.ndarray:
    """2x2 mode by a plain loop: nodata (255) ignored unless the whole block is nodata, ties to the smallest class."""
    h, w = a.shape
    out = np.empty(((h + 1) // 2, (w + 1) // 2), dtype=np.uint8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            counts = Counter(int(v) for v in a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel() if v != 255)
            if not counts:
                out[i, j] = 255
                continue
            best = max(counts.values())
            out[i, j] = min(v for v, n in counts.items() if n == best)
    return out


def adversarial_mask(h: int, w: int, seed: int) -> np.ndarray:
    """Few classes (ties everywhere), nodata speckle and whole nodata blocks, class values up to 254."""
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.array([0, 1, 2, 254, 255], dtype=np.uint8), size=(h, w), p=[0.3, 0.25, 0.2, 0.05, 0.2])
    mask[: h // 5, : w // 4] = 255
    mask[-1, :] = 3  # a class only in the odd last row
    return mask


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 7), (5, 1), (2, 2), (7, 9), (64, 33), (101, 100)])
def test_mode_downsample_equals_the_loop_transcription(h, w):
    for seed in range(3):
        mask = adversarial_mask(h, w, seed)
        assert np.array_equal(mode_downsample(mask), reference_mode(mask)), (h, w, seed)


def test_mode_downsample_rules():
    block = np.array([[1, 2], [2, 1]], dtype=np.uint8)
    assert mode_downsample(block)[0, 0] == 1  # tie: smallest class
    assert mode_downsample(np.array([[255, 255], [255, 7]], dtype=np.uint8))[0, 0] == 7  # nodata ignored
    assert mode_downsample(np.full((2, 2), 255, dtype=np.uint8))[0, 0] == 255  # all nodata stays nodata
    assert mode_downsample(np.array([[3, 3], [3, 0]], dtype=np.uint8))[0, 0] == 3


def test_overview_shapes_halve_until_they_fit():
    assert overview_shapes(301, 367, 64) == [(151, 184), (76, 92), (38, 46)]
    assert overview_shapes(512, 100) == []
    assert overview_shapes(513, 1) == [(257, 1)]
    assert overview_shapes(5, 3, 1) == [(3, 2), (2, 1), (1, 1)]


@pytest.fixture(scope="module")
def scene_mask():
    return adversarial_mask(301, 367, seed=11)


@pytest.mark.parametrize("chunk", [64, 100, 173])
def test_levels_equal_iterated_numpy_mode_for_any_chunking(tmp_path, scene_mask, chunk):
    store = write_store(tmp_path / "m.zarr", scene_mask, chunk, NAMES)
    levels = write_overviews(store, max_size=64)
    assert [lv.shape for lv in levels] == [(301, 367), (151, 184), (76, 92), (38, 46)]
    expected = scene_mask
    for lv in levels[1:]:
        expected = reference_mode(expected)
        stored = zarr.open_array(str(store), path=lv.path, mode="r")
        assert stored.dtype == np.uint8 and stored.fill_value == 255
        assert np.array_equal(stored[:], expected), f"level {lv.level} with chunk {chunk}"
    assert np.array_equal(zarr.open_array(str(store), path="mask", mode="r")[:], scene_mask)


def test_levels_compute_on_ray_as_on_a_cluster(ray_local, tmp_path, scene_mask):
    """On a cluster the Dask graph runs on Ray: it must hold paths, not Zarr objects, and give the same levels."""
    store = write_store(tmp_path / "m.zarr", scene_mask, 100, NAMES)
    with dask.config.set(scheduler=dask_scheduler(True)):
        levels = write_overviews(store, max_size=100)
    assert [lv.shape for lv in levels] == [(301, 367), (151, 184), (76, 92)]
    once = reference_mode(scene_mask)
    assert np.array_equal(zarr.open_array(str(store), path="1/mask", mode="r")[:], once)
    assert np.array_equal(zarr.open_array(str(store), path="2/mask", mode="r")[:], reference_mode(once))


def test_multiscales_metadata_follows_geozarr_and_ome(tmp_path, scene_mask):
    store = write_store(tmp_path / "m.zarr", scene_mask, 100, NAMES)
    levels = write_overviews(store, max_size=64)
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert "d35379db-88df-4056-af3a-620245f8e347" in [c["uuid"] for c in attrs["zarr_conventions"]]
    layout = attrs["multiscales"]["layout"]
    assert [e["asset"] for e in layout] == ["mask", "1/mask", "2/mask", "3/mask"]
    assert "derived_from" not in layout[0] and layout[0]["transform"]["scale"] == [1.0, 1.0]
    a, b, c, d, e, f = TRANSFORM
    for k, entry in enumerate(layout[1:], start=1):
        assert entry["derived_from"] == layout[k - 1]["asset"]
        assert entry["transform"] == {"scale": [2.0, 2.0], "translation": [0.0, 0.0]}
        assert entry["resampling_method"] == "mode"
        assert entry["spatial:transform"] == [a * 2**k, b, c, d, e * 2**k, f]
        assert tuple(entry["spatial:shape"]) == zarr.open_array(str(store), path=entry["asset"], mode="r").shape
    assert attrs["proj:code"] == "EPSG:32633"
    assert attrs["spatial:bbox"] == [c, f + e * 301, c + a * 367, f]
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    datasets = ome["multiscales"][0]["datasets"]
    assert [ds["path"] for ds in datasets] == [e["asset"] for e in layout]
    for k, ds in enumerate(datasets):
        scale, translation = ds["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [2.0**k, 2.0**k]}
        assert translation == {"type": "translation", "translation": [(2**k - 1) / 2] * 2}
    assert read_overview_levels(store) == levels


def test_xarray_opens_the_store_and_each_level_georeferenced(tmp_path, scene_mask):
    store = write_store(tmp_path / "m.zarr", scene_mask, 100, NAMES)
    before = xr.open_zarr(store, decode_coords="all")
    variables = set(before.variables)
    before.close()
    write_overviews(store, max_size=64)
    ds = xr.open_zarr(store, decode_coords="all")
    mask = ds["mask"]
    assert set(ds.variables) == variables  # the levels live in child groups, not beside the mask
    assert np.array_equal(mask.values, scene_mask)
    assert mask.rio.crs.to_epsg() == 32633
    assert tuple(mask.rio.transform())[:6] == TRANSFORM
    level2 = xr.open_zarr(store, group="2", decode_coords="all")["mask"]
    assert level2.shape == (76, 92) and level2.rio.crs.to_epsg() == 32633
    assert tuple(level2.rio.transform())[:6] == (40.0, 0.0, TRANSFORM[2], 0.0, -40.0, TRANSFORM[5])
    assert level2.rio.bounds()[0] == mask.rio.bounds()[0] and level2.rio.bounds()[3] == mask.rio.bounds()[3]


def test_rewriting_replaces_the_levels(tmp_path, scene_mask):
    store = write_store(tmp_path / "m.zarr", scene_mask, 100, NAMES)
    write_overviews(store, max_size=64)
    levels = write_overviews(store, max_size=200)
    assert [lv.shape for lv in levels] == [(301, 367), (151, 184)]
    root = zarr.open_group(str(store), mode="r")
    assert sorted(k for k in root.group_keys()) == ["1"]
    assert [e["asset"] for e in root.attrs["multiscales"]["layout"]] == ["mask", "1/mask"]
    small = write_store(tmp_path / "small.zarr", scene_mask[:40, :50], 32, NAMES)
    assert [lv.path for lv in write_overviews(small)] == ["mask"]  # fits already: level 0 alone, still described
    assert zarr.open_group(str(small), mode="r").attrs["multiscales"]["layout"][0]["asset"] == "mask"
