"""Connecting to Ray: a local instance bound to loopback, or a given cluster."""

from __future__ import annotations

import os
from pathlib import Path

# Ray reads this when it is first imported: with it, a local instance binds to 127.0.0.1
# instead of every interface. Set before anything imports ray (this module is imported first).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

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


_ON_CLUSTER = False  # whether this process joined a cluster (then Dask runs on Ray too)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Initialise Ray once per process; returns True when a cluster address was used.

    Without an address (and no ``RAY_ADDRESS``) a local instance starts on
    127.0.0.1 with no dashboard, so no traffic leaves the machine.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        from schemas.errors import ClusterError

        raise ClusterError(
            f"{address} is a Jobs API (dashboard) address: use `satseg submit JOB.yaml --address {address}`, "
            "or give `satseg run` the cluster's GCS address HOST:6379"
        )
    # GDAL's block cache stays small: each block is read about once, so a big cache only grows.
    # (A low MALLOC_MMAP_THRESHOLD_ kept the actor's heap flat but made torch's CPU forward
    # passes ~40% slower through page faults: measured, not used.)
    global _ON_CLUSTER
    env_vars = {"GDAL_CACHEMAX": "128"}
    if ray.is_initialized():
        return _ON_CLUSTER or address is not None
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before this module
    if address:
        runtime_env = {"env_vars": env_vars}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a submitted job's driver: the job already ships the code
            runtime_env.update(code_runtime_env())
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=False)
        _ON_CLUSTER = True
        return True
    ray.init(
        num_cpus=num_cpus,
        runtime_env={"env_vars": env_vars},
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    return False
