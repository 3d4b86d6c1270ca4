"""`satseg export MASK --cog OUT.tif`: a valid COG with overviews and a colour table, equal to the Zarr mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr
from rio_cogeo.cogeo import cog_validate

from pipeline.cli import main
from pipeline.cog import export_cog
from pipeline.palette import class_colours
from tests.mask_stores import blob_mask, write_store

NAMES = ["water", "forest", "cropland", "urban"]
H, W = 1301, 1577  # odd, and large enough for two overview levels of 512-px tiles


def _mode_pattern(mask: np.ndarray) -> None:
    """Regions where 2x2 MODE differs from NEAREST: 3 of 4 pixels class 2; 3 of 4 nodata around a class 3."""
    region = np.full((64, 64), 2, dtype=np.uint8)
    for i in range(32):
        for j in range(32):
            k = (i + j) % 4
            region[2 * i + k // 2, 2 * j + k % 2] = 1
    mask[400:464, 400:464] = region
    sparse = np.full((64, 64), 255, dtype=np.uint8)
    sparse[::2, ::2] = 3
    mask[600:664, 600:664] = sparse


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mask = blob_mask(H, W, len(NAMES), seed=3)
    _mode_pattern(mask)
    path = write_store(tmp_path_factory.mktemp("cog") / "scene.zarr", mask, 300, NAMES)
    return path, mask


@pytest.fixture(scope="module")
def cog(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("cog_out") / "scene.tif"
    assert main(["export", str(store[0]), "--cog", str(out)]) == 0
    return out


def test_cog_validates(cog):
    valid, errors, warnings = cog_validate(str(cog))
    assert valid and errors == [], errors


def test_cog_pixels_crs_and_transform_equal_the_store(cog, store):
    path, mask = store
    ref = xr.open_zarr(path, decode_coords="all")["mask"]
    with rasterio.open(cog) as src:
        assert src.read(1).tobytes() == mask.tobytes()
        assert src.crs == ref.rio.crs and src.crs.to_epsg() == 32633
        assert tuple(src.transform)[:6] == tuple(ref.rio.transform())[:6]
        assert src.nodata == 255 and src.dtypes[0] == "uint8"
        assert src.block_shapes == [(512, 512)] and src.compression.name == "deflate"


def test_cog_has_mode_overviews(cog):
    with rasterio.open(cog) as src:
        assert src.overviews(1) == [2, 4]
    with rasterio.open(cog, overview_level=0) as ov:
        level = ov.read(1)
    # Inside the patterned regions (away from their edges, where GDAL's rounding mixes neighbours):
    assert np.unique(level[203:229, 203:229]).tolist() == [2]  # nearest would pick the odd class 1 in a quarter of them
    assert np.unique(level[303:329, 303:329]).tolist() == [3]  # nodata ignored


def test_cog_colour_table_and_class_names(cog):
    colours = class_colours(len(NAMES))
    with rasterio.open(cog) as src:
        cmap = src.colormap(1)
        tags = src.tags()
        band_tags = src.tags(1)
    assert [cmap[i][:3] for i in range(len(NAMES))] == [tuple(int(v) for v in c) for c in colours]
    assert len({cmap[i] for i in range(len(NAMES))}) == len(NAMES)
    assert cmap[255][3] == 0  # nodata transparent
    assert json.loads(tags["satseg_class_names"]) == NAMES
    assert [band_tags[f"class_{i}"] for i in range(len(NAMES))] == NAMES


def test_export_cog_function_reports_what_it_wrote(store, tmp_path):
    result = export_cog(store[0], tmp_path / "x.tif")
    assert result.shape == (H, W) and result.class_names == NAMES and result.overviews == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.qml", "x.tif", "x.tif.aux.xml"]  # no temporary files left
    assert (result.style, result.categories, result.stac_item) == (tmp_path / "x.qml", tmp_path / "x.tif.aux.xml", None)


def _one_line_error(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("satseg: error: ") and fragment in lines[0], err


def test_user_errors_are_one_line_with_status_2_and_write_nothing(store, tmp_path, capsys):
    out = tmp_path / "o.tif"
    incomplete = write_store(tmp_path / "half.zarr", blob_mask(40, 50, 2, seed=1), 32, ["a", "b"], complete=False)
    _one_line_error(capsys, ["export", str(tmp_path / "nope.zarr"), "--cog", str(out)], "mask store not found")
    _one_line_error(capsys, ["export", str(tmp_path), "--cog", str(out)], "not a satseg mask store")
    _one_line_error(capsys, ["export", str(incomplete), "--cog", str(out)], "not complete")
    _one_line_error(capsys, ["export", str(store[0]), "--cog", str(tmp_path / "o.png")], "ending in .tif")
    _one_line_error(capsys, ["export", str(store[0]), "--cog", str(out), "--format", "torchscript"], "for model exports")
    _one_line_error(capsys, ["export", str(store[0])], "is a mask store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.zarr"]
    out.write_bytes(b"keep me")
    _one_line_error(capsys, ["export", str(store[0]), "--cog", str(out)], "already exists")
    assert out.read_bytes() == b"keep me"
    assert main(["export", str(store[0]), "--cog", str(out), "--overwrite"]) == 0
    assert cog_validate(str(out))[0]
