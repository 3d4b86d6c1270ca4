"""A real job on a simulated three-node Ray cluster (`ray.cluster_utils.Cluster` on loopback).

The cluster runs in a subprocess with its own Ray temp dir, so the session's
`ray_local` instance is untouched. The subprocess starts with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads when first imported,
so the simulated nodes start on 127.0.0.1, not on the machine's outward IP.
The mask must equal the single-node run's, and Dask's reduction must have
run as Ray tasks (`ray.util.dask`), which a `RayDaskCallback` proves from
inside the workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.run import run_job
from tests.test_pipeline import job, stored_mask

ROOT = Path(__file__).resolve().parent.parent


def _drive(spec_json: str, witness: str, remove_node: bool = False) -> dict:
    """In the subprocess: start a 3-node cluster, run the job on it, report where things ran.

    With ``remove_node``, a worker node holding a model actor is removed while the job runs (its raylet, object
    store and workers die with it), once a few chunks are written.
    """
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.dask import RayDaskCallback
    from ray.util.state import list_actors, list_tasks

    from pipeline.cluster import connect
    from schemas.job import job_from_dict

    class Witness(RayDaskCallback):
        """Runs inside the Ray worker after each Dask task: records its key, process and node."""

        def __init__(self, folder: str) -> None:
            super().__init__()
            self.folder = folder

        def _ray_posttask(self, key, result, pre_state):
            import os
            import uuid

            import ray

            name = key[0] if isinstance(key, tuple) else key
            record = {"key": str(name), "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
            Path(self.folder, f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        spec = job_from_dict({**json.loads(spec_json), "address": cluster.address})  # as `satseg run --address`
        removed = None
        with Witness(witness):
            if remove_node:
                removed = _run_removing_a_node(cluster, spec)
            else:
                run_job(spec, show_progress=False)
        rejoined = connect(None)  # no address now: whether this is a cluster comes from Ray itself
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        actors = [a.node_id for a in list_actors(filters=[("class_name", "=", "TilePredictor")], detail=True)]
        reads: list = []
        deadline = time.monotonic() + 20  # task events reach the state API a moment after the tasks end
        while time.monotonic() < deadline:
            tasks = list_tasks(filters=[("func_or_class_name", "=", "read_window_task")], detail=True, limit=10000)
            reads = [t.node_id for t in tasks]
            if len(reads) >= 16 and all(reads):
                break
            time.sleep(0.5)
        return {
            "removed": removed, "nodes": nodes, "driver_pid": os.getpid(), "actor_nodes": actors, "read_nodes": reads, "on_cluster": rejoined,
            "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_removing_a_node(cluster, spec) -> str:
    """Run ``spec`` in a thread; when 3 chunks are written, remove a worker node that holds an actor. Its id."""
    import threading

    import ray
    from ray.util.state import list_actors

    from pipeline.job_folder import chunks_marked
    from schemas.store import OutputLayout

    outcome: dict = {}

    def target():
        try:
            run_job(spec, show_progress=False)
        except BaseException as err:  # noqa: BLE001  (re-raised in the main thread)
            outcome["error"] = err

    worker = threading.Thread(target=target)
    worker.start()
    layout, removed = OutputLayout(Path(spec.out)), None
    while worker.is_alive() and removed is None:
        if chunks_marked(layout, "odd") >= 3:
            held = {a.node_id for a in list_actors(filters=[("class_name", "=", "TilePredictor")], detail=True)}
            candidates = [n for n in cluster.worker_nodes if n.node_id in held] or list(cluster.worker_nodes)
            removed = candidates[0].node_id
            cluster.remove_node(candidates[0])
        time.sleep(0.05)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    assert removed is not None, "the job finished before a node could be removed"
    assert removed not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    return removed


def _run_on_three_nodes(spec, witness: Path, *extra: str) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="satseg-mn-")  # short: Ray's socket paths must stay under ~107 characters
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, spec.model_dump_json(), str(witness), *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _single_then_three_nodes(odd_scene, tmp_path: Path, options: dict, *extra: str) -> tuple[dict, Path]:
    """The job on the session's single node, then on three (with ``extra`` driver options); the same outputs."""
    single = run_job(job(odd_scene, tmp_path / "single", **options), show_progress=False)
    witness = tmp_path / "witness"
    witness.mkdir()
    ran = _run_on_three_nodes(job(odd_scene, tmp_path / "multi", **options), witness, *extra)
    multi_mask = zarr.open_array(str(tmp_path / "multi" / "masks" / "odd.zarr"), path="mask", mode="r")[:]
    assert np.array_equal(multi_mask, stored_mask(single))
    scenes = [pq.read_table(tmp_path / name / "reports" / "scenes").to_pylist()[0] for name in ("single", "multi")]
    assert scenes[0]["confusion"] == scenes[1]["confusion"]
    return ran, witness


@pytest.mark.slow
def test_a_worker_node_lost_mid_job_leaves_the_mask_unchanged(ray_local, odd_scene, tmp_path):
    """A node dies with one of the model actors: Ray restarts it on another node and re-runs lost tasks."""
    options = {"num_actors": 2, "chunk_size": 64, "max_windows_in_flight": 2}
    ran, _ = _single_then_three_nodes(odd_scene, tmp_path, options, "remove-node")
    assert ran["removed"] and ran["removed"] not in ran["nodes"] and len(ran["nodes"]) == 2


@pytest.mark.slow
def test_a_job_on_three_nodes_gives_the_single_node_mask_and_reduces_on_ray(ray_local, odd_scene, tmp_path):
    options = {"num_actors": 2, "chunk_size": 100, "max_windows_in_flight": 3}
    ran, witness = _single_then_three_nodes(odd_scene, tmp_path, options)

    nodes = set(ran["nodes"])
    assert len(nodes) == 3
    assert ran["node_ips"] == ["127.0.0.1"]  # every simulated node on loopback
    assert ran["on_cluster"] is True
    assert len(ran["actor_nodes"]) == 2 and set(ran["actor_nodes"]) <= nodes
    assert len(ran["read_nodes"]) >= 16 and set(ran["read_nodes"]) <= nodes  # one read per chunk (4 x 4), or retries

    records = [json.loads(p.read_text()) for p in witness.iterdir()]
    reductions = [r for r in records if r["key"].startswith("sum-")]  # the tree reduction of confusion matrices
    assert reductions, sorted({r["key"] for r in records})
    assert all(r["pid"] != ran["driver_pid"] for r in records)  # every Dask task ran in a Ray worker, none in the driver
    assert {r["node"] for r in records} <= nodes
    # Placement is Ray's choice (SPREAD actors and hybrid task scheduling are best effort), but with one CPU
    # per node hundreds of tasks never all fit on one node.
    assert len(set(ran["actor_nodes"]) | set(ran["read_nodes"]) | {r["node"] for r in records}) >= 2


if __name__ == "__main__":
    print(json.dumps(_drive(sys.argv[1], sys.argv[2], remove_node=sys.argv[3:] == ["remove-node"])))
