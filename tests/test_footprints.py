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
    rotated = rasterio.Affine.rotation(30) @ rasterio.Affine.scale(1, -1)
    info = SceneInfo("x", 10, 10, 1, "uint8", None, tuple(rotated)[:6], None)
    corners = [rotated @ (c, r) for r in (0, 10) for c in (0, 10)]
    xs, ys = zip(*corners)
    assert info.bounds(Window(0, 0, 10, 10)) == pytest.approx((min(xs), min(ys), max(xs), max(ys)))
    # north up: the two opposite corners alone, as before
    north = SceneInfo("y", 10, 20, 1, "uint8", None, (0.5, 0, 100, 0, -0.5, 200), None)
    assert north.bounds(Window(2, 4, 3, 6)) == (102.0, 197.5, 105.0, 199.0)


# ---- the antimeridian: footprints that cross 180° are cut there (RFC 7946 §3.1.9, §5.2) ---------------------------

ACROSS = {"utm60n": 32660, "utm1n": 32601, "pacific_mercator": 3832}


def _scene_across(folder, name: str, epsg: int, lat: float = 50.0, size: int = 200, res: float = 500.0):
    """A real GeoTIFF straddling 180° (about 179.3°E to 179.3°W at ``lat``), off-centre so the cut is not symmetric."""
    from types import SimpleNamespace

    from pyproj import Transformer

    x, y = Transformer.from_crs("OGC:CRS84", f"EPSG:{epsg}", always_xy=True).transform(180.0, lat)
    transform = rasterio.Affine(res, 0, x - 0.4 * size * res, 0, -res, y + 0.5 * size * res)
    path = folder / f"{name}.tif"
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=1, dtype="uint8", crs=f"EPSG:{epsg}",
                       transform=transform) as dst:
        dst.write(np.zeros((1, size, size), np.uint8))
    return SimpleNamespace(image=path)


def _parts(wkb: bytes) -> list[np.ndarray]:
    """The outer rings of a WKB Polygon or MultiPolygon, parsed here from the bytes (not by the code under test)."""
    kind = struct.unpack_from("<I", wkb, 1)[0]
    if kind == 3:
        return [_ring(wkb)]
    assert kind == 6 and wkb[0] == 1
    rings, at = [], 9
    for _ in range(struct.unpack_from("<I", wkb, 5)[0]):
        assert struct.unpack_from("<BII", wkb, at) == (1, 3, 1)
        rings.append(_ring(wkb[at:]))
        at += 13 + 16 * len(rings[-1])
    assert at == len(wkb)
    return rings


def _old_lonlat(info: SceneInfo, window: Window, points: int = 16) -> tuple[bytes, tuple]:
    """The lon/lat footprint as satseg wrote it before the antimeridian cut: the densified ring reprojected, as is."""
    from rasterio.warp import transform

    minx, miny, maxx, maxy = info.bounds(window)
    t = np.arange(points) / points
    xs = np.concatenate([minx + (maxx - minx) * t, np.full(points, maxx), maxx - (maxx - minx) * t, np.full(points, minx)])
    ys = np.concatenate([np.full(points, miny), miny + (maxy - miny) * t, np.full(points, maxy), maxy - (maxy - miny) * t])
    lon, lat = (np.asarray(v) for v in transform(info.crs, "OGC:CRS84", np.append(xs, xs[0]), np.append(ys, ys[0])))
    ring = np.stack([lon, lat], axis=1).astype("<f8")
    return struct.pack("<BIII", 1, 3, 1, len(ring)) + ring.tobytes(), (lon.min(), lat.min(), lon.max(), lat.max())


