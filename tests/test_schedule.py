"""Scheduled batch runs: idempotent ticks, model identity by checkpoint hash, the lock, signals, the runs table."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.query import run_query
from pipeline.schedule import ScheduleLock, next_tick, previous_tick, run_tick, schedule_model_key
from pipeline.synthetic import write_synthetic_scene
from schemas.runs import RUNS
from schemas.schedule import load_schedule
from tests.conftest import CLASSES, TINY
from workers.mask_store import is_complete
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_status import truncate

SATSEG = str(Path(sys.executable).with_name("satseg"))
T1 = datetime(2026, 11, 25, 2, 0, tzinfo=timezone.utc)
T2 = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
T3 = datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)


def checkpoint(path: Path, seed: int) -> Path:
    from workers.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(path, create_model("hrnet_w18_small_v1", 4, len(CLASSES), **TINY), model_name="hrnet_w18_small_v1",
                    model_kwargs=TINY, bands=[1, 2, 3, 4], class_names=CLASSES, mean=[0.0] * 4, std=[1.0] * 4)
    return path


def write_schedule(folder: Path, **over) -> Path:
    """A schedule file with paths relative to it, as users write them."""
    spec = {
        "name": "nightly",
        "cron": "0 2 * * *",
        "scenes": {"glob": "incoming/*.tif", "labels": "{parent}/../labels/{stem}_labels.tif"},
        "job": {
            "checkpoint": "model.safetensors", "tile_size": 64, "overlap": 16, "chunk_size": 64, "batch_size": 4,
            "stitch": "crop",
        },
        "out": "results",
    }
    spec.update(over)
    path = folder / "schedule.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def deliver(folder: Path, name: str, seed: int) -> Path:
    """A new scene in incoming/ and its labels in labels/, as a delivery pipeline would drop them."""
    scene = write_synthetic_scene(folder / "staging", name, 96, 130, seed=seed, cell=40)
    (folder / "incoming").mkdir(exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    image = folder / "incoming" / f"{name}.tif"
    shutil.move(scene.image, image)
    shutil.move(scene.labels, folder / "labels" / f"{name}_labels.tif")
    return image


def runs(folder: Path) -> list[dict]:
    files = sorted((folder / "results" / "reports" / "runs" / "schedule=nightly").glob("*.parquet"))
    return [pq.read_table(f).to_pylist()[0] for f in files]


@pytest.fixture
def site(tmp_path):
    checkpoint(tmp_path / "model.safetensors", seed=1)
    return tmp_path


@pytest.mark.slow
def test_ticks_are_idempotent_and_pick_up_only_new_scenes(ray_local, site):
    deliver(site, "a", 1)
    deliver(site, "b", 2)
    spec = load_schedule(write_schedule(site))
    logs: list[str] = []
    first = run_tick(spec, T1, log=logs.append)
    assert (first["scenes_found"], first["scenes_submitted"], first["scenes_skipped"], first["scenes_failed"]) == (2, 2, 0, 0)
    assert first["status"] == "done" and first["model_key"].startswith("sha256:") and first["job_id"]
    assert (site / "results" / "jobs" / "20261125T020000Z" / "masks" / "a.zarr").is_dir()

    assert run_tick(spec, T1, log=logs.append) is None  # the same tick never runs twice
    assert "already ran" in logs[-1]
    second = run_tick(spec, T2, log=logs.append)
    assert (second["scenes_found"], second["scenes_submitted"], second["scenes_skipped"], second["status"]) == (2, 0, 2, "idle")
    assert not (site / "results" / "jobs" / "20261126T020000Z").exists()

    deliver(site, "c", 3)
    shutil.copy(site / "model.safetensors", site / "same-weights.safetensors")  # another path, the same content
    moved = load_schedule(write_schedule(site, job={**spec.job, "checkpoint": "same-weights.safetensors"}))
    third = run_tick(moved, T3, log=logs.append)
    assert (third["scenes_found"], third["scenes_submitted"], third["scenes_skipped"]) == (3, 1, 2)
    assert third["model_key"] == first["model_key"]

    checkpoint(site / "retrained.safetensors", seed=2)
    retrained = load_schedule(write_schedule(site, job={**spec.job, "checkpoint": "retrained.safetensors"}))
    fourth = run_tick(retrained, datetime(2026, 11, 28, 2, 0, tzinfo=timezone.utc), log=logs.append)
    assert (fourth["scenes_submitted"], fourth["scenes_skipped"]) == (3, 0)  # new weights: every scene again
    assert fourth["model_key"] != first["model_key"]

    table = pq.read_table(site / "results" / "reports" / "runs")
    assert table.num_rows == 4 and set(RUNS.names) <= set(table.column_names)
    assert table.schema.metadata[b"satseg_schema_version"] == b"1"

    columns, rows = run_query(site / "results", "SELECT schedule, run_id, scenes_submitted FROM runs ORDER BY tick")[:2]
    assert rows == [("nightly", "20261125T020000Z", 2), ("nightly", "20261126T020000Z", 0),
                    ("nightly", "20261127T020000Z", 1), ("nightly", "20261128T020000Z", 3)]
    last_night = (
        "SELECT s.scene, s.mean_iou FROM scenes s JOIN runs r ON s.job_id = r.job_id "
        "WHERE r.tick = (SELECT max(tick) FROM runs WHERE scenes_submitted > 0) ORDER BY s.scene"
    )
    columns, rows = run_query(site / "results", last_night)[:2]
    assert [r[0] for r in rows] == ["a", "b", "c"] and all(0 <= r[1] <= 1 for r in rows)


@pytest.mark.slow
def test_a_failing_scene_is_counted_and_retried_last(ray_local, site):
    deliver(site, "a", 1)
    truncate(deliver(site, "b", 2))
    deliver(site, "c", 3)
    (site / "incoming" / "notes.tif").write_text("not a raster")
    spec = load_schedule(write_schedule(site))
    said: list[str] = []
    first = run_tick(spec, T1, log=said.append)
    # notes.tif fails up front, named once in its warning; b fails at run time, and the job goes on with c
    (warning,) = [m for m in said if "notes.tif" in m]
    assert warning.count("notes.tif") == 1 and "not a readable raster" in warning, warning
    assert (first["scenes_found"], first["scenes_submitted"], first["scenes_failed"], first["status"]) == (4, 3, 2, "failed")
    assert "read failed" in first["message"]
    second = run_tick(spec, T2, log=lambda m: None)
    # a and c are done; b failed before and is tried again (last), and fails again
    assert (second["scenes_skipped"], second["scenes_submitted"], second["scenes_failed"]) == (2, 1, 2)
    done = {p.name.removesuffix(".zarr") for p in (site / "results" / "jobs").glob("*/masks/*.zarr") if is_complete(p)}
    assert done == {"a", "c"}


def test_a_manifest_lists_scenes_relative_to_itself(ray_local, site):
    image = deliver(site, "m", 5)
    (site / "lists").mkdir()
    (site / "lists" / "tonight.txt").write_text(f"# delivered at 01:30\n../incoming/{image.name}\n\n")
    spec = load_schedule(write_schedule(site, scenes={"manifest": "lists/tonight.txt"}))
    row = run_tick(spec, T1, log=lambda m: None)
    assert (row["scenes_found"], row["scenes_submitted"], row["status"]) == (1, 1, "done")
    columns, rows = run_query(site / "results", "SELECT scene, labels IS NULL AS unlabelled FROM scenes")[:2]
    assert rows == [("m", True)]  # the manifest source has no labels template


def test_an_earlier_local_ticks_leftover_state_does_not_hold_a_scene_back(ray_local, site, capsys):
    from pipeline.job_folder import PENDING, RUNNING, SceneState, write_scene_state
    from schemas.store import OutputLayout

    a = deliver(site, "a", 1)
    spec = load_schedule(write_schedule(site))
    earlier = OutputLayout(site / "results" / "jobs" / "20261124T020000Z")  # a local tick cut short: no runs row
    (earlier.root / "job.json").parent.mkdir(parents=True)
    (earlier.root / "job.json").write_text(json.dumps({"job_id": "job0"}))
    dead = _dead_pid()
    left = SceneState("a", PENDING, str(a), "job0", schedule_model_key(spec), 3, 9).moved(RUNNING)
    write_scene_state(earlier, SceneState(**{**left.__dict__, "pid": dead}))
    row = run_tick(spec, T1, log=lambda m: None)
    assert (row["scenes_skipped"], row["scenes_submitted"], row["status"]) == (0, 1, "done")
    assert main(["status", str(site / "results"), "--format", "json"]) == 0
    listed = {(r["job"], r["scene"], r["status"]) for r in json.loads(capsys.readouterr().out)}
    assert listed == {("20261124T020000Z", "a", f"running (process {dead} gone)"), ("20261125T020000Z", "a", "done")}


def _dead_pid() -> int:
    """The PID of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_glob_matching_nothing_warns_and_records_an_idle_tick(site, capsys):
    path = write_schedule(site, scenes={"glob": "incoming/*.tif"})
    assert main(["schedule", str(path), "--once"]) == 0
    err = capsys.readouterr().err
    assert "warning: glob" in err and "matches no file" in err
    (row,) = runs(site)
    assert (row["scenes_found"], row["scenes_submitted"], row["status"]) == (0, 0, "idle")
    assert not (site / "results" / "jobs").exists()


