"""Scene state under the output folder: written by run_job, read by `satseg status` without a cluster."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.core.geometry import ChunkGrid
from pipeline.run import run_job
from pipeline.job_folder import DONE, FAILED, PENDING, RUNNING, SceneState, job_states, model_key, write_scene_state
from schemas.errors import MachineError, one_line, user_error
from pipeline.synthetic import write_synthetic_scene
from schemas.errors import InputFileError, ScenesFailedError
from schemas.job import job_from_dict
from schemas.store import OutputLayout
from tests.conftest import CLASSES, TINY
from tests.test_cli import assert_one_line_error, run_cli


def tiny_job(scenes, out, **over):
    spec = {
        "scenes": [{"image": str(s.image), "labels": str(s.labels), "name": s.image.stem} for s in scenes],
        "model": "hrnet_w18_small_v1", "model_options": TINY, "classes": CLASSES,
        "tile_size": 64, "overlap": 16, "chunk_size": 64, "batch_size": 4, "stitch": "crop", "out": str(out),
    }
    spec.update(over)
    return job_from_dict(spec)


def truncate(path) -> None:
    """Cut a GeoTIFF in half: its header still reads, its pixels do not (a run-time failure, not a validation one)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_state_file_round_trip_and_live_chunk_count(tmp_path):
    layout = OutputLayout(tmp_path)
    state = SceneState("s", PENDING, "/data/s.tif", "job1", "sha256:abc", 0, 12).moved(RUNNING)
    write_scene_state(layout, state)
    assert [p.name for p in (tmp_path / "state" / "s").iterdir()] == ["status.json"]  # no temp file left behind
    markers = layout.chunk_markers("s")
    markers.mkdir(parents=True)
    for key in ("0.0", "0.1", "1.0"):
        (markers / key).touch()
    (read,) = job_states(tmp_path)
    assert (read.status, read.chunks_done, read.chunks_total, read.pid) == (RUNNING, 3, 12, os.getpid())
    assert not read.process_gone
    write_scene_state(layout, read.moved(FAILED, reason="boom"))
    assert job_states(tmp_path)[0].reason == "boom"
    with pytest.raises(ValueError, match="unknown scene status"):
        SceneState("s", "exploded", "", "", "", 0, 0)


