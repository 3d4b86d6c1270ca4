"""Reports of a real job: probabilities in Zarr, PR curves, boundary and trimap columns, GeoParquet tiles, aggregates;
and `satseg evaluate` on foreign GeoTIFF/Zarr pairs with a label value -> class mapping."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import zarr

from pipeline.cli import main
from pipeline.core.metrics import class_indices
from pipeline.run import run_job
from tests.conftest import CLASSES
from tests.test_metrics_exact import ref_average_precision, ref_boundary_iou
from tests.test_pipeline import job


@pytest.fixture(scope="module")
def prob_run(ray_local, odd_scene, tmp_path_factory):
    spec = job(odd_scene, tmp_path_factory.mktemp("probs") / "out", save_probabilities=True, boundary_width=2, trimap_max_width=5)
    return run_job(spec, show_progress=False)


def labels_of(odd_scene):
    with rasterio.open(odd_scene.labels) as src:
        return src.read(1).astype(np.int64), src.read_masks(1)


def test_probabilities_are_stored_chunk_aligned_and_agree_with_the_mask(prob_run):
    store = prob_run.layout.mask_store("odd")
    mask = zarr.open_array(str(store), path="mask", mode="r")
    probs = zarr.open_array(str(store), path="probabilities", mode="r")
    assert probs.shape == (len(CLASSES), *mask.shape) and probs.dtype == np.uint8
    assert probs.chunks == (len(CLASSES), *mask.chunks)
    m, p = mask[:], probs[:]
    valid = m != 255
    assert np.all(p[:, ~valid] == 0)
    # quantised blend probabilities sum to ~1 and their argmax is the mask (up to ties after rounding)
    total = p[:, valid].astype(int).sum(axis=0)
    assert np.all(np.abs(total - 255) <= len(CLASSES))
    agree = (p.argmax(axis=0) == m)[valid].mean()
    assert agree > 0.99


def test_reports_hold_boundary_trimap_and_curves_equal_to_direct_computation(prob_run, odd_scene):
    reports = prob_run.layout.reports
    store = prob_run.layout.mask_store("odd")
    mask = zarr.open_array(str(store), path="mask", mode="r")[:]
    probs = zarr.open_array(str(store), path="probabilities", mode="r")[:]
    raw, _ = labels_of(odd_scene)
    raw[_ == 0] = -1
    t = class_indices(raw, len(CLASSES))
    p = np.where(mask < len(CLASSES), mask.astype(int), -1)
    classes = {r["class_index"]: r for r in pq.read_table(reports / "classes").to_pylist()}
    expected_b = ref_boundary_iou_n(t, p, 2)
    for c, row in classes.items():
        if np.isnan(expected_b[c]):
            assert row["boundary_iou"] is None
        else:
            assert row["boundary_iou"] == pytest.approx(expected_b[c], abs=1e-15)
        assert len(row["trimap_iou"]) == 5
        valid = (t >= 0) & (p >= 0)
        positives = (t == c)[valid]
        if positives.any():
            assert row["average_precision"] == pytest.approx(ref_average_precision(probs[c][valid].astype(float), positives), abs=1e-12)
    scene = pq.read_table(reports / "scenes").to_pylist()[0]
    assert scene["boundary_width"] == 2 and len(scene["trimap_miou"]) == 5
    assert scene["probabilities"].endswith("probabilities")
    curves = pq.read_table(reports / "curves").to_pylist()
    assert {r["class_name"] for r in curves} == set(CLASSES)
    for c in range(len(CLASSES)):
        pts = sorted((r for r in curves if r["class_index"] == c), key=lambda r: -r["threshold"])
        recalls = [r["recall"] for r in pts]
        assert recalls == sorted(recalls) and recalls[-1] == pytest.approx(1.0)
    agg = {r["aggregate"]: r for r in pq.read_table(reports / "aggregates").to_pylist()}
    assert agg["micro"]["mean_iou"] == scene["mean_iou"]  # one scene: micro equals the scene
    assert agg["micro"]["mean_average_precision"] == scene["mean_average_precision"]
    assert agg["macro"]["mean_boundary_iou"] == pytest.approx(scene["mean_boundary_iou"])


def ref_boundary_iou_n(t, p, d):
    import tests.test_metrics_exact as ref

    old = ref.C
    ref.C = len(CLASSES)
    try:
        return ref_boundary_iou(t, p, d)
    finally:
        ref.C = old


def test_tiles_table_is_geoparquet_in_lonlat_with_the_scene_crs_beside(prob_run, odd_scene):
    geopandas = pytest.importorskip("geopandas")
    import shapely
    from pyproj import CRS
    from rasterio.warp import transform_bounds

    files = sorted((prob_run.layout.reports / "tiles").glob("*/*.parquet"))
    meta = json.loads(pq.read_schema(files[0]).metadata[b"geo"])
    assert meta["version"] == "1.1.0" and meta["primary_column"] == "geometry"
    gdf = geopandas.read_parquet(files[0])
    assert gdf.crs == CRS("OGC:CRS84")  # lon/lat for every scene, whatever its zone
    with rasterio.open(odd_scene.image) as src:
        assert CRS.from_wkt(gdf["crs"].iloc[0]) == CRS(src.crs.to_wkt()) and set(gdf["epsg"]) == {src.crs.to_epsg()}
        left, bottom, right, top = src.bounds
        lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    assert len(gdf) == 16
    assert tuple(gdf.total_bounds) == pytest.approx(lonlat, abs=1e-9)
    native = geopandas.GeoSeries(shapely.from_wkb(gdf["geometry_native"]))
    assert tuple(native.total_bounds) == pytest.approx((left, bottom, right, top))
    assert native.area.sum() == pytest.approx((right - left) * (top - bottom))
    first = gdf.iloc[0]
    box = pq.read_table(files[0]).to_pylist()[0]["bbox"]  # the covering column (geopandas reads it as bbox filters)
    assert first.geometry.bounds == pytest.approx((box["xmin"], box["ymin"], box["xmax"], box["ymax"]))


def test_query_sees_the_new_tables(prob_run):
    from pipeline.query import run_query

    _, rows = run_query(prob_run.layout.root, "SELECT count(*) FROM curves WHERE class_name = 'water'")[:2]
    assert rows[0][0] > 1
    _, rows = run_query(prob_run.layout.root, "SELECT aggregate FROM aggregates ORDER BY aggregate")[:2]
    assert [r[0] for r in rows] == ["macro", "micro"]


def _write_tif(path, data, like):
    with rasterio.open(like) as src:
        profile = src.profile
    profile.update(count=1, dtype=data.dtype, nodata=None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def test_evaluate_maps_label_values_to_classes_for_foreign_masks(tmp_path, odd_scene, capsys):
    """Labels and a prediction coded as WorldCover-style values (10, 20, ...) with a value: name mapping in a job file."""
    from pipeline.evaluate import ClassTable, evaluate_mask

    raw, valid = labels_of(odd_scene)
    values = np.array([10, 20, 30, 40, 50])
    coded = np.where(valid > 0, values[np.clip(raw, 0, 4)], 0).astype(np.uint8)
    coded[raw == 255] = 255
    rng = np.random.default_rng(0)
    pred = coded.copy()
    flip = rng.random(pred.shape) < 0.1
    pred[flip] = rng.choice(values, flip.sum())
    labels_tif = _write_tif(tmp_path / "labels.tif", coded, odd_scene.labels)
    pred_tif = _write_tif(tmp_path / "pred.tif", pred, odd_scene.labels)
    table = ClassTable(CLASSES, [10, 20, 30, 40, 50])
    mapped = evaluate_mask(pred_tif, labels_tif, classes=table, chunk=97)
    # the same scene coded as indices 0..4 gives the same confusion matrix
    inv = {v: i for i, v in enumerate(values)}
    idx = lambda a: np.vectorize(lambda v: inv.get(int(v), 255))(a).astype(np.uint8)  # noqa: E731
    direct = evaluate_mask(_write_tif(tmp_path / "p.tif", idx(pred), odd_scene.labels),
                         _write_tif(tmp_path / "l.tif", idx(coded), odd_scene.labels), class_names=CLASSES, chunk=64)
    assert np.array_equal(mapped.metrics.confusion, direct.metrics.confusion)
    assert mapped.metrics.valid_pixels > 0.8 * coded.size
    np.testing.assert_array_equal(mapped.scores.boundary_iou, direct.scores.boundary_iou)
    # from a job file's mapping, through the CLI
    job_file = tmp_path / "job.yaml"
    job_file.write_text("classes: {10: water, 20: forest, 30: cropland, 40: urban, 50: bare_soil}\n")  # only what evaluate needs
    code = main(["evaluate", str(pred_tif), str(labels_tif), "--job", str(job_file), "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert code == 0 and "water" in out and "mean boundary IoU" in out
    scenes = pq.read_table(tmp_path / "ev" / "reports" / "scenes").to_pylist()
    assert scenes[0]["mean_iou"] == mapped.metrics.mean_iou
    assert scenes[0]["label_values"] == [10, 20, 30, 40, 50] and scenes[0]["mask_label_values"] is True
    # the report maps the coded mask and labels to classes too: its error map is mostly right, as the metrics are
    from pipeline.core.geometry import Window
    from pipeline.report import _scene_context, _views, load_run
    from pipeline.quicklook import TP_COLOUR

    tables = load_run(tmp_path / "ev")
    ctx = _scene_context(tables, tables.scenes[0])
    views = _views(ctx, Window(0, 0, *coded.shape), 400, overview=False)
    right = np.all(views["error"] == np.array(TP_COLOUR, dtype=np.uint8), axis=-1).mean()
    assert right == pytest.approx(mapped.metrics.pixel_accuracy * mapped.metrics.valid_pixels / coded.size, abs=0.05)


def test_evaluate_any_zarr_array_pair(tmp_path, odd_scene):
    from pipeline.evaluate import evaluate_mask

    raw, valid = labels_of(odd_scene)
    labels = np.where(valid > 0, raw, 255).astype(np.uint8)
    pred = labels.copy()
    pred[::7, ::5] = 2
    zarr.create_array(str(tmp_path / "labels.zarr"), data=labels, chunks=(64, 64))  # a bare array, no group
    group = zarr.open_group(str(tmp_path / "pred.zarr"), mode="w")
    group.create_array("classes", data=pred, chunks=(50, 50))
    z = evaluate_mask(tmp_path / "pred.zarr", tmp_path / "labels.zarr", class_names=CLASSES, out=tmp_path / "ev")
    tif = evaluate_mask(_write_tif(tmp_path / "p.tif", pred, odd_scene.labels), odd_scene.labels, class_names=CLASSES, chunk=80)
    assert np.array_equal(z.metrics.confusion, tif.metrics.confusion)
    np.testing.assert_array_equal(z.scores.boundary_iou, tif.scores.boundary_iou)
    from pipeline.report import write_report

    assert write_report(tmp_path / "ev").stat().st_size > 10_000  # a report of a foreign Zarr mask renders


def test_evaluate_bad_inputs_are_one_line(tmp_path, odd_scene, capsys):
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("a", shape=(4, 4), dtype="uint8")
    group.create_array("b", shape=(4, 4), dtype="uint8")
    for argv, fragment in (
        (["evaluate", str(tmp_path / "two.zarr"), str(odd_scene.labels), "--classes", "a,b"], "2-D arrays"),
        (["evaluate", str(tmp_path / "two.zarr/a"), str(odd_scene.labels), "--classes", "a,b"], "differs"),
        (["evaluate", str(odd_scene.labels), str(odd_scene.labels), "--classes", "10=a,x=b"], "value=name"),
        (["evaluate", str(odd_scene.labels), str(odd_scene.labels), "--classes", "a,b", "--boundary-ratio", "3"], "ratio"),
        (["evaluate", str(odd_scene.labels), str(odd_scene.labels), "--classes", "10=a,10=b"], "twice"),
        (["evaluate", str(odd_scene.labels), str(odd_scene.labels), "--classes", "0=a,255=b"], "ignore index"),
        (["evaluate", str(odd_scene.labels), str(odd_scene.labels), "--classes", "a,b", "--trimap-max-width", "20000"], "256"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err


def test_job_class_mapping_is_checked():
    from schemas.errors import SpecError
    from schemas.job import job_from_dict

    base = {"scenes": [{"image": "x.tif"}], "model": "hrnet_w18_small_v1"}
    with pytest.raises(SpecError, match="ignore_index"):
        job_from_dict({**base, "classes": {0: "a", 255: "b"}})
    with pytest.raises(SpecError, match="unique"):
        job_from_dict({**base, "classes": {0: "a", 1: "a"}})
    spec = job_from_dict({**base, "classes": {10: "tree", 20: "shrub"}})
    assert spec.class_names == ["tree", "shrub"] and spec.label_values == [10, 20]


def test_a_job_id_of_digits_stays_text_in_queries(tmp_path):
    import pyarrow as pa

    from pipeline.query import run_query

    folder = tmp_path / "reports" / "scenes" / "job_id=000123456789"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"scene": ["a"]}), folder / "a.parquet")
    assert run_query(tmp_path / "reports", "SELECT scene, job_id FROM scenes")[1] == [("a", "000123456789")]