@pytest.mark.parametrize(
    "over, fragments",
    [
        ({"cron": "61 * * * *"}, ["cron", "not a valid cron expression"]),
        ({"cron": "every night"}, ["cron", "not a valid cron expression"]),
        ({"timezone": "Mars/Olympus"}, ["timezone", "unknown time zone"]),
        ({"scenes": {"glob": "a/*.tif", "manifest": "m.txt"}}, ["scenes", "exactly one of"]),
        ({"job": {"checkpoint": "model.safetensors", "out": "elsewhere"}}, ["job", "belong to the schedule"]),
        ({"job": {"checkpoint": "model.safetensors", "tile_size": 50}}, ["job.tile_size", "multiple of 32"]),
        ({"name": "night ly"}, ["name", "letters, digits"]),
    ],
)
def test_bad_schedules_are_one_line_and_write_nothing(site, capsys, over, fragments):
    path = write_schedule(site, **over)
    code, _, err = run_cli(capsys, "schedule", str(path), "--once")
    assert_one_line_error(code, err, "schedule.yaml", *fragments)
    assert not (site / "results").exists()


def test_no_cluster_at_the_address_or_another_schedules_out_is_one_line_and_writes_nothing(site, capsys):
    deliver(site, "a", 1)
    code, _, err = run_cli(capsys, "schedule", str(write_schedule(site, address="http://127.0.0.1:1")), "--once")
    assert_one_line_error(code, err, "no Ray cluster answers at http://127.0.0.1:1")
    assert not (site / "results").exists()
    (site / "results" / "reports" / "runs" / "schedule=weekly").mkdir(parents=True)
    code, _, err = run_cli(capsys, "schedule", str(write_schedule(site)), "--once")
    assert_one_line_error(code, err, "runs of schedule 'weekly'", "its own `out`")
    assert sorted(p.name for p in (site / "results").iterdir()) == ["reports"]