@pytest.mark.parametrize("name", ACROSS)
def test_a_scene_across_the_antimeridian_is_cut_in_two(tmp_path, name):
    import shapely
    from pyproj import Geod

    info = open_scene(_scene_across(tmp_path, name, ACROSS[name]).image)
    whole = Window(0, 0, info.height, info.width)
    foot = footprints(info, [whole])[0]
    old, _ = _old_lonlat(info, whole)
    assert _ring(old)[:, 0].min() < -179 and _ring(old)[:, 0].max() > 179  # what it was: a ring around the globe
    parts = _parts(foot.lonlat)
    assert struct.unpack_from("<I", foot.lonlat, 1)[0] == 6 and len(parts) == 2
    east, west = sorted(parts, key=lambda r: -r[:, 0].max())  # east of 0 (up to +180) first
    assert east[:, 0].max() == 180.0 and 179 < east[:, 0].min() and west[:, 0].min() == -180.0 and west[:, 0].max() < -179
    assert all(np.array_equal(r[0], r[-1]) and shapely.Polygon(r).is_valid and shapely.Polygon(r).exterior.is_ccw for r in parts)
    # the two parts, the western one moved by 360°, are the whole outline unwrapped: nothing lost, nothing added
    unwrapped = _ring(old).copy()
    unwrapped[:, 0] = np.unwrap(unwrapped[:, 0], period=360.0) % 360.0
    whole_poly = shapely.Polygon(unwrapped)
    moved = shapely.union_all([shapely.Polygon(east), shapely.Polygon(west + [360.0, 0.0])])
    assert moved.geom_type == "Polygon" and moved.symmetric_difference(whole_poly).area < 1e-12 * whole_poly.area + 1e-15
    geod = Geod(ellps="WGS84")
    area = sum(abs(geod.geometry_area_perimeter(shapely.Polygon(r))[0]) for r in parts)
    whole_area = abs(geod.geometry_area_perimeter(whole_poly)[0])
    assert area == pytest.approx(whole_area, rel=1e-6)  # geodesic edges: the cut bends them a hair
    # bbox: west > east (RFC 7946 §5.2), as GDAL's own antimeridian-aware bounds say
    xmin, ymin, xmax, ymax = foot.bbox
    assert xmin > xmax and xmin == east[:, 0].min() and xmax == west[:, 0].max()
    assert (ymin, ymax) == (min(r[:, 1].min() for r in parts), max(r[:, 1].max() for r in parts))
    assert foot.bbox == pytest.approx(transform_bounds(info.crs, "OGC:CRS84", *info.bounds(whole), densify_pts=15), abs=1e-6)


def test_tiles_and_scenes_across_the_antimeridian(tmp_path):
    """Chunks on either side stay Polygons, the ones over 180° are cut; the GeoParquet metadata, geopandas and DuckDB agree."""
    geopandas = pytest.importorskip("geopandas")
    import shapely

    layout = _write_reports(tmp_path, {"across": _scene_across(tmp_path, "across", 32660)})
    table = pq.read_table(layout.report_file("tiles", "j1", "across"))
    rows = table.to_pylist()
    kinds = [struct.unpack_from("<I", r["geometry"], 1)[0] for r in rows]
    assert kinds.count(6) == 4 and kinds.count(3) == 12  # a 4 x 4 grid of chunks, one column of them over 180°
    for r, kind in zip(rows, kinds):
        rings = _parts(r["geometry"])
        assert all(-180 <= ring[:, 0].min() and ring[:, 0].max() <= 180 for ring in rings)
        b = r["bbox"]
        assert (b["xmin"] > b["xmax"]) == (kind == 6)
    geo = json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]
    assert geo["geometry_types"] == ["MultiPolygon", "Polygon"]
    west, south, east, north = geo["bbox"]
    assert west > east and 179 < west < 180 and -180 < east < -179
    scene = pq.read_table(layout.report_file("scenes", "j1", "across")).to_pylist()[0]
    assert geo["bbox"] == pytest.approx([scene["bbox"][k] for k in ("xmin", "ymin", "xmax", "ymax")], abs=1e-9)
    tiles = geopandas.read_parquet(layout.reports / "tiles")
    assert set(tiles.geom_type) == {"Polygon", "MultiPolygon"}
    scenes = geopandas.read_parquet(layout.reports / "scenes")
    assert scenes.geometry.iloc[0].geom_type == "MultiPolygon"
    assert scenes.geometry.iloc[0].area == pytest.approx(shapely.union_all(list(tiles.geometry)).area, rel=1e-4)
    # satseg query: DuckDB reads the MultiPolygons; the covering says which rows cross
    _, rows = run_query(layout.root, "SELECT ST_AsText(geometry) FROM scenes")[:2]
    text = rows[0][0]
    assert text.startswith("MULTIPOLYGON (((") and "), ((" in text and "(180 " in text and " -180 " in text
    _, rows = run_query(layout.root, "SELECT count(*) FROM tiles WHERE bbox.xmin > bbox.xmax")[:2]
    assert rows == [(4,)]


