"""A local standalone Ray head on 127.0.0.1, for trying the submit path on one machine.

`start_head` runs ``ray start --head --block`` in its own process session:
every address on loopback (GCS, dashboard and its job server, agents), every
port chosen free so it never collides with another Ray instance on the
machine, and a private temp dir so ``ray.init()`` elsewhere never attaches to
it. It records the PID, the process start time, the addresses and the Python
in a state file. `stop_head` sends SIGTERM to exactly that PID: with
``--block``, ``ray start`` then stops every process it started. Other Ray
instances are never touched (no ``ray stop``).

The head is started with ``SATSEG_PYTHON`` set to this Python; Ray passes the
variable on to its workers and to the entrypoints of submitted jobs, which run
``$SATSEG_PYTHON`` (see :mod:`pipeline.submit`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.store import write_json
from schemas.errors import ClusterError

__all__ = ["HeadRecord", "default_state_file", "start_head", "stop_head", "read_head", "head_alive"]

DEFAULT_DASHBOARD_PORT = 8265


@dataclass(frozen=True)
class HeadRecord:
    """What `satseg cluster start` recorded about the head it started."""

    pid: int
    started: str  # the process's start time from /proc (guards against PID reuse), "" where unknown
    address: str  # the dashboard and Jobs API: http://127.0.0.1:PORT
    gcs_address: str  # 127.0.0.1:PORT, for ray.init(address=...)
    python: str
    temp_dir: str
    log: str
    num_cpus: int | None
    num_gpus: int | None


def default_state_file() -> Path:
    """``$SATSEG_HOME/head.json``, by default ``~/.satseg/head.json``."""
    home = os.environ.get("SATSEG_HOME") or os.path.join(os.path.expanduser("~"), ".satseg")
    return Path(home) / "head.json"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); "" where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _running(pid: int) -> bool:
    """True while ``pid`` runs; reaps it first if it is our own exited child."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def head_alive(record: HeadRecord) -> bool:
    """True while the recorded head process runs (and is the same process, not a reused PID)."""
    if not _running(record.pid):
        return False
    return not record.started or _process_start_time(record.pid) == record.started


def read_head(state_file: Path | None = None) -> HeadRecord | None:
    """The recorded head, or None if none was recorded."""
    path = state_file or default_state_file()
    try:
        return HeadRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise ClusterError(f"{path}: unreadable head record ({err}); remove it if no head runs") from None


def _has_ray_client() -> bool:
    try:
        from ray._private.utils import get_ray_client_dependency_error
    except ImportError:
        return False
    return get_ray_client_dependency_error() is None


def _ray_command() -> list[str]:
    ray = Path(sys.executable).with_name("ray")
    return [str(ray)] if ray.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def start_head(
    state_file: Path | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    timeout: float = 120.0,
) -> HeadRecord:
    """Start a head bound to 127.0.0.1 and wait until its Jobs API answers; ``dashboard_port=0`` picks a free port."""
    path = state_file or default_state_file()
    old = read_head(path)
    if old is not None and head_alive(old):
        raise ClusterError(
            f"a head started by satseg already runs (pid {old.pid}, {old.address}); run `satseg cluster stop` first"
        )
    if dashboard_port == 0:
        dashboard_port = _free_port()
    elif not _port_free(dashboard_port):
        raise ClusterError(f"port {dashboard_port} on 127.0.0.1 is in use; pass --dashboard-port 0 to pick a free one")
    gcs_port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="satseg-ray-")  # short: Ray's socket paths must stay under ~107 characters
    log = Path(temp_dir) / "ray-start.log"
    cmd = _ray_command() + [
        "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--node-manager-port", str(_free_port()),
        "--object-manager-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()),
        "--temp-dir", temp_dir,
    ]
    if _has_ray_client():  # with Ray Client installed, `ray start` would take port 10001
        cmd += ["--ray-client-server-port", str(_free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: else `ray start` swaps --node-ip-address 127.0.0.1 for the outward IP.
    env = dict(os.environ, SATSEG_PYTHON=sys.executable, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    record = HeadRecord(
        proc.pid, _process_start_time(proc.pid), f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}",
        sys.executable, temp_dir, str(log), num_cpus, num_gpus,
    )
    write_json(path, asdict(record))
    try:
        _wait_until_up(record, proc, timeout)
    except BaseException:
        _terminate(record, 30.0)
        path.unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return record


def _wait_until_up(record: HeadRecord, proc: subprocess.Popen, timeout: float) -> None:
    from pipeline.submit import jobs_client

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            last = _last_line(Path(record.log))
            raise ClusterError(f"ray start exited with status {proc.returncode}: {last}; see {record.log}")
        try:
            jobs_client(record.address)
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the head's Jobs API at {record.address} did not answer in {timeout:.0f} s; see {record.log}"
                ) from None
            time.sleep(0.5)


def _terminate(record: HeadRecord, timeout: float) -> bool:
    """SIGTERM to the recorded process, SIGKILL to its process group after ``timeout``; True once it is gone."""
    if not head_alive(record):
        return True
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(record.pid):
            return True
        time.sleep(0.2)
    try:
        os.killpg(record.pid, signal.SIGKILL)  # its own session: the group holds only what this head started
    except ProcessLookupError:
        pass
    time.sleep(0.5)
    return not _running(record.pid)


def stop_head(state_file: Path | None = None, *, timeout: float = 60.0) -> HeadRecord:
    """Stop the recorded head by its PID and remove its temp dir; the record is removed once it is gone."""
    path = state_file or default_state_file()
    record = read_head(path)
    if record is None:
        raise ClusterError(f"no head recorded in {path}; start one with `satseg cluster start`")
    if not _terminate(record, timeout):
        raise ClusterError(f"head pid {record.pid} did not stop in {timeout:.0f} s; its log is {record.log}")
    shutil.rmtree(record.temp_dir, ignore_errors=True)
    path.unlink(missing_ok=True)
    return record