def test_a_held_lock_leaves_the_tick_to_its_holder_and_a_dead_holders_lock_is_taken_over(site):
    deliver(site, "a", 1)
    spec = load_schedule(write_schedule(site))
    lock_path = site / "results" / "schedule.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from pipeline.schedule import ScheduleLock; "
         f"ok = ScheduleLock(Path({str(lock_path)!r})).acquire('nightly'); print(ok, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        logs: list[str] = []
        assert run_tick(spec, T1, log=logs.append) is None
        assert f"pid {holder.pid}" in logs[-1] and "left to the scheduler" in logs[-1]
        assert runs(site) == [] and not (site / "results" / "jobs").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its record stays in the file
        holder.wait()
    assert str(holder.pid) in lock_path.read_text()
    lock = ScheduleLock(lock_path)
    assert lock.acquire("nightly") and lock.stale["pid"] == holder.pid
    lock.release()
    assert lock_path.read_text() == ""  # released cleanly: nothing stale left


def test_previous_and_next_ticks_follow_the_cron_in_its_time_zone():
    from schemas.schedule import schedule_from_dict

    spec = schedule_from_dict({"name": "n", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "scenes": {"glob": "/x/*.tif"},
                               "job": {"model": "hrnet_w18_small_v1", "classes": ["a", "b"]}, "out": "/tmp/o"})
    at_tick = datetime(2026, 11, 27, 1, 0, tzinfo=timezone.utc)  # 02:00 in Berlin (CET, UTC+1)
    assert previous_tick(spec, at_tick) == at_tick
    before = datetime(2026, 11, 27, 0, 59, tzinfo=timezone.utc)
    assert previous_tick(spec, before) == datetime(2026, 11, 26, 1, 0, tzinfo=timezone.utc)
    assert next_tick(spec, at_tick) == datetime(2026, 11, 28, 1, 0, tzinfo=timezone.utc)
    summer = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
    assert next_tick(spec, summer) == datetime(2026, 7, 2, 0, 0, tzinfo=timezone.utc)  # CEST, UTC+2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_loop_shuts_down_cleanly_on_a_signal(site, sig):
    path = write_schedule(site, cron="0 0 1 1 *")  # next tick months away: the scheduler sleeps
    proc = subprocess.Popen([SATSEG, "schedule", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "next tick" in line, line
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert runs(site) == []
    lock = ScheduleLock(site / "results" / "schedule.lock")
    assert not (site / "results").exists() or lock.acquire("nightly")
    lock.release()


def test_a_signal_ends_the_schedulers_wait_at_once_and_its_handler_takes_no_lock():
    """The handler runs in the main thread between two bytecodes: it only sets a flag (an Event.set there waited
    for the lock Event.wait holds on entry, and hung `satseg schedule` for good); the wait ends on the wakeup fd."""
    import threading

    from pipeline.schedule import _Shutdown

    with _Shutdown(log=lambda m: None) as stop:
        main_thread = threading.main_thread().ident
        timer = threading.Timer(0.3, signal.pthread_kill, (main_thread, signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        stop.wait(60.0)
        assert stop.requested and time.monotonic() - started < 10
        timer.join()
    assert signal.getsignal(signal.SIGTERM) is not stop and signal.set_wakeup_fd(-1) == -1  # both put back