def test_the_stac_item_of_a_scene_across_the_antimeridian_validates(tmp_path):
    from pystac.validation import validate_dict

    from pipeline.stac_output import write_stac
    from tests.test_outputs_explain import _validator
    from workers.mask_store import create_mask_store, mark_complete, write_mask_chunk

    info = open_scene(_scene_across(tmp_path, "across", 32601).image)
    layout = OutputLayout(tmp_path / "out")
    layout.masks.mkdir(parents=True)
    layout.job_file.write_text(json.dumps({"job_id": "am"}))
    create_mask_store(layout.mask_store("across"), info, 64, class_names=["a", "b"], job_id="am")
    whole = Window(0, 0, info.height, info.width)
    write_mask_chunk(layout.mask_store("across"), whole, np.zeros((info.height, info.width), np.uint8))
    mark_complete(layout.mask_store("across"))
    assert write_stac(layout, ["across"]) == [layout.stac_item("across")]
    item = json.loads(layout.stac_item("across").read_text())
    validator = _validator()
    validate_dict(item, validator=validator)
    validate_dict(json.loads(layout.stac_collection.read_text()), validator=validator)
    geometry, bbox = item["geometry"], item["bbox"]
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    for (ring,) in geometry["coordinates"]:
        xs = [p[0] for p in ring]
        assert ring[0] == ring[-1] and -180 <= min(xs) and max(xs) <= 180 and 180.0 in map(abs, xs)
        assert sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:])) > 0  # counterclockwise
    assert bbox[0] > bbox[2] and 179 < bbox[0] < 180 and -180 < bbox[2] < -179  # west > east (RFC 7946 §5.2)
    assert bbox == pytest.approx(list(footprints(info, [whole])[0].bbox), abs=1e-12)
    extent = json.loads(layout.stac_collection.read_text())["extent"]["spatial"]["bbox"][0]
    assert extent == bbox  # the collection's extent crosses 180° with its item
    from pipeline.report_tables import lon_extent

    east_of_it = np.array([bbox, [-170.0, bbox[1], -169.0, bbox[3]]])  # and with an item further east: still crossing
    assert lon_extent(east_of_it) == (bbox[0], -169.0)


def test_footprints_that_do_not_cross_keep_their_bytes(two_zones, tmp_path):
    """Scenes away from 180° (and chunks of them): the same WKB and bbox as before the cut existed."""
    for scene in two_zones.values():
        info = open_scene(scene.image)
        grid = ChunkGrid(info.height, info.width, CHUNK)
        windows = [Window(0, 0, info.height, info.width), *(grid.window(r, c) for r, c in grid)]
        for window, foot in zip(windows, footprints(info, windows)):
            old, box = _old_lonlat(info, window)
            assert foot.lonlat == old and foot.bbox == tuple(float(v) for v in box)
    layout = _write_reports(tmp_path, two_zones)
    geo = json.loads(pq.read_schema(layout.report_file("tiles", "j1", "west")).metadata[b"geo"])["columns"]["geometry"]
    assert geo["geometry_types"] == ["Polygon"] and geo["bbox"][0] < geo["bbox"][2]