def test_a_running_scene_of_a_dead_process_says_so(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    state = SceneState("s", PENDING, "/data/s.tif", "job1", "k", 0, 4).moved(RUNNING)
    state = SceneState(**{**state.__dict__, "pid": int(dead.stdout)})
    write_scene_state(OutputLayout(tmp_path), state)
    (tmp_path / "job.json").write_text(json.dumps({"job_id": "job1"}))
    assert job_states(tmp_path)[0].process_gone
    code = main(["status", str(tmp_path)])
    assert code == 0


def test_model_key_is_the_checkpoint_hash_else_model_options_and_seed():
    assert model_key("ab12", "hrnet_w18") == model_key("ab12", None) == "sha256:ab12"
    assert model_key(None, "m", {"a": 1}, 0) == model_key(None, "m", {"a": 1}, 0)
    assert model_key(None, "m", {"a": 1}, 0) != model_key(None, "m", {"a": 2}, 0)
    assert model_key(None, "m", {}, 0) != model_key(None, "m", {}, 1)


def test_one_line_unwraps_a_ray_task_error(ray_local):
    @ray_local.remote(max_retries=0)
    def fails():
        raise InputFileError("x.tif: read failed (truncated); check the file is complete")

    with pytest.raises(Exception) as caught:
        ray_local.get(fails.remote())
    assert one_line(caught.value) == "x.tif: read failed (truncated); check the file is complete"
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(KeyboardInterrupt()).startswith("interrupted")


@pytest.mark.parametrize(
    ("number", "says"),
    [(errno.EACCES, "permissions"), (errno.EPERM, "permissions"), (errno.ENOSPC, "free some space"),
     (errno.EROFS, "writable --out"), (errno.ENAMETOOLONG, "shorter"), (errno.EDQUOT, "quota")],
)
def test_a_machine_failure_inside_a_ray_task_is_one_line(ray_local, number, says):
    """What the disk or the permissions refuse, even deep in a Ray worker, is a user error: one line with a fix.

    (Permissions cannot be refused to root, which runs these tests, so the worker raises the error itself.)
    """
    @ray_local.remote(max_retries=0)
    def write():
        raise OSError(number, os.strerror(number), "/out/masks/s.zarr/mask/c/0/0")

    with pytest.raises(Exception) as caught:
        ray_local.get(write.remote())
    assert isinstance(user_error(caught.value), MachineError)
    line = one_line(caught.value)
    assert line.startswith("/out/masks/s.zarr/mask/c/0/0: ") and says in line and "\n" not in line


@pytest.mark.slow
def test_run_job_marks_a_failing_scene_failed_and_a_rerun_finishes(ray_local, tmp_path, capsys):
    good = write_synthetic_scene(tmp_path / "scenes", "good", 96, 130, seed=3, cell=40)
    bad = write_synthetic_scene(tmp_path / "scenes", "zbad", 96, 130, seed=4, cell=40)
    intact = bad.image.read_bytes()
    truncate(bad.image)
    out = tmp_path / "out"
    spec = tiny_job([good, bad], out)
    with pytest.raises(Exception):
        run_job(spec, show_progress=False)
    states = {s.scene: s for s in job_states(out)}
    total = len(ChunkGrid(96, 130, 64))
    assert states["good"].status == DONE and states["good"].chunks_done == states["good"].chunks_total == total
    assert states["zbad"].status == FAILED
    assert "zbad.tif" in states["zbad"].reason and "read failed" in states["zbad"].reason
    assert len(states["zbad"].reason.splitlines()) == 1
    assert states["zbad"].image == str(bad.image) and states["zbad"].model_key.startswith("model:hrnet_w18_small_v1:")

    capsys.readouterr()
    assert main(["status", str(out), "--format", "json"]) == 0
    rows = {r["scene"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["status"] == "done" and rows["zbad"]["status"] == "failed"
    assert rows["zbad"]["reason"] == states["zbad"].reason

    bad.image.write_bytes(intact)
    result = run_job(spec, show_progress=False)
    assert [s.resumed_whole for s in result.scenes] == [True, False]
    assert {s.scene: s.status for s in job_states(out)} == {"good": DONE, "zbad": DONE}
    assert all(s.reason is None for s in job_states(out))


def test_a_failing_scene_does_not_stop_the_scenes_after_it(ray_local, tmp_path):
    bad = write_synthetic_scene(tmp_path / "scenes", "abad", 96, 130, seed=4, cell=40)
    worse = write_synthetic_scene(tmp_path / "scenes", "bworse", 96, 130, seed=5, cell=40)
    good = write_synthetic_scene(tmp_path / "scenes", "cgood", 96, 130, seed=3, cell=40)
    truncate(bad.image)
    truncate(worse.image)
    out = tmp_path / "out"
    with pytest.raises(ScenesFailedError, match="2 of 3 scenes failed, first abad"):
        run_job(tiny_job([bad, worse, good], out), show_progress=False)
    states = {s.scene: s.status for s in job_states(out)}
    assert states == {"abad": FAILED, "bworse": FAILED, "cgood": DONE}


def test_status_of_a_folder_without_a_job_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "status", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "nothing", "no job.json")


@pytest.mark.parametrize(
    "argv",
    [["submit"], ["jobs"], ["jobs", "logs"], ["status"], ["schedule"], ["cluster"], ["cluster", "start"], ["cluster", "stop"]],
)
def test_operations_commands_have_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: satseg " + " ".join(argv) in capsys.readouterr().out


def test_of_two_jobs_claiming_one_folder_at_once_exactly_one_proceeds(tmp_path):
    import threading

    from pipeline.job_folder import claim_output, read_job_record
    from schemas.errors import OutputConflictError
    from schemas.store import OutputLayout

    for attempt in range(30):
        layout = OutputLayout(tmp_path / f"out{attempt}")
        start = threading.Barrier(2)
        outcome: dict[str, str] = {}

        def claim(job_id: str) -> None:
            start.wait()
            try:
                claim_output(layout, job_id, {"attempt": attempt})
                outcome[job_id] = "proceeds"
            except OutputConflictError:
                outcome[job_id] = "refused"

        threads = [threading.Thread(target=claim, args=(j,)) for j in ("aaaa", "bbbb")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [j for j, o in outcome.items() if o == "proceeds"]
        assert len(winners) == 1, outcome
        assert read_job_record(layout.root)["job_id"] == winners[0]
        assert [p.name for p in layout.root.iterdir()] == ["job.json"]  # no temporary file left behind


@pytest.mark.parametrize("text", ["garbage{", "[1, 2]", ""])
def test_status_of_a_folder_whose_job_json_is_unreadable_is_one_line(tmp_path, capsys, text):
    (tmp_path / "job.json").write_text(text)
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "job.json: not a job record satseg can read" in err
