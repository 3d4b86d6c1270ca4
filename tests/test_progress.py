"""Progress of a running job: counted in tiles from the actors while they work, with chunks beside it."""

from __future__ import annotations

import re
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from pipeline.core.plan import plan_scene
from pipeline.run import _TilesPredicted, run_job
from tests.test_pipeline import job
from workers.predictor import PROGRESS_GROUP


def _scraped(port: int, job_id: str) -> dict[str, float]:
    """The job's satseg metrics on the node's Prometheus endpoint, once Ray has exported them (every few seconds)."""
    for _ in range(60):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {}
        for line in body.splitlines():
            match = re.match(r'^(ray_satseg_\w+)\{.*job_id="' + job_id + r'".*\} ([0-9.e+-]+)$', line)
            if match:
                found[match[1]] = float(match[2])
        if "ray_satseg_chunks_written_total" in found and found.get("ray_satseg_scene_progress") == 1.0:
            return found
        time.sleep(1)
    raise AssertionError(f"no finished satseg metrics for job {job_id} on port {port}")


@pytest.mark.slow
def test_a_job_shows_its_tiles_with_a_rate_and_its_chunks_and_exports_them_to_prometheus(ray_local, odd_scene, tmp_path, capsys):
    spec = job(odd_scene, tmp_path / "out", chunk_size=128)
    result = run_job(spec, show_progress=True)
    err = capsys.readouterr().err
    plan = plan_scene(301, 367, tile=64, overlap=16, chunk=128, mode="blend")
    tiles = len(set().union(*(plan.task(r, c).tiles for r, c in plan.grid)))
    line = next(line for line in err.splitlines() if line.startswith("odd "))
    assert f"{tiles}/{tiles} tiles" in line and f"chunks {len(plan.grid)}/{len(plan.grid)}" in line, err
    assert re.search(r"[0-9.]+ tiles/s", line), line

    row = pq.read_table(result.layout.report_file("scenes", result.job_id, "odd")).to_pylist()[0]
    metrics = _scraped(ray_local.nodes()[0]["MetricsExportPort"], result.job_id)
    assert metrics["ray_satseg_chunks_written_total"] == len(plan.grid)
    assert metrics["ray_satseg_tiles_predicted_total"] == row["tiles_computed"]
    assert metrics["ray_satseg_megapixels_written_total"] == pytest.approx(301 * 367 / 1e6)
    assert metrics["ray_satseg_megapixels_per_second"] > 0


def test_tiles_predicted_are_polled_without_waiting_and_survive_an_actor_restart(ray_local):
    """Answers are collected as they arrive; a restarted actor (its count back at zero) adds its new count."""
    import ray

    @ray.remote(num_cpus=0, concurrency_groups={PROGRESS_GROUP: 1})
    class Counter:
        def __init__(self):
            self.n = 3  # tiles of an earlier scene: not this scene's

        def set(self, n: int) -> None:
            self.n = n

        def progress(self) -> int:
            return self.n

    a, b = Counter.remote(), Counter.remote()
    tiles = _TilesPredicted([a, b])

    def settle() -> int:
        """Wait for the answers asked by the last poll, then poll: it collects them all (and asks again)."""
        if tiles._pending:
            ray.wait(list(tiles._pending), num_returns=len(tiles._pending), timeout=60)
        return tiles.poll()

    assert settle() == 0  # asks
    assert settle() == 0  # collects: nothing new since the baseline of 3 each
    ray.get([a.set.remote(10), b.set.remote(5)])
    settle()  # the answers asked before the change (3 and 3) arrive
    assert settle() == 7 + 2
    ray.get(a.set.remote(4))  # restarted: counts from zero again
    settle()
    assert settle() == 9 + 4
