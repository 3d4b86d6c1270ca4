"""Failures the machine causes: a full disk, a read-only file system, an output path that is a file.

Each ends in one line and exit 2, with the scene marked failed and resumable. The disks are real: a
small tmpfs mounted for the test (skipped where this process may not mount one).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.job_folder import read_scene_state
from schemas.store import OutputLayout
from tests.conftest import CLASSES, TINY
from tests.test_cli import assert_one_line_error, run_cli


def _job_file(tmp_path: Path, scene, out: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"scenes:\n  - image: {scene.image}\n    labels: {scene.labels}\n    name: odd\n"
        f"model: hrnet_w18_small_v1\nmodel_options: {TINY}\nclasses: {CLASSES}\n"
        f"tile_size: 64\noverlap: 16\nchunk_size: 128\nout: {out}\n"
    )
    return job


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 64 KiB at ``tmp_path/disk``: too small for one scene's outputs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _mask(out: Path) -> np.ndarray:
    return zarr.open_array(str(OutputLayout(out).mask_store("odd")), path="mask", mode="r")[:]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_job_resumes_once_there_is_room(capsys, tmp_path, odd_scene, ray_local, small_disk):
    out = small_disk / "out"
    job = _job_file(tmp_path, odd_scene, out)
    code, _, err = run_cli(capsys, "run", str(job), "--quiet")
    assert_one_line_error(code, err, "No space left on device", "rerun")
    state = read_scene_state(OutputLayout(out), "odd")
    assert state is None or state.status != "done"
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # room again
    code, _, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    assert read_scene_state(OutputLayout(out), "odd").status == "done"
    clean = tmp_path / "clean"
    assert run_cli(capsys, "run", str(_job_file(tmp_path, odd_scene, clean)), "--quiet")[0] == 0
    assert np.array_equal(_mask(out), _mask(clean))


def test_a_read_only_output_disk_is_one_line(capsys, tmp_path, odd_scene, ray_local, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, _, err = run_cli(capsys, "run", str(_job_file(tmp_path, odd_scene, small_disk / "out")), "--quiet")
    assert_one_line_error(code, err, "Read-only file system", "writable --out")


def test_an_output_path_that_is_a_file_is_one_line_and_nothing_is_written(capsys, tmp_path, odd_scene, ray_local):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    code, _, err = run_cli(capsys, "run", str(_job_file(tmp_path, odd_scene, taken)), "--quiet")
    assert_one_line_error(code, err, str(taken), "is a file")
    code, _, err = run_cli(capsys, "run", str(_job_file(tmp_path, odd_scene, taken / "below")), "--quiet")
    assert_one_line_error(code, err, str(taken), "is a file")
    code, _, err = run_cli(
        capsys, "evaluate", str(odd_scene.labels), str(odd_scene.labels), "--classes", ",".join(CLASSES), "--out", str(taken)
    )
    assert_one_line_error(code, err, str(taken), "is a file")
    assert taken.read_text() == "a file, not a folder"