def test_a_footprint_that_only_touches_180_is_one_polygon():
    """Chunk edges on 180° itself: points at +180 beside points at -179.x are not a crossing, just one side."""
    from pipeline.report_tables import _antimeridian, lon_extent

    lon = np.array([180.0, -179.5, -179.5, 180.0, 180.0])
    lat = np.array([0.0, 0.0, 1.0, 1.0, 0.0])
    wkb, box = _antimeridian(lon, lat)
    assert _parts(wkb)[0].tolist() == [[-180, 0], [-179.5, 0], [-179.5, 1], [-180, 1], [-180, 0]] and box == (-180, 0, -179.5, 1)
    assert _antimeridian(np.array([10.0, 11.0, 11.0, 10.0, 10.0]), lat) is None
    # the file's bbox over boxes some of which cross: the smallest range holding them all
    assert lon_extent(np.array([[179.0, 0, -179.0, 1], [178.5, 0, 179.5, 1], [-179.9, 0, -178.0, 1]])) == (178.5, -178.0)
    assert lon_extent(np.array([[10.0, 0, 11.0, 1], [-20.0, 0, 12.0, 1]])) == (-20.0, 12.0)
    # boxes on both sides of 180°, neither crossing alone: still the smallest range, across 180°, not the globe
    assert lon_extent(np.array([[179.0, 0, 179.9, 1], [-179.9, 0, -179.0, 1]])) == (179.0, -179.0)
    assert lon_extent(np.array([[-120.0, 0, -100.0, 1], [0.0, 0, 10.0, 1]])) == (-120.0, 10.0)


def test_a_lon_lat_grid_that_runs_past_180_is_wrapped_and_cut_there(tmp_path):
    """EPSG:4326 with longitudes 170° to 190° (a continuous extent, as gdalwarp gives a scene over Fiji): the parts
    lie within [-180, 180] and the bbox runs west > east, as for a scene whose CRS crosses 180° on its own."""
    path = tmp_path / "fiji.tif"
    with rasterio.open(path, "w", driver="GTiff", height=100, width=200, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=rasterio.Affine(0.1, 0, 170.0, 0, -0.1, -10.0)) as dst:
        dst.write(np.zeros((1, 100, 200), np.uint8))
    info = open_scene(path)
    (foot,) = footprints(info, [Window(0, 0, 100, 200)])
    parts = _parts(foot.lonlat)
    assert len(parts) == 2 and all(-180 <= r[:, 0].min() and r[:, 0].max() <= 180 for r in parts)
    assert foot.bbox == pytest.approx((170.0, -20.0, -170.0, -10.0), abs=1e-9)
    (inside,) = footprints(info, [Window(0, 0, 100, 50)])  # 170° to 175°: untouched, one Polygon
    assert struct.unpack_from("<I", inside.lonlat, 1)[0] == 3 and inside.bbox == pytest.approx((170.0, -20.0, 175.0, -10.0))


def test_a_rotated_grid_has_its_parallelogram_as_footprint_not_the_box_around_it():
    rotated = rasterio.Affine.translation(500000, 4600000) @ rasterio.Affine.rotation(20) @ rasterio.Affine.scale(10, -10)
    info = SceneInfo("r", 40, 60, 1, "uint8", rasterio.crs.CRS.from_epsg(32633).to_wkt(), tuple(rotated)[:6], None)
    (foot,) = footprints(info, [Window(0, 0, 40, 60)])
    ring = np.frombuffer(foot.native, "<f8", offset=13).reshape(-1, 2)
    corners = {(round(x, 6), round(y, 6)) for x, y in (rotated @ (c, r) for r in (0, 40) for c in (0, 60))}
    assert {(round(x, 6), round(y, 6)) for x, y in ring} == corners and len(ring) == 5
    xs, ys = ring[:, 0], ring[:, 1]
    area = 0.5 * float(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1]))
    assert area == pytest.approx(100.0 * 40 * 60)  # counter-clockwise, and the grid's own area, not its box's
    lon, lat = np.frombuffer(foot.lonlat, "<f8", offset=13).reshape(-1, 2).T
    assert len(lon) > 5 and (lon[0], lat[0]) == (lon[-1], lat[-1])  # densified along the parallelogram, closed
