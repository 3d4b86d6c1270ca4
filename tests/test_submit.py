"""Submitting to a real standalone Ray head on 127.0.0.1, started and stopped by `satseg cluster` in a fixture.

The head is a separate Ray instance from the session's `ray_local` (its own
ports and temp dir); both run at once here, and neither sees the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline.cli import main
from pipeline.head import read_head
from pipeline.run import run_job
from pipeline.job_folder import DONE, job_states
from pipeline.submit import decode_spec, encode_spec, shipped_spec
from pipeline.synthetic import write_synthetic_scene
from schemas.job import load_job
from tests.conftest import CLASSES, TINY
from tests.test_cli import assert_one_line_error, run_cli

SATSEG = str(Path(sys.executable).with_name("satseg"))


def satseg(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run([SATSEG, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def process_tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started by `satseg cluster start` (2 CPUs, free ports); stopped by its PID at the end."""
    state = tmp_path_factory.mktemp("head") / "head.json"
    started = satseg("cluster", "start", "--num-cpus", "2", "--dashboard-port", "0", "--state", str(state), timeout=180)
    assert started.returncode == 0, started.stderr
    record = read_head(state)
    yield {"state": state, "record": record, "address": record.address}
    if read_head(state) is not None:
        satseg("cluster", "stop", "--state", str(state))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_synthetic_scene(tmp_path_factory.mktemp("submit-scene"), "field", 110, 150, seed=7, cell=40)


