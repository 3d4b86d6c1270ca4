"""Submitting tiling jobs to a Ray cluster through the Ray Jobs API, and following them.

A submitted job carries two things: the project code (the repository root as
the runtime env's ``working_dir``) and the job itself (the validated spec with
absolute paths, compressed into the runtime env variable ``SATSEG_JOB_SPEC``).
Only paths travel, never pixels: images, labels, checkpoints and the output
folder must be readable (and the output writable) on the cluster's nodes.

The entrypoint runs under the cluster's Python, never a bare ``python``: a
bare name resolves through the head's ``PATH``, which is the system Python
when the head was started from a virtual environment without activating it.
It runs, in order of preference, ``--python`` given at submission, else
``$SATSEG_PYTHON`` as the head's processes see it (`satseg cluster start` and
``ray_cluster.yaml`` set it to the Python that runs Ray), else ``python3``.
The entrypoint checks that interpreter can import Ray before starting, so a
wrong one fails with one line in the job's logs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shlex
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from schemas.errors import ClusterError, JobNotFoundError, SpecError, first_line
from schemas.job import JobSpec, job_from_dict
from schemas.rasters import gdal_path

__all__ = [
    "SPEC_ENV",
    "PYTHON_ENV",
    "JobRow",
    "resolve_address",
    "jobs_client",
    "shipped_spec",
    "encode_spec",
    "decode_spec",
    "entrypoint",
    "submit_job",
    "list_jobs",
    "job_row",
    "job_logs",
    "follow_logs",
    "stop_job",
]

SPEC_ENV = "SATSEG_JOB_SPEC"
PYTHON_ENV = "SATSEG_PYTHON"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobRow:
    """One job as `satseg jobs` shows it."""

    id: str
    status: str
    message: str
    start_time: int | None  # ms since the epoch
    end_time: int | None
    out: str | None
    scenes: str | None
    entrypoint: str


def resolve_address(address: str | None) -> str | None:
    """The Jobs API address: ``address``, else ``RAY_ADDRESS``, else None (run locally)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    if address.startswith("ray://"):
        raise ClusterError(f"{address} is a Ray Client address; give the dashboard (Jobs API) address, e.g. http://HOST:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def check_reachable(address: str, timeout: float = 10.0) -> None:
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ClusterError(f"{address}: not an http(s) address; give the dashboard address, e.g. http://HOST:8265")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one (`satseg cluster start`) "
            "or check --address / RAY_ADDRESS"
        ) from None


def jobs_client(address: str):
    """A JobSubmissionClient for ``address``; a cluster that does not answer is one `ClusterError` line."""
    check_reachable(address)
    from ray.job_submission import JobSubmissionClient

    try:  # send Ray's auth token when one is configured, as ray.init() does (Ray >= 2.52)
        from ray._private.authentication import authentication_token_setup as auth

        quiet = logging.getLogger(auth.__name__)
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its "token authentication is enabled" notice is not ours to print
        try:
            auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            quiet.setLevel(level)
    except ImportError:
        pass
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001  (connection, auth, version: each becomes one line)
        raise ClusterError(
            f"no Ray Jobs API answers at {address} ({first_line(err)}); check --address / RAY_ADDRESS and the cluster"
        ) from None


def _absolute(path: Path | str | None) -> str | None:
    """A local path made absolute; a remote or virtual one (``s3://``, ``https://``, ``/vsi*/``) as written."""
    if path is None:
        return None
    if gdal_path(str(path)) is not None:
        return str(path)
    return str(Path(path).expanduser().absolute())


def shipped_spec(spec: JobSpec) -> JobSpec:
    """The spec as it travels: every path absolute (the job runs elsewhere), no address (it runs on the cluster)."""
    data = spec.model_dump(mode="json")
    for scene in data["scenes"]:
        scene["image"] = _absolute(scene["image"])
        scene["labels"] = _absolute(scene["labels"])
    data["checkpoint"] = _absolute(data["checkpoint"])
    data["init"] = _absolute(data.get("init"))
    data["out"] = _absolute(data["out"])
    data["address"] = None
    return job_from_dict(data)


