"""Fault injection on real Ray: actors, read workers and the driver killed, chunks damaged on disk.

Each faulty run is compared bit for bit with a clean one. Slow as a whole: `make test-slow` runs it, and CI.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr

from pipeline.run import run_job
from tests.test_pipeline import job, stored_mask

pytestmark = pytest.mark.slow  # the fault-injection suite: make test-slow, and CI


def _ray_pids(name: bytes) -> list[int]:
    """Ray workers running ``name`` now, an actor class or a task (a worker names its process after what it runs)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::" + name):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def _kill_once(worker: threading.Thread, name: bytes, ready=lambda: True, pause: float = 0.05) -> list[int]:
    """While the job thread runs: once ``ready()``, SIGKILL every worker running ``name``; the PIDs killed."""
    killed: list[int] = []
    deadline = time.time() + 240
    while time.time() < deadline and not killed and worker.is_alive():
        if ready():
            for pid in _ray_pids(name):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(pause)
    worker.join(timeout=300)
    return killed


def _run_in_thread(spec) -> tuple[threading.Thread, dict]:
    """``run_job(spec)`` started in a thread; the dict gets its ``result`` or its ``error``."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run_job(spec, show_progress=False)
        except Exception as err:  # noqa: BLE001
            outcome["error"] = err

    worker = threading.Thread(target=target)
    worker.start()
    return worker, outcome


def test_killed_actor_is_restarted_and_mask_is_unchanged(ray_local, odd_scene, tmp_path):
    reference = stored_mask(run_job(job(odd_scene, tmp_path / "ref", chunk_size=64), show_progress=False))
    spec = job(odd_scene, tmp_path / "faulty", chunk_size=64, max_windows_in_flight=1)
    markers = tmp_path / "faulty" / "state" / "odd" / "chunks"
    worker, outcome = _run_in_thread(spec)
    killed = _kill_once(worker, b"TilePredictor", lambda: markers.is_dir() and len(list(markers.iterdir())) >= 3)
    assert killed, "the job finished before an actor could be killed"
    assert "error" not in outcome, outcome.get("error")
    assert np.array_equal(stored_mask(outcome["result"]), reference)
    assert zarr.open_array(str(outcome["result"].layout.mask_store("odd")), path="mask").attrs["satseg_complete"] is True
    # Work travels with each chunk: a restarted actor neither loses the work done before nor counts any twice.
    # Every tile a chunk needs is either predicted or taken from the cache, whatever the cache held.
    ref_row, row = (_scene_row(tmp_path / name) for name in ("ref", "faulty"))
    assert row["tiles_computed"] + row["tiles_reused"] == ref_row["tiles_computed"] + ref_row["tiles_reused"]


def _scene_row(out) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(out / "reports" / "scenes").to_pylist()[0]


def test_an_actor_dead_beyond_its_restarts_is_one_line_and_a_rerun_recomputes_only_the_rest(ray_local, odd_scene, tmp_path):
    from pipeline.job_folder import chunks_marked, read_scene_state
    from schemas.errors import MachineError, one_line, user_error
    from schemas.store import OutputLayout

    reference = stored_mask(run_job(job(odd_scene, tmp_path / "ref", chunk_size=64), show_progress=False))
    spec = job(odd_scene, tmp_path / "dying", chunk_size=64, max_windows_in_flight=1)
    layout = OutputLayout(tmp_path / "dying")
    worker, outcome = _run_in_thread(spec)
    killed: set[int] = set()
    deadline = time.time() + 240
    while time.time() < deadline and worker.is_alive():
        if chunks_marked(layout, "odd") >= 2:
            for pid in set(_ray_pids(b"TilePredictor")) - killed:  # each restart is a new process: kill it too
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.05)
    worker.join(timeout=60)
    assert len(killed) >= 3, killed  # the first actor and its two restarts
    err = outcome.get("error")
    assert isinstance(user_error(err), MachineError), err
    assert "exhausted its restarts" in one_line(err) and "\n" not in one_line(err)
    state = read_scene_state(layout, "odd")
    assert state.status == "failed" and "exhausted its restarts" in state.reason
    done_before = chunks_marked(layout, "odd")
    again = run_job(spec, show_progress=False)
    assert np.array_equal(stored_mask(again), reference)
    assert again.scenes[0].chunks_resumed == done_before  # only the missing chunks are computed
    assert _scene_row(tmp_path / "dying")["chunks_resumed"] == done_before


def test_a_chunk_damaged_on_disk_after_its_marker_is_found_on_resume_and_only_it_recomputes(ray_local, odd_scene, tmp_path):
    """One chunk file truncated, another replaced by a valid chunk of other pixels: both are caught by their checksums."""
    reference = stored_mask(run_job(job(odd_scene, tmp_path / "ref"), show_progress=False))
    first = run_job(job(odd_scene, tmp_path / "out"), show_progress=False)
    store = first.layout.mask_store("odd")
    total = first.scenes[0].chunks_total
    zarr.open_array(str(store), path="mask", mode="r+").attrs["satseg_complete"] = False  # as if cut short
    chunk_files = {p.relative_to(store / "mask").as_posix(): p for p in (store / "mask" / "c").rglob("*") if p.is_file()}
    truncated, replaced = chunk_files["c/0/1"], chunk_files["c/2/0"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    replaced.write_bytes(chunk_files["c/1/1"].read_bytes())  # decodes fine, holds the wrong pixels
    again = run_job(job(odd_scene, tmp_path / "out"), show_progress=False)
    assert again.scenes[0].chunks_resumed == total - 2  # only the two damaged chunks are computed again
    assert np.array_equal(stored_mask(again), reference)


_DRIVER = """
import sys
from pipeline.cluster import connect
from pipeline.run import run_job
from schemas.job import JobSpec
connect(None, num_cpus=2)
run_job(JobSpec.model_validate_json(sys.argv[1]), show_progress=False)
"""


def _processes_under(folder: str) -> list[int]:
    """PIDs whose command line names ``folder``, or that hold a file open in it: the Ray instance a test started
    there (Ray's agents rename their process, but keep their logs open in the session folder)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    named = folder.encode() in f.read()
                held = named or any(
                    os.readlink(f"/proc/{d}/fd/{fd}").startswith(folder) for fd in os.listdir(f"/proc/{d}/fd")
                )
            except OSError:
                continue
            if held:
                pids.append(int(d))
    return pids


def test_a_driver_killed_mid_job_resumes_to_the_same_mask_computing_only_the_rest(ray_local, odd_scene, tmp_path):
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from pipeline.job_folder import chunks_marked
    from schemas.store import OutputLayout

    root = Path(__file__).resolve().parent.parent
    reference = stored_mask(run_job(job(odd_scene, tmp_path / "ref", chunk_size=64), show_progress=False))
    spec = job(odd_scene, tmp_path / "out", chunk_size=64, max_windows_in_flight=1)
    layout = OutputLayout(tmp_path / "out")
    ray_tmp = tempfile.mkdtemp(prefix="satseg-dk-")  # the killed driver's own Ray instance lives here
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, spec.model_dump_json()], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None and chunks_marked(layout, "odd") < 3:
            time.sleep(0.05)
        assert driver.poll() is None, "the driver ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        # satseg's reaper ends the killed driver's Ray processes (left alone, they would live on for a minute)
        deadline = time.time() + 20
        while _processes_under(ray_tmp) and time.time() < deadline:
            time.sleep(0.2)
        left = _processes_under(ray_tmp)
    finally:
        for pid in _processes_under(ray_tmp):  # only if the reaper failed: ours to end, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes of the killed driver still running: {left}"
    marked = chunks_marked(layout, "odd")
    again = run_job(spec, show_progress=False)
    assert np.array_equal(stored_mask(again), reference)
    assert 3 <= again.scenes[0].chunks_resumed <= marked  # only the chunks not written before the kill are computed


