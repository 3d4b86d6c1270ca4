"""End-to-end jobs on a real local Ray instance over generated GeoTIFFs of odd sizes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
import torch
import xarray as xr
import zarr

from pipeline.core.metrics import confusion_matrix, segmentation_metrics
from pipeline.job_folder import read_scene_state, scene_complete
from pipeline.run import run_job
from pipeline.core.stitch import sliding_window_predict
from schemas.job import job_from_dict
from tests.conftest import CLASSES, TINY
from workers.predictor import TilePredictor
from workers.reader import read_image_window
from pipeline.core.geometry import Window


def job(odd_scene, out, **over):
    spec = {
        "scenes": [{"image": str(odd_scene.image), "labels": str(odd_scene.labels), "name": "odd"}],
        "model": "hrnet_w18_small_v1",
        "model_options": TINY,
        "classes": CLASSES,
        "tile_size": 64,
        "overlap": 16,
        "chunk_size": 100,
        "batch_size": 4,
        "stitch": "blend",
        "num_actors": 1,  # the default is one per core; tests that need more say so
        "out": str(out),
    }
    spec.update(over)
    return job_from_dict(spec)


def stored_mask(result, name="odd") -> np.ndarray:
    return zarr.open_array(str(result.layout.mask_store(name)), path="mask", mode="r")[:]


@pytest.fixture(scope="module")
def blend_run(ray_local, odd_scene, tmp_path_factory):
    return run_job(job(odd_scene, tmp_path_factory.mktemp("blend") / "out"), show_progress=False)


def test_mask_is_identical_for_other_chunk_sizes_and_actor_counts(ray_local, odd_scene, tmp_path, blend_run):
    reference = stored_mask(blend_run)
    for chunk, actors in ((64, 1), (173, 2), (512, 1)):
        other = run_job(job(odd_scene, tmp_path / f"c{chunk}", chunk_size=chunk, num_actors=actors), show_progress=False)
        assert np.array_equal(stored_mask(other), reference), f"chunk {chunk} with {actors} actors differs"


def test_mask_is_identical_for_other_batch_sizes(ray_local, odd_scene, tmp_path, blend_run):
    for batch in (1, 3):
        other = run_job(job(odd_scene, tmp_path / f"b{batch}", batch_size=batch), show_progress=False)
        assert np.array_equal(stored_mask(other), stored_mask(blend_run)), f"batch {batch} differs"


@pytest.mark.parametrize("mode", ["blend", "crop"])
def test_mask_equals_whole_image_sliding_window(ray_local, odd_scene, tmp_path, mode):
    spec = job(odd_scene, tmp_path / mode, stitch=mode)
    result = run_job(spec, show_progress=False)
    got = stored_mask(result)
    predictor = TilePredictor(result.model.source, device="cpu", batch_size=1)
    h, w = got.shape
    data = read_image_window(str(odd_scene.image), Window(0, 0, h, w), [1, 2, 3, 4], result.model.mean or [0.0] * 4, result.model.std or [1.0] * 4)
    whole = sliding_window_predict(data.image, predictor.predict_batch, tile=64, overlap=16, mode=mode, num_classes=len(CLASSES))
    whole[~data.valid] = 255
    assert np.array_equal(got, whole)


def test_nodata_pixels_get_nodata_and_the_rest_a_class(blend_run, odd_scene):
    mask = stored_mask(blend_run)
    with rasterio.open(odd_scene.image) as src:
        valid = src.read_masks(1) > 0
    assert (mask[~valid] == 255).all()
    assert (mask[valid] < len(CLASSES)).all()
    assert (~valid).sum() > 0


def test_zarr_mask_opens_in_xarray_with_crs_and_transform(blend_run, odd_scene):
    ds = xr.open_zarr(blend_run.layout.mask_store("odd"), decode_coords="all")
    mask = ds["mask"]
    with rasterio.open(odd_scene.image) as src:
        assert mask.rio.crs == src.crs
        assert mask.rio.transform() == src.transform
        assert mask.shape == (src.height, src.width)
    assert mask.dtype == np.uint8
    assert json.loads(mask.attrs["class_names"]) == CLASSES
    assert mask.attrs["satseg_complete"] is True


def test_reports_hold_exact_metrics(blend_run, odd_scene):
    mask = stored_mask(blend_run)
    with rasterio.open(odd_scene.labels) as src:
        labels = src.read(1)
    expected = confusion_matrix(labels.astype(np.int64), mask, len(CLASSES))
    reports = blend_run.layout.reports
    scenes = pq.read_table(reports / "scenes").to_pylist()
    assert len(scenes) == 1
    row = scenes[0]
    assert row["job_id"] == blend_run.job_id  # from the Hive partition
    assert np.array_equal(np.reshape(row["confusion"], expected.shape), expected)
    m = segmentation_metrics(expected)
    assert row["mean_iou"] == m.mean_iou and row["pixel_accuracy"] == m.pixel_accuracy
    assert row["tile_size"] == 64 and row["overlap"] == 16 and row["stitch"] == "blend"
    # Tiles shared by chunks are computed once: only tiles with no valid pixel are skipped.
    assert row["tiles_reused"] > 0
    assert row["tiles_computed"] <= row["tiles_lattice"]
    tiles = pq.read_table(reports / "tiles").to_pylist()
    assert len(tiles) == 4 * 4  # 301x367 in 100-px chunks
    total = sum(np.reshape(t["confusion"], expected.shape) for t in tiles)
    assert np.array_equal(total, expected)
    assert sum(t["valid_pixels"] for t in tiles) == int((mask != 255).sum())
    first = min(tiles, key=lambda t: (t["chunk_row"], t["chunk_col"]))
    with rasterio.open(odd_scene.image) as src:  # the footprint in the scene CRS (geometry and bbox are lon/lat)
        left, _, _, top = shapely.from_wkb(first["geometry_native"]).bounds
        assert (left, top) == pytest.approx((src.bounds.left, src.bounds.top))
    classes = pq.read_table(reports / "classes").to_pylist()
    assert [c["class_name"] for c in classes] == CLASSES
    for c in classes:
        assert c["true_positives"] == expected[c["class_index"], c["class_index"]]


def test_query_registers_views(blend_run):
    from pipeline.query import run_query

    cols, rows = run_query(blend_run.layout.root, "SELECT scene, job_id, num_classes FROM scenes")[:2]
    assert rows == [("odd", blend_run.job_id, len(CLASSES))]
    cols, rows = run_query(blend_run.layout.reports, "SELECT count(*) FROM tiles JOIN classes USING (scene)")[:2]
    assert rows[0][0] == 16 * len(CLASSES)


def test_rerun_resumes_and_finishes_a_partial_scene(ray_local, odd_scene, tmp_path, blend_run):
    spec = job(odd_scene, tmp_path / "resume")
    first = run_job(spec, show_progress=False)
    layout = first.layout
    # Simulate a crash after 5 chunks: drop the other markers, the completion, and the chunks' data.
    assert scene_complete(layout, "odd") and read_scene_state(layout, "odd").status == "done"
    markers = sorted(layout.chunk_markers("odd").iterdir())
    arr = zarr.open_array(str(layout.mask_store("odd")), path="mask", mode="r+")
    for m in markers[5:]:
        r, c = map(int, m.name.split("."))
        arr[r * 100 : (r + 1) * 100, c * 100 : (c + 1) * 100] = 255
        m.unlink()
    arr.attrs["satseg_complete"] = False
    assert not scene_complete(layout, "odd") and read_scene_state(layout, "odd").status == "pending"
    again = run_job(spec, show_progress=False)
    assert again.scenes[0].chunks_resumed == 5
    assert np.array_equal(stored_mask(again), stored_mask(blend_run))
    third = run_job(spec, show_progress=False)
    assert third.scenes[0].resumed_whole


def test_checkpoint_alone_is_enough_to_run(ray_local, odd_scene, tmp_path):
    from workers.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("hrnet_w18_small_v1", 3, 2, **TINY)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model, model_name="hrnet_w18_small_v1", model_kwargs=TINY, bands=[4, 3, 2],
                    class_names=["a", "b"], mean=[2000.0, 1000.0, 800.0], std=[1000.0, 500.0, 400.0])
    spec = job_from_dict({"scenes": [{"image": str(odd_scene.image)}], "checkpoint": str(ckpt), "tile_size": 64,
                          "overlap": 0, "stitch": "crop", "out": str(tmp_path / "out")})
    result = run_job(spec, show_progress=False)
    mask = stored_mask(result, "odd")
    assert set(np.unique(mask)) <= {0, 1, 255}
    assert result.scenes[0].metrics is None
    row = pq.read_table(result.layout.reports / "scenes").to_pylist()[0]
    assert row["bands"] == [4, 3, 2] and row["checkpoint_sha256"] and row["mean_iou"] is None


def test_local_ray_instance_is_bound_to_loopback(ray_local):
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")


@pytest.mark.parametrize(("actors", "size"), [(1, 900), (2, 900), (4, 900), (16, 900), (3, 200)])
def test_every_actor_gets_chunks_and_each_strip_keeps_its_order(actors, size):
    from pipeline.core.plan import plan_scene
    from pipeline.run import _actor_for, _strip_width

    plan = plan_scene(size, size, tile=64, overlap=16, chunk=96, mode="blend")
    strip = _strip_width(plan, 5, actors)
    owners = {(r, c): _actor_for(r, c, plan, strip, actors) for r, c in plan.grid}
    assert set(owners.values()) == set(range(min(actors, len(plan.grid))))  # nobody idles
    rows, cols = plan.grid.shape
    for k in range(actors):  # in each strip, an actor holds whole rows, next to each other (its shared tiles are reused)
        for s in range(0, cols, strip):
            held = sorted({r for (r, c), owner in owners.items() if owner == k and s <= c < s + strip})
            assert held == list(range(held[0], held[0] + len(held))) if held else True
            assert all(owners[(r, c)] == k for r in held for c in range(s, min(s + strip, cols)))


def test_strips_narrow_for_a_refinement_halo_so_shared_tiles_still_fit_half_the_cache():
    from pipeline.core.plan import plan_scene
    from pipeline.run import _strip_width
    from schemas.refine import CRFOptions

    cache = 64 * 2**20
    plain = plan_scene(8192, 8192, tile=128, overlap=32, chunk=256, mode="blend")
    refined = plan_scene(8192, 8192, tile=128, overlap=32, chunk=256, mode="blend", refine=CRFOptions())
    wide, narrow = _strip_width(plain, 5, 1, cache), _strip_width(refined, 5, 1, cache)
    assert 1 <= narrow < wide
    task = refined.task(1, 1)
    stride, per_tile = refined.lattice.stride, 128**2 * 4 * 5
    across = -(-task.stitched.width // stride) + 1
    shared = -(-(task.stitched.height - task.chunk.height) // stride) + 1
    assert narrow * across * shared * per_tile <= cache // 2  # the shared tiles of a strip fit half the cache
    assert _strip_width(plan_scene(100, 100, tile=64, overlap=16, chunk=100, mode="crop"), 5, 1) == 1  # one chunk


def test_job_id_changes_with_what_determines_the_outputs_and_nothing_else(odd_scene, tmp_path):
    from pipeline.run import job_id_of, resolve_model
    from schemas.job import RUN_SETTINGS, JobSpec

    base = job(odd_scene, tmp_path / "a")
    model = resolve_model(base)
    same = {"out": str(tmp_path / "b"), "address": "ray://10.0.0.1:10001", "num_actors": 3, "max_windows_in_flight": 9,
            "batch_size": 16, "compile": True, "device": "cpu"}
    assert set(same) == RUN_SETTINGS  # every run setting is tried
    for key, value in same.items():
        other = base.model_copy(update={key: value})
        assert job_id_of(other, model, "cpu") == job_id_of(base, model, "cpu"), key
    different = {"tile_size": 96, "overlap": 8, "chunk_size": 128, "stitch": "crop", "window": "triangular", "tta": "flip",
                 "seed": 1, "save_probabilities": True, "bands": [1, 2, 3, 4], "model_options": {"width_multiplier": 0.5},
                 "classes": CLASSES[::-1], "ignore_index": 0, "boundary_width": 2, "boundary_ratio": 0.01,
                 "trimap_max_width": 4, "model": "hrnet_w18_small_v2", "boundary_convention": "reference",
                 "things": ["water"], "connectivity": 8, "simplify": 1.0,
                 "scenes": [{"image": str(odd_scene.image), "name": "other"}], "refine": "crf",
                 "refine_options": {"iterations": 2}}
    # the checkpoint and the init weights count by their content hash (test_pretrained checks init's)
    identity = set(JobSpec.model_fields) - RUN_SETTINGS - {"checkpoint", "init"}
    assert set(different) == identity  # every identity field is tried
    assert "boundary_convention" not in base.identity()  # added later: jobs run before keep their ids at its default
    for key, value in different.items():
        method = {"refine": "crf"} if key == "refine_options" else {}  # options belong to a method
        other = base.model_copy(update={key: job(odd_scene, tmp_path / "a", **method, **{key: value}).__dict__[key]})
        assert job_id_of(other, model, "cpu") != job_id_of(base, model, "cpu"), key
    assert job_id_of(base, model, "cuda") != job_id_of(base, model, "cpu")  # bfloat16 on a GPU, float32 on a CPU


def test_a_rerun_with_other_speed_settings_resumes_the_same_job(ray_local, odd_scene, tmp_path, blend_run):
    out = blend_run.layout.root
    again = run_job(job(odd_scene, out, compile=True, batch_size=2, num_actors=2, max_windows_in_flight=1), show_progress=False)
    assert again.job_id == blend_run.job_id and again.scenes[0].resumed_whole