def encode_spec(spec: JobSpec) -> str:
    """The spec as compact text for an environment variable (zlib + base64 of its JSON)."""
    raw = json.dumps(spec.model_dump(mode="json"), separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_spec(text: str | None) -> JobSpec:
    """The spec back from :func:`encode_spec`, validated again."""
    if not text:
        raise SpecError(f"{SPEC_ENV} is not set: this entrypoint runs jobs submitted by `satseg submit`")
    try:
        data = json.loads(zlib.decompress(base64.b64decode(text)))
    except (ValueError, zlib.error) as err:
        raise SpecError(f"{SPEC_ENV} is not a job written by `satseg submit` ({err}); resubmit the job") from None
    return job_from_dict(data, f"submitted job ({SPEC_ENV})")


def entrypoint(python: str | None = None) -> str:
    """The shell command a submitted job runs: the shipped job under the cluster's Python (see the module doc)."""
    py = shlex.quote(python) if python else f'"${{{PYTHON_ENV}:-python3}}"'
    hint = "submit with --python PATH or start the head with SATSEG_PYTHON set to the Python that runs Ray"
    return (
        f"PY={py}; "
        f'"$PY" -c "import ray, pipeline" 2>/dev/null '
        f'|| {{ echo "satseg: $PY cannot import ray and satseg; {hint}" >&2; exit 2; }}; '
        'exec "$PY" -m pipeline.cli.entrypoint'
    )


def submit_job(
    client,
    spec: JobSpec,
    *,
    python: str | None = None,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit ``spec`` (made absolute by :func:`shipped_spec`) with the project code; returns the job id."""
    from pipeline.cluster import code_runtime_env

    spec = shipped_spec(spec)
    runtime_env = {**code_runtime_env(), "env_vars": {SPEC_ENV: encode_spec(spec)}}
    meta = {"satseg_out": str(spec.out), "satseg_scenes": str(len(spec.scenes)), **(metadata or {})}
    try:
        return client.submit_job(
            entrypoint=entrypoint(python), runtime_env=runtime_env, submission_id=submission_id, metadata=meta
        )
    except Exception as err:  # noqa: BLE001
        raise ClusterError(f"the cluster refused the job: {first_line(err)}") from None


def _row(info) -> JobRow:
    meta = info.metadata or {}
    return JobRow(
        info.submission_id or info.job_id or "?", str(info.status.value if hasattr(info.status, "value") else info.status),
        first_line(info.message or ""), info.start_time, info.end_time,
        meta.get("satseg_out"), meta.get("satseg_scenes"), info.entrypoint or "",
    )


def _not_found(err: Exception, job_id: str, client) -> Exception:
    text = str(err)
    if "does not exist" in text or "404" in text:
        return JobNotFoundError(f"no job {job_id!r} on {client.get_address()}; list the jobs with `satseg jobs list`")
    return ClusterError(f"request for job {job_id!r} failed: {first_line(err)}")


def list_jobs(client) -> list[JobRow]:
    """Jobs submitted through the Jobs API (driver-only jobs left out), oldest first."""
    rows = [_row(j) for j in client.list_jobs() if getattr(j, "submission_id", None)]
    return sorted(rows, key=lambda r: r.start_time or 0)


def job_row(client, job_id: str) -> JobRow:
    try:
        return _row(client.get_job_info(job_id))
    except RuntimeError as err:
        raise _not_found(err, job_id, client) from None


def job_logs(client, job_id: str) -> str:
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as err:
        raise _not_found(err, job_id, client) from None


def follow_logs(client, job_id: str, write: Callable[[str], None]) -> JobRow:
    """Stream the job's logs to ``write`` until it ends; returns its final row."""
    job_row(client, job_id)  # unknown ids fail here with one line

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    import aiohttp  # Ray's Jobs client streams logs through it

    try:
        asyncio.run(tail())
    except RuntimeError as err:
        raise _not_found(err, job_id, client) from None
    except (OSError, aiohttp.ClientError) as err:  # the connection to the cluster dropped mid-stream
        raise ClusterError(
            f"lost the connection to the cluster while following job {job_id} ({err}); "
            f"`satseg jobs logs {job_id} --follow` picks it up again"
        ) from None
    row = job_row(client, job_id)
    while row.status not in TERMINAL:  # the log stream can close a moment before the status turns final
        time.sleep(0.2)
        row = job_row(client, job_id)
    return row


def stop_job(client, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    try:
        return bool(client.stop_job(job_id))
    except RuntimeError as err:
        raise _not_found(err, job_id, client) from None