def test_a_read_tasks_worker_killed_mid_read_is_retried_and_the_mask_is_unchanged(ray_local, tmp_path):
    """The worker process reading a window dies (SIGKILL): Ray retries the read elsewhere, the job never notices."""
    from pipeline.synthetic import write_synthetic_scene
    from schemas.job import job_from_dict

    scene = write_synthetic_scene(tmp_path / "big", "big", 1536, 1536, seed=4)  # reads of a few tenths of a second

    def spec(out: str):
        return job_from_dict({"scenes": [{"image": str(scene.image), "name": "big"}], "model": "pixel_linear",
                              "classes": ["a", "b", "c", "d", "e"], "tile_size": 256, "overlap": 32, "chunk_size": 512,
                              "num_actors": 1, "max_windows_in_flight": 2, "out": str(tmp_path / out)})

    def mask(result) -> np.ndarray:
        return zarr.open_array(str(result.layout.mask_store("big")), path="mask", mode="r")[:]

    reference = mask(run_job(spec("ref"), show_progress=False))
    worker, outcome = _run_in_thread(spec("faulty"))
    killed = _kill_once(worker, b"read_window_task", pause=0.002)
    assert killed, "no read was caught running"
    assert "error" not in outcome, outcome.get("error")
    assert np.array_equal(mask(outcome["result"]), reference)
