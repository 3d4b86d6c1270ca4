"""Footprints of scenes in different UTM zones share one lon/lat geometry column (GeoParquet, geopandas, DuckDB),
with each scene's own CRS and native footprint beside it; `satseg query` names only the tables a folder has."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.warp import transform_bounds

from pipeline.cli import main
from pipeline.core.geometry import ChunkGrid, Window
from pipeline.counting import ChunkCounts
from pipeline.query import run_query
from pipeline.report_tables import footprints, tiles_table, write_scene_reports
from pipeline.synthetic import write_synthetic_scene
from schemas.errors import SpecError
from schemas.reports import SCHEMA_VERSION
from schemas.store import OutputLayout
from tests.conftest import CLASSES
from workers.reader import SceneInfo, open_scene

ZONES = {"west": 32631, "east": 32632}
CHUNK = 64


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory):
    """Two real GeoTIFF scenes, one in UTM zone 31N and one in 32N."""
    folder = tmp_path_factory.mktemp("zones")
    return {name: write_synthetic_scene(folder, name, 150, 170, seed=3, cell=40, epsg=epsg) for name, epsg in ZONES.items()}


def _counts(grid: ChunkGrid) -> ChunkCounts:
    rows, cols = grid.shape
    return ChunkCounts(None, np.zeros((rows, cols, len(CLASSES)), np.int64), np.ones((rows, cols), np.int64), None)


def _write_reports(root, scenes: dict) -> OutputLayout:
    """The report tables of each scene as a job writes them (no Ray: the counts are made up, the footprints real)."""
    layout = OutputLayout(root)
    for name, scene in scenes.items():
        info = open_scene(scene.image)
        grid = ChunkGrid(info.height, info.width, CHUNK)
        row = {"scene": name, "image": str(scene.image), "height": info.height, "width": info.width,
               "num_classes": len(CLASSES), "class_names": CLASSES, "crs": info.crs}
        write_scene_reports(layout, "j1", grid, info, CLASSES, None, _counts(grid), row)
    return layout


def _ring(wkb: bytes) -> np.ndarray:
    n = struct.unpack_from("<I", wkb, 9)[0]
    return np.frombuffer(wkb, "<f8", 2 * n, 13).reshape(n, 2)


def test_tiles_of_two_utm_zones_share_one_lonlat_column(two_zones, tmp_path):
    geopandas = pytest.importorskip("geopandas")
    from pyproj import CRS, Geod

    layout = _write_reports(tmp_path, two_zones)
    tiles = geopandas.read_parquet(layout.reports / "tiles")
    assert tiles.crs.equals(CRS("EPSG:4326"), ignore_axis_order=True) and tiles.crs.axis_info[0].abbrev.lower() == "lon"
    meta = json.loads(pq.read_schema(next((layout.reports / "tiles").glob("*/west.parquet"))).metadata[b"geo"])
    assert "crs" not in meta["columns"]["geometry"]  # the GeoParquet default: OGC:CRS84, lon/lat
    for name, scene in two_zones.items():
        mine = tiles[tiles["scene"] == name]
        assert len(mine) == 3 * 3
        with rasterio.open(scene.image) as src:
            expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
            native_area = (src.bounds.right - src.bounds.left) * (src.bounds.top - src.bounds.bottom)
            assert set(mine["epsg"]) == {src.crs.to_epsg()} and CRS.from_wkt(mine["crs"].iloc[0]) == CRS(src.crs.to_wkt())
        assert tuple(mine.total_bounds) == pytest.approx(expected, abs=1e-9)
        # each footprint is the chunk outline reprojected (densified), not a box: it covers the chunk's true area
        geod = Geod(ellps="WGS84")
        area = sum(abs(geod.geometry_area_perimeter(g)[0]) for g in mine.geometry)
        assert area == pytest.approx(native_area, rel=2e-3)  # UTM scale error near the central meridian
        assert all(len(g.exterior.coords) > 5 for g in mine.geometry) and all(g.exterior.is_ccw for g in mine.geometry)
        first = mine.sort_values(["chunk_row", "chunk_col"]).iloc[0]
        native = _ring(first["geometry_native"])
        with rasterio.open(scene.image) as src:
            assert native.min(axis=0)[0] == src.bounds.left and native.max(axis=0)[1] == src.bounds.top
        box = pq.read_table(layout.report_file("tiles", "j1", name)).to_pylist()[0]["bbox"]  # geopandas leaves the covering out
        assert (box["xmin"], box["ymin"], box["xmax"], box["ymax"]) == pytest.approx(first.geometry.bounds, abs=1e-12)
    west, east = (tiles[tiles["scene"] == n].total_bounds for n in ZONES)
    assert 2.9 < west[0] < 3.2 and 8.9 < east[0] < 9.2  # near each zone's central meridian (3 and 9 degrees east)
    scenes = geopandas.read_parquet(layout.reports / "scenes")
    assert scenes.crs == tiles.crs and len(scenes) == 2
    for _, row in scenes.iterrows():
        chunks = tiles[tiles["scene"] == row["scene"]]
        assert row.geometry.area == pytest.approx(chunks.geometry.union_all().area, rel=1e-6)


def test_duckdb_reads_footprints_of_both_zones(two_zones, tmp_path):
    layout = _write_reports(tmp_path, two_zones)
    cols, rows = run_query(layout.root, "SELECT DISTINCT scene, epsg, ST_CRS(geometry) FROM tiles ORDER BY scene")[:2]
    assert rows == [("east", 32632, "OGC:CRS84"), ("west", 32631, "OGC:CRS84")]
    text = run_query(layout.root, "SELECT ST_AsText(geometry), ST_AsText(ST_GeomFromWKB(geometry_native)) FROM scenes "
                                  "WHERE scene = 'west'")[1][0]
    assert text[0].startswith("POLYGON ((3.") and text[1].startswith("POLYGON ((500030 ")
    # the tables of a plain job folder: no `runs` in the error; ST_ functions of the spatial extension say how to get it
    with pytest.raises(SpecError) as err:
        run_query(layout.root, "SELECT * FROM runs")
    assert "tables here are tiles, classes, scenes, curves" in str(err.value) and "runs" not in str(err.value).split("tables here")[1]
    from pipeline.query import spatial_available

    if not spatial_available():
        assert main(["query", "SELECT sum(ST_Area(geometry_native::GEOMETRY)) FROM tiles", "--reports", str(layout.root)]) == 2
    else:  # DuckDB's spatial extension is installed on this machine: the README's spatial SQL runs
        _, rows = run_query(layout.root, "SELECT round(sum(ST_Area(ST_GeomFromWKB(geometry_native)))) FROM tiles")[:2]
        assert rows[0][0] == 2 * 150 * 170 * 100


def test_a_reports_folder_whose_name_looks_like_a_pattern_is_queried(two_zones, tmp_path):
    layout = _write_reports(tmp_path / "runs [1] *?", {"west": two_zones["west"]})
    assert run_query(layout.root, "SELECT scene, count(*) FROM tiles GROUP BY scene").rows == [("west", 9)]


def test_spatial_function_without_the_extension_is_one_line(two_zones, tmp_path, capsys):
    from pipeline.query import spatial_available

    layout = _write_reports(tmp_path, {"west": two_zones["west"]})
    if spatial_available():
        pytest.skip("DuckDB's spatial extension is installed here")
    assert main(["query", "SELECT ST_Area(geometry) FROM tiles", "--reports", str(layout.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spatial extension" in err[0] and "INSTALL spatial" in err[0], err


def test_a_scene_without_crs_has_no_lonlat_footprint():
    info = SceneInfo("x.tif", 40, 50, 1, "uint8", None, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), None)
    table = tiles_table("x", ChunkGrid(40, 50, 32), info, _counts(ChunkGrid(40, 50, 32)))
    rows = table.to_pylist()
    assert all(r["geometry"] is None and r["bbox"] is None and r["epsg"] is None for r in rows)
    assert _ring(rows[0]["geometry_native"]).tolist() == [[0, -32], [32, -32], [32, 0], [0, 0], [0, -32]]
    assert table.schema.metadata[b"satseg_schema_version"] == str(SCHEMA_VERSION).encode()
    assert "bbox" not in json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]


def test_footprint_follows_the_curved_outline():
    """A large window far from the central meridian: its lon/lat outline bends, and the densified ring follows it."""
    import shapely
    from rasterio.crs import CRS

    info = SceneInfo("x.tif", 20000, 20000, 1, "uint8", CRS.from_epsg(32631).to_wkt(), (10.0, 0, 200000.0, 0, -10.0, 6500000.0), None)
    foot = footprints(info, [Window(0, 0, 20000, 20000)])[0]
    ring = _ring(foot.lonlat)
    assert len(ring) == 4 * 16 + 1
    corners = shapely.Polygon(ring[::16])  # the four corners alone: what a reprojected box would be
    bend = max(corners.exterior.distance(shapely.Point(p)) for p in ring)
    assert bend > 1e-3  # degrees: about 100 m of outline a box would miss
    assert foot.bbox == pytest.approx(transform_bounds("EPSG:32631", "EPSG:4326", 200000, 6300000, 400000, 6500000, densify_pts=16),
                                      abs=1e-9)


def test_mixed_old_and_new_tiles_reports_say_what_to_do(two_zones, tmp_path):
    """Reports of schema 3 kept footprints in the scene CRS: two zones cannot share a column; the error says why."""
    from pyproj import CRS

    layout = _write_reports(tmp_path, two_zones)
    for name, epsg in ZONES.items():
        path = layout.report_file("tiles", "j1", name)
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"geo"])
        meta["columns"]["geometry"]["crs"] = CRS.from_epsg(epsg).to_json_dict()
        old = table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(meta).encode(),
                                             b"satseg_schema_version": b"3"})
        pq.write_table(old.set_column(old.schema.get_field_index("geometry"), "geometry", old["geometry_native"]), path)
    assert run_query(layout.root, "SELECT count(*) FROM tiles")[1] == [(18,)]
    with pytest.raises(SpecError, match="before satseg report schema 4"):
        run_query(layout.root, "SELECT ST_AsText(geometry) FROM tiles")


@pytest.mark.slow
def test_a_job_over_two_utm_zones_writes_one_lonlat_column(ray_local, two_zones, tmp_path):
    """Through Ray: a real job over the two scenes; geopandas and DuckDB read all its footprints in lon/lat."""
    geopandas = pytest.importorskip("geopandas")
    from pyproj import CRS

    from pipeline.run import run_job
    from tests.test_pipeline import job

    scenes = [{"image": str(s.image), "labels": str(s.labels), "name": n} for n, s in two_zones.items()]
    result = run_job(job(two_zones["west"], tmp_path / "out", scenes=scenes, chunk_size=CHUNK), show_progress=False)
    tiles = geopandas.read_parquet(result.layout.reports / "tiles")
    assert tiles.crs == CRS("OGC:CRS84") and sorted(set(tiles["epsg"])) == sorted(ZONES.values())
    for name, scene in two_zones.items():
        with rasterio.open(scene.image) as src:
            expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        assert tuple(tiles[tiles["scene"] == name].total_bounds) == pytest.approx(expected, abs=1e-9)
    _, rows = run_query(result.layout.root, "SELECT scene, ST_CRS(geometry), count(*) FROM tiles GROUP BY ALL ORDER BY scene")[:2]
    assert rows == [("east", "OGC:CRS84", 9), ("west", "OGC:CRS84", 9)]
    _, rows = run_query(result.layout.root, "SELECT scene, epsg, ST_AsText(geometry) IS NOT NULL FROM scenes ORDER BY scene")[:2]
    assert rows == [("east", 32632, True), ("west", 32631, True)]


def test_bounds_of_a_rotated_grid_cover_all_four_corners():
    rotated = rasterio.Affine.rotation(30) * rasterio.Affine.scale(1, -1)
    info = SceneInfo("x", 10, 10, 1, "uint8", None, tuple(rotated)[:6], None)
    corners = [rotated * (c, r) for r in (0, 10) for c in (0, 10)]
    xs, ys = zip(*corners)
    assert info.bounds(Window(0, 0, 10, 10)) == pytest.approx((min(xs), min(ys), max(xs), max(ys)))
    # north up: the two opposite corners alone, as before
    north = SceneInfo("y", 10, 20, 1, "uint8", None, (0.5, 0, 100, 0, -0.5, 200), None)
    assert north.bounds(Window(2, 4, 3, 6)) == (102.0, 197.5, 105.0, 199.0)
