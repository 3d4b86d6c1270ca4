"""`satseg run` with `things:` on a real Ray: instance ids, polygons and object metrics, the same for two chunk sizes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.cli import main
from schemas.store import OutputLayout
from tests.conftest import CLASSES


def _job(tmp_path, scene, name: str, chunk: int) -> str:
    job = tmp_path / f"{name}.yaml"
    job.write_text(
        f"scenes:\n  - image: {scene.image}\n    labels: {scene.labels}\n    name: odd\n"
        f"model: pixel_linear\nclasses: {CLASSES}\nthings: [forest, bare_soil]\nconnectivity: 8\n"
        f"tile_size: 32\noverlap: 0\nchunk_size: {chunk}\nnum_actors: 1\nout: {name}\n"
    )
    return str(job)


@pytest.mark.slow
def test_run_with_things_gives_the_same_objects_for_two_chunk_sizes(tmp_path, odd_scene, ray_local, capsys):
    import geopandas as gpd

    frames, ids = [], []
    for name, chunk in (("a", 64), ("b", 96)):
        assert main(["run", _job(tmp_path, odd_scene, name, chunk), "--quiet"]) == 0, capsys.readouterr().err
        layout = OutputLayout(tmp_path / name)
        job_id = json.loads(layout.job_file.read_text())["job_id"]
        store = layout.mask_store("odd")
        arr = zarr.open_array(str(store), path="instances", mode="r")
        assert arr.attrs["satseg_complete"] is True and arr.chunks == (chunk, chunk)
        ids.append(arr[:])
        frame = gpd.read_parquet(layout.report_file("objects", job_id, "odd"))
        assert frame.crs.to_epsg() == 32633
        assert sorted(frame.object_id) == list(range(1, int(ids[-1].max()) + 1))  # one row per object
        assert frame.geometry.is_valid.all() and frame.matched.notna().all()
        frames.append(frame.sort_values("object_id").reset_index(drop=True))
        metrics = pq.read_table(layout.report_file("object_metrics", job_id, "odd")).to_pylist()
        assert {m["level"] for m in metrics} == {"class", "all", "things", "stuff"}
        assert main(["query", "SELECT count(*) FROM objects", "--reports", str(layout.root), "--format", "csv"]) == 0
        assert capsys.readouterr().out.strip().endswith(str(len(frame)))
        assert main(["report", str(layout.root)]) == 0
        page = layout.html_report.read_text()
        assert 'data-section="objects"' in page and "Largest false alarms" in page
    np.testing.assert_array_equal(ids[0], ids[1])
    # the same pass with Dask on Ray (as on a cluster): every chunk task on a Ray worker, the same ids and table
    from pipeline.objects import job_scene_objects
    from workers.mask_store import open_mask_store

    layout = OutputLayout(tmp_path / "a")
    job_id = json.loads(layout.job_file.read_text())["job_id"]
    mask = open_mask_store(layout.mask_store("odd"), then="rerun")
    job_scene_objects(layout, job_id, "odd", layout.mask_store("odd"), CLASSES, ["forest", "bare_soil"],
                      transform=mask.transform, crs=mask.crs, labels=str(odd_scene.labels), connectivity=8, use_ray=True)
    np.testing.assert_array_equal(zarr.open_array(str(layout.mask_store("odd")), path="instances")[:], ids[0])
    again = gpd.read_parquet(layout.report_file("objects", job_id, "odd")).sort_values("object_id").reset_index(drop=True)
    assert again.drop(columns="geometry").equals(frames[0].drop(columns="geometry"))
    assert len(frames[0]) > 5 and (frames[0].chunks > 1).any()
    a, b = (f.drop(columns=["chunks"]) for f in frames)
    assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    assert a.geometry.geom_equals_exact(b.geometry, 0).all()