def write_job(folder: Path, scene, out: str = "out") -> Path:
    """A job file with paths relative to it, as users write them."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {
        "scenes": [
            {"image": os.path.relpath(scene.image, folder), "labels": os.path.relpath(scene.labels, folder), "name": "field"}
        ],
        "model": "hrnet_w18_small_v1", "model_options": TINY, "classes": CLASSES,
        "tile_size": 64, "overlap": 16, "chunk_size": 64, "batch_size": 4, "stitch": "crop", "out": out,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_head_listens_on_loopback_only(head):
    pids = process_tree(head["record"].pid)
    assert len(pids) > 3  # ray start, GCS, raylet, dashboard, ...
    addresses = listening_addresses(pids)
    assert addresses, "the head listens on nothing?"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert set(addresses) <= loopback, addresses
    assert head["address"].startswith("http://127.0.0.1:")


def test_a_second_start_is_refused(head, capsys):
    code, _, err = run_cli(capsys, "cluster", "start", "--dashboard-port", "0", "--state", str(head["state"]))
    assert_one_line_error(code, err, "already runs", str(head["record"].pid))


@pytest.mark.slow
def test_submit_ships_code_and_job_and_the_outputs_match_a_local_run(head, scene, tmp_path, ray_local):
    job_file = write_job(tmp_path / "jobs", scene)
    done = satseg("submit", str(job_file), "--address", head["address"], "--follow", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert f"with {head['record'].python}" in done.stdout  # the entrypoint ran under the head's Python
    assert "mean IoU" in done.stdout and "SUCCEEDED" in done.stderr

    out = tmp_path / "jobs" / "out"  # `out` is relative to the job file, wherever the job ran
    (state,) = job_states(out)
    assert state.status == DONE and state.chunks_done == state.chunks_total > 1
    submitted = zarr.open_array(str(out / "masks" / "field.zarr"), path="mask", mode="r")[:]
    assert (out / "reports" / "scenes").is_dir()

    local = run_job(load_job(job_file).model_copy(update={"out": tmp_path / "local"}), show_progress=False)
    assert np.array_equal(submitted, zarr.open_array(str(local.layout.mask_store("field")), path="mask", mode="r")[:])

    listed = satseg("jobs", "list", "--format", "json", env={"RAY_ADDRESS": head["address"]})
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows[job_id]["status"] == "SUCCEEDED" and rows[job_id]["out"] == str(out)
    status = satseg("jobs", "status", job_id, "--address", head["address"])
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and f"satseg status {out}" in status.stdout
    logs = satseg("jobs", "logs", job_id, "--address", head["address"])
    assert logs.returncode == 0 and "mean IoU" in logs.stdout


@pytest.mark.slow
def test_a_wrong_python_fails_the_job_with_one_line(head, scene, tmp_path):
    job_file = write_job(tmp_path, scene)
    done = satseg("submit", str(job_file), "--address", head["address"], "--python", "/nonexistent/python3", "--follow")
    assert done.returncode == 1
    assert "satseg: /nonexistent/python3 cannot import ray and satseg" in done.stdout
    assert "FAILED" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stop_stops_a_running_job(head, scene, tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 300\n")
    slow.chmod(0o755)
    submitted = satseg("submit", str(write_job(tmp_path, scene)), "--address", head["address"], "--python", str(slow))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    address = ["--address", head["address"]]
    deadline = time.monotonic() + 60
    while "RUNNING" not in satseg("jobs", "status", job_id, *address).stdout:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    stopped = satseg("jobs", "stop", job_id, *address)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    deadline = time.monotonic() + 60
    while "STOPPED" not in satseg("jobs", "status", job_id, *address).stdout:
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(0.5)


@pytest.mark.parametrize("action", [["status"], ["logs"], ["logs", "--follow"], ["stop"]])
def test_an_unknown_job_id_is_one_line(head, capsys, action):
    code, _, err = run_cli(capsys, "jobs", action[0], "raysubmit_nope", *action[1:], "--address", head["address"])
    assert_one_line_error(code, err, "no job 'raysubmit_nope'", "satseg jobs list")


def test_an_address_with_no_cluster_is_one_line_and_writes_nothing(scene, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job_file = write_job(tmp_path, scene)
    with_port = ["--address", "http://127.0.0.1:9"]  # the discard port: nothing listens there
    for argv in (["submit", str(job_file), *with_port], ["jobs", "list", *with_port], ["jobs", "status", "x", *with_port]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "no Ray cluster answers at http://127.0.0.1:9")
    code, _, err = run_cli(capsys, "submit", str(job_file), "--address", "ray://127.0.0.1:10001")
    assert_one_line_error(code, err, "Ray Client address", "http://HOST:8265")
    code, _, err = run_cli(capsys, "jobs", "list")
    assert_one_line_error(code, err, "no cluster address", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # as exported for `satseg submit`, then used for `satseg run`
    code, _, err = run_cli(capsys, "run", str(job_file))
    assert_one_line_error(code, err, "Jobs API (dashboard) address", "satseg submit")
    assert not (tmp_path / "out").exists()


def test_submit_without_an_address_runs_here(ray_local, scene, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", str(write_job(tmp_path, scene)), "--quiet"]) == 0
    assert "running the job here" in capsys.readouterr().err
    assert [s.status for s in job_states(tmp_path / "out")] == [DONE]


def test_the_shipped_spec_is_absolute_and_round_trips(scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_job(write_job(Path("rel"), scene))
    shipped = shipped_spec(spec)
    assert shipped.out == tmp_path / "rel" / "out" and shipped.scenes[0].image.is_absolute() and shipped.address is None
    assert decode_spec(encode_spec(shipped)) == shipped


@pytest.mark.slow
def test_a_schedule_tick_is_submitted_to_the_cluster_and_waited_for(head, tmp_path, capsys, monkeypatch):
    from tests.test_schedule import checkpoint, deliver, runs, write_schedule

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    checkpoint(tmp_path / "model.safetensors", seed=1)
    deliver(tmp_path, "a", 1)
    path = write_schedule(tmp_path, address=head["address"], cron="* * * * *")
    assert main(["schedule", str(path), "--once"]) == 0, capsys.readouterr().err
    (row,) = runs(tmp_path)
    assert row["status"] == "done" and (row["scenes_submitted"], row["scenes_failed"]) == (1, 0)
    assert row["submission_id"] == f"satseg-nightly-{row['run_id']}" and row["job_id"]
    assert [s.status for s in job_states(tmp_path / "results" / "jobs" / row["run_id"])] == [DONE]
    status = satseg("jobs", "status", row["submission_id"], "--address", head["address"])
    assert "SUCCEEDED" in status.stdout


@pytest.mark.slow
def test_a_scene_whose_earlier_tick_job_still_runs_on_the_cluster_is_skipped(head, ray_local, tmp_path, monkeypatch):
    from pipeline.schedule import run_tick, schedule_model_key
    from pipeline.job_folder import PENDING, SceneState, write_scene_state
    from schemas.schedule import load_schedule
    from schemas.store import OutputLayout
    from tests.test_schedule import T1, T2, checkpoint, deliver, write_schedule

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    checkpoint(tmp_path / "model.safetensors", seed=1)
    a = deliver(tmp_path, "a", 1)
    deliver(tmp_path, "b", 2)
    spec = load_schedule(write_schedule(tmp_path))  # ticks run here; the earlier one had submitted its job
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 300\n")
    slow.chmod(0o755)
    submitted = satseg("submit", str(write_job(tmp_path / "j", scene_of(a))), "--address", head["address"], "--python", str(slow))
    job_id = submitted.stdout.strip()
    earlier = OutputLayout(tmp_path / "results" / "jobs" / "20261124T020000Z")  # its scheduler died while waiting
    write_scene_state(earlier, SceneState("a", PENDING, str(a), "job0", schedule_model_key(spec), 0, 9).moved(PENDING))
    (earlier.root / "submission.json").write_text(json.dumps({"submission_id": job_id, "address": head["address"]}))

    row = run_tick(spec, T1, log=lambda m: None)
    assert (row["scenes_found"], row["scenes_skipped"], row["scenes_submitted"]) == (2, 1, 1)  # a is in flight
    assert satseg("jobs", "stop", job_id, "--address", head["address"]).returncode == 0
    deadline = time.monotonic() + 60
    while "STOPPED" not in satseg("jobs", "status", job_id, "--address", head["address"]).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    row = run_tick(spec, T2, log=lambda m: None)
    assert (row["scenes_skipped"], row["scenes_submitted"]) == (1, 1)  # b is done; a runs now


def scene_of(image: Path):
    """The (image, labels) pair `deliver` left, in the shape write_job takes."""
    from types import SimpleNamespace

    return SimpleNamespace(image=image, labels=image.parent.parent / "labels" / f"{image.stem}_labels.tif")


def test_stop_ends_exactly_the_head_by_its_pid(head, ray_local):
    record = head["record"]
    pids = process_tree(record.pid)
    stopped = satseg("cluster", "stop", "--state", str(head["state"]))
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {record.pid}" in stopped.stdout
    deadline = time.monotonic() + 15  # Ray's per-job watchers poll their parent once a second before exiting
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"processes of the head still run: {[(p, _cmdline(p)) for p in alive]}"
    assert not Path(record.temp_dir).exists() and read_head(head["state"]) is None
    assert ray_local.get(ray_local.put("still here")) == "still here"  # the session's own Ray is untouched
    again = satseg("cluster", "stop", "--state", str(head["state"]))
    assert again.returncode == 2 and "no head recorded" in again.stderr
