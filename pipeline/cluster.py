"""Connecting to Ray: a local instance bound to loopback, or a given cluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["connect", "code_runtime_env", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Never shipped to a cluster: environments, history, outputs and rasters (inputs live on shared storage).
_CODE_EXCLUDES = [
    ".venv", ".git", ".pytest_cache", "demo-output", "satseg-output", "benchmarks/output",
    "**/*.zarr", "**/*.tif", "**/*.tiff", "**/*.safetensors", "**/*.parquet", "**/__pycache__", "*.egg-info",
]


def code_runtime_env() -> dict:
    """The runtime_env fields that ship this repository's code: the repo root as ``working_dir``."""
    return {"working_dir": str(REPO_ROOT), "excludes": list(_CODE_EXCLUDES)}


# Ray's switch for "cluster mode"; "0" (satseg's default) keeps 127.0.0.1 as 127.0.0.1. See _loopback_kept.
_CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_kept():
    """While ``ray.init`` runs, a 127.0.0.1 node IP or GCS address stays 127.0.0.1.

    In cluster mode (Linux's default) ``ray.init`` swaps a loopback
    ``_node_ip_address``, and the host of a loopback ``address``, for the
    machine's outward IP (``ray._private.services.resolve_ip_for_localhost``):
    a local instance would then listen on every interface, and a head started
    on 127.0.0.1 (`satseg cluster start`, ``ray.cluster_utils.Cluster`` in the
    tests) could not be reached. Ray's only public switch is the variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and Ray reads it once, when
    ``ray`` is first imported, into ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``;
    so, whatever imported ray first, the constant is set here for the call and
    restored after it. This is satseg's one use of ``ray._private`` for it; Ray
    consults the constant only while no node is connected (after ``ray.init``
    the node's own IP answers), and the processes ``ray.init`` starts take the
    node IP from their command line, so nothing else needs the variable.
    A value other than "0" in the environment opts out: Ray's choice stands.
    """
    if os.environ.get(_CLUSTER_MODE_ENV, "0") != "0":
        yield
        return
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class _TokenAuthEnabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


@contextmanager
def _quiet_about_token_auth():
    """While a local instance starts, Ray's note that token authentication is on (the safe default) is not printed:
    `satseg run` prints one summary, or one line on error. Its warning when authentication is off still shows."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    note = _TokenAuthEnabled()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def _ray_logs_to_root() -> None:
    """Ray's driver-side records go to the root logger's handlers: `pipeline.logs` decides where (Ray's warnings to the
    log file, not the terminal), and a library user's logging setup applies. Ray's own ``ray`` handler otherwise prints
    to stderr; with ``configure_logging=False`` ``ray.init`` drops it, and records propagate up from then on."""
    logging.getLogger("ray").propagate = True


def _joined_cluster() -> bool:
    """Whether the Ray this process is connected to is a cluster it joined, not a local instance it started.

    Read from the job's runtime env, which Ray keeps: ``connect`` ships the
    code (a ``working_dir``) to every cluster it joins, and a job submitted by
    `satseg submit` brings one; a local instance runs this checkout and has none.
    """
    import ray

    return bool(ray.get_runtime_context().runtime_env.get("working_dir"))


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Initialise Ray once per process; returns True when on a cluster (then Dask runs on Ray too).

    With an address (or ``RAY_ADDRESS``) it joins that cluster. Without, a
    local instance starts with every address on 127.0.0.1 and no dashboard, so
    no traffic leaves the machine, whether or not ray was imported before.
    When Ray is already initialised it starts nothing and says whether that
    Ray is a cluster: True when given an address, else as Ray records it.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        from schemas.errors import ClusterError

        raise ClusterError(
            f"{address} is a Jobs API (dashboard) address: use `satseg submit JOB.yaml --address {address}`, "
            "or give `satseg run` the cluster's GCS address HOST:6379"
        )
    if ray.is_initialized():
        return address is not None or _joined_cluster()
    # GDAL's block cache stays small: each block is read about once, so a big cache only grows.
    # (A low MALLOC_MMAP_THRESHOLD_ kept the actor's heap flat but made torch's CPU forward
    # passes ~40% slower through page faults: measured, not used.)
    env_vars = {"GDAL_CACHEMAX": "128"}
    if address:
        runtime_env = {"env_vars": env_vars}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a submitted job's driver: the job already ships the code
            runtime_env.update(code_runtime_env())
        _ray_logs_to_root()
        with _loopback_kept(), _quiet_about_token_auth():  # a head on 127.0.0.1 is reached at 127.0.0.1
            ray.init(address=address, runtime_env=runtime_env, configure_logging=False, log_to_driver=False)
        return True
    _start_reaper()  # before ray.init: it watches every process the local instance will start
    _ray_logs_to_root()
    with _loopback_kept(), _quiet_about_token_auth():
        ray.init(
            num_cpus=num_cpus,
            runtime_env={"env_vars": env_vars},
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    return False


# The reaper, run as `python -c _REAPER DRIVER_PID`: while the driver lives it notes the driver's descendants
# (with their start times, so a reused PID is never taken for one); once the driver is gone, however it ended,
# it ends those still running, politely first. Linux only (/proc); elsewhere it exits at once.
_REAPER = """
import os, signal, sys, time
driver, me = int(sys.argv[1]), os.getpid()

def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None

def descendants():
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, grew = {driver}, True
    while grew:
        more = {p for p, q in parents.items() if q in tree} - tree
        tree |= more
        grew = bool(more)
    return {p: started(p) for p in tree - {driver, me}}

if not os.path.isdir("/proc"):
    sys.exit(0)
seen, birth = {}, started(driver)
while started(driver) == birth and birth is not None:
    seen.update(descendants())
    time.sleep(0.5)
for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0)):
    for pid, when in seen.items():
        if when is not None and started(pid) == when:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    time.sleep(pause)
"""


def _start_reaper() -> None:
    """Start the reaper of this driver's local Ray instance: Ray's processes end with the driver, even on SIGKILL.

    (Left alone, Ray's agents outlive a killed driver for a minute or more.)
    """
    import subprocess
    import sys

    subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )
