"""`satseg submit`: submit a job to a Ray cluster through the Jobs API; without a cluster, run it here.

On the cluster, the job runs `pipeline.cli.entrypoint` (see pipeline.submit).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "submit a job (JOB.yaml) to a Ray cluster via the Jobs API and print its id; without an address, run it here"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file; its images, labels, checkpoint and `out` must be readable on the cluster")
    p.add_argument(
        "--address",
        help="the cluster's dashboard (Jobs API) address, e.g. http://HOST:8265 (default: the job's http(s) `address`, "
        "else RAY_ADDRESS; without any the job runs here as `satseg run` does)",
    )
    p.add_argument(
        "--python",
        help="the cluster's Python, with satseg's dependencies (default: $SATSEG_PYTHON as the head sees it, else python3)",
    )
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--quiet", action="store_true", help="no progress display (local runs)")


def _unreadable_here(spec) -> list[str]:
    from schemas.rasters import gdal_path

    paths = [s.image for s in spec.scenes] + [s.labels for s in spec.scenes if s.labels]
    paths += [spec.checkpoint] if spec.checkpoint else []
    paths += [spec.init] if spec.init else []
    return [str(p) for p in paths if gdal_path(str(p)) is None and not Path(p).exists()]  # remote ones: the cluster reads them


def main(args: argparse.Namespace) -> int:
    from pipeline.submit import follow_logs, jobs_client, resolve_address, submit_job
    from schemas.job import load_job

    logging.getLogger("ray").setLevel(logging.WARNING)  # no INFO lines about packaging the code
    spec = load_job(args.job)
    jobs_api = spec.address if spec.address and spec.address.startswith(("http://", "https://")) else None
    address = resolve_address(args.address or jobs_api)
    if address is None:
        from pipeline.cli.summary import print_job_summary
        from pipeline.run import run_job

        print("satseg: no --address and no RAY_ADDRESS: running the job here", file=sys.stderr)
        print_job_summary(run_job(spec, show_progress=not args.quiet))
        return 0
    client = jobs_client(address)
    missing = _unreadable_here(spec)
    if missing:
        note = f"{len(missing)} path(s) not found here (e.g. {missing[0]}); they must exist on the cluster"
        print(f"satseg: note: {note}", file=sys.stderr)
    job_id = submit_job(client, spec, python=args.python)
    print(job_id, flush=True)
    if not args.follow:
        print(f"satseg: follow it with `satseg jobs logs {job_id} --follow --address {address}`", file=sys.stderr)
        return 0
    try:
        row = follow_logs(client, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:  # stop following, not the job: resubmitting would start a second one
        print(
            f"satseg: stopped following; job {job_id} keeps running: `satseg jobs logs {job_id} --follow` "
            f"to follow it again, `satseg jobs stop {job_id}` to stop it (--address {address})",
            file=sys.stderr,
        )
        return 130
    print(f"satseg: job {job_id} {row.status}" + (f": {row.message}" if row.message else ""), file=sys.stderr)
    return 0 if row.status == "SUCCEEDED" else 1
