"""Faults: a model actor killed mid-job is restarted by Ray and the job still gives the same mask."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import zarr

from pipeline.run import run_job
from tests.test_pipeline import job, stored_mask


def _actor_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::TilePredictor"):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_killed_actor_is_restarted_and_mask_is_unchanged(ray_local, odd_scene, tmp_path):
    reference = stored_mask(run_job(job(odd_scene, tmp_path / "ref", chunk_size=64), show_progress=False))
    spec = job(odd_scene, tmp_path / "faulty", chunk_size=64, max_windows_in_flight=1)
    markers = tmp_path / "faulty" / "state" / "odd" / "chunks"
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run_job(spec, show_progress=False)
        except Exception as err:  # noqa: BLE001
            outcome["error"] = err

    worker = threading.Thread(target=target)
    worker.start()
    deadline = time.time() + 120
    killed = []
    while time.time() < deadline and not killed and worker.is_alive():
        if markers.is_dir() and len(list(markers.iterdir())) >= 3:
            for pid in _actor_pids():  # actors this test's job started
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    worker.join(timeout=300)
    assert killed, "the job finished before an actor could be killed"
    assert "error" not in outcome, outcome.get("error")
    assert np.array_equal(stored_mask(outcome["result"]), reference)
    assert zarr.open_array(str(outcome["result"].layout.mask_store("odd")), path="mask").attrs["satseg_complete"] is True
