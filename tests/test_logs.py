"""Where a command's log records go: satseg's to stderr at --log-level, Ray's to the log file unless at debug."""

from __future__ import annotations

import logging
import subprocess
import sys

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


_START = """
import logging, sys
from pipeline.logs import configure_logging
from pipeline.cluster import connect
import ray
configure_logging(sys.argv[1])
connect(num_cpus=1)
ray.shutdown()
"""


def test_starting_ray_prints_nothing_and_its_notes_land_in_the_log_file(tmp_path):
    """A real local Ray instance: its start-up notes (records of the `ray` loggers) go to the file, not the terminal."""
    log = tmp_path / "satseg.log"
    env = {**__import__("os").environ, "SATSEG_LOG_FILE": str(log), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", _START, "warning"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Started a local Ray instance" not in done.stderr and "ray" not in done.stderr.lower(), done.stderr
    assert "Started a local Ray instance" in log.read_text()
