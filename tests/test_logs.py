"""Where a command's log records go: satseg's to stderr at --log-level, Ray's to the log file unless at debug."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.logs import configure_logging


@pytest.fixture
def log_path(tmp_path, monkeypatch):
    path = tmp_path / "logs" / "satseg.log"
    monkeypatch.setenv("SATSEG_LOG_FILE", str(path))
    yield path
    configure_logging("warning")  # later tests get the default again (their own log file is set by conftest)


def test_satseg_warnings_reach_stderr_and_ray_records_only_the_file(log_path, capsys):
    assert configure_logging("warning") == log_path
    logging.getLogger("pipeline.run").warning("a scene looks odd")
    logging.getLogger("pipeline.run").info("chunk plan ready")
    logging.getLogger("ray._private.worker").warning("object store is small")
    for handler in logging.getLogger().handlers:
        handler.flush()
    err = capsys.readouterr().err
    assert err.splitlines() == ["satseg: warning: a scene looks odd"]
    logged = log_path.read_text()
    assert "a scene looks odd" in logged and "chunk plan ready" in logged and "object store is small" in logged


def test_debug_shows_engine_records_on_stderr_too(log_path, capsys):
    configure_logging("debug")
    logging.getLogger("ray.dashboard").warning("ray says hello")
    logging.getLogger("pipeline.run").debug("tile batch 8")
    assert capsys.readouterr().err.splitlines() == ["satseg: warning: ray says hello", "satseg: debug: tile batch 8"]


def test_info_level_flag_is_taken_before_or_after_the_command(log_path, capsys):
    for argv in (["--log-level", "info", "models", "--format", "csv"], ["models", "--format", "csv", "--log-level", "info"]):
        assert main(argv) == 0
        logging.getLogger("pipeline.cli").info("visible at info")
        assert "satseg: info: visible at info" in capsys.readouterr().err


def test_a_bad_level_in_the_environment_is_one_line(log_path, monkeypatch, capsys):
    monkeypatch.setenv("SATSEG_LOG_LEVEL", "loud")
    assert main(["models"]) == 2
    assert capsys.readouterr().err.splitlines() == ["satseg: error: unknown log level 'loud'; choose one of debug, info, warning, error"]


def test_an_unwritable_log_file_leaves_stderr_logging_working(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SATSEG_LOG_FILE", str(tmp_path / "file" / "satseg.log"))  # its folder is a file
    try:
        assert configure_logging("warning") is None
        logging.getLogger("pipeline.run").warning("still shown")
        assert capsys.readouterr().err.splitlines() == ["satseg: warning: still shown"]
    finally:
        monkeypatch.delenv("SATSEG_LOG_FILE")
        configure_logging("warning")


def test_a_log_file_with_no_lock_beside_it_or_no_file_behind_it_still_logs_quietly(tmp_path, monkeypatch, capsys):
    """No lock file can be made beside a writable log file (here its name is taken by a folder; a read-only
    folder does the same for a user other than root), or the log file is /dev/null: records are written as by
    Python's own handler, with no "Logging error" traceback on stderr and no lock file made in /dev."""
    log = tmp_path / "satseg.log"
    (tmp_path / "satseg.log.lock").mkdir()
    try:
        for path in (log, "/dev/null"):
            monkeypatch.setenv("SATSEG_LOG_FILE", str(path))
            assert configure_logging("warning") is not None
            logging.getLogger("pipeline.run").warning("shown and logged")
            logging.getLogger("ray._private.worker").warning("only logged")
            for handler in logging.getLogger().handlers:
                handler.flush()
            assert capsys.readouterr().err.splitlines() == ["satseg: warning: shown and logged"]
        assert "shown and logged" in log.read_text() and "only logged" in log.read_text()
        assert not Path("/dev/null.lock").exists()
    finally:
        monkeypatch.delenv("SATSEG_LOG_FILE")
        configure_logging("warning")


_START = """
import logging, sys
from pipeline.logs import configure_logging
from pipeline.cluster import connect
import ray
configure_logging(sys.argv[1])
connect(num_cpus=1)
ray.shutdown()
"""


@pytest.mark.slow
def test_starting_ray_prints_nothing_and_its_notes_land_in_the_log_file(tmp_path):
    """A real local Ray instance: its start-up notes (records of the `ray` loggers) go to the file, not the terminal."""
    log = tmp_path / "satseg.log"
    env = {**__import__("os").environ, "SATSEG_LOG_FILE": str(log), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", _START, "warning"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Started a local Ray instance" not in done.stderr and "ray" not in done.stderr.lower(), done.stderr
    assert "Started a local Ray instance" in log.read_text()


_WRITER = """
import logging, sys
sys.path.insert(0, {root!r})
from pipeline.logs import SharedRotatingFile
handler = SharedRotatingFile({path!r}, maxBytes=4000, backupCount=10_000, encoding="utf-8")
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("w")
log.addHandler(handler)
log.setLevel(logging.INFO)
for i in range({n}):
    log.info("writer %s record %05d %s", {k}, i, "x" * 40)
handler.close()
"""


def test_the_log_file_rotates_safely_with_several_processes_writing(tmp_path):
    """Four processes log at once through a file that rotates every ~4 KB: no record is lost or cut, and no file
    grows past its limit by more than one record (Python's own handler loses records here)."""
    import subprocess
    from pathlib import Path

    root, path, n = str(Path(__file__).resolve().parent.parent), str(tmp_path / "satseg.log"), 2000
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER.format(root=root, path=path, n=n, k=k)]) for k in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = [f for f in tmp_path.iterdir() if f.name.startswith("satseg.log") and not f.name.endswith(".lock")]
    assert len(files) > 50  # it did rotate, many times
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert sorted(lines) == sorted(f"writer {k} record {i:05d} {'x' * 40}" for k in range(4) for i in range(n))
    assert all(f.stat().st_size <= 4000 + 80 for f in files)
