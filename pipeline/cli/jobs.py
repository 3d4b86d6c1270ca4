"""`satseg jobs`: list, inspect, follow and stop jobs on a Ray cluster through the Jobs API."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone

HELP = "list jobs on a Ray cluster, show one's status or logs (--follow), or stop it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions = {
        "list": "list the cluster's submitted jobs",
        "status": "show one job's status",
        "logs": "print one job's logs (--follow: until it ends)",
        "stop": "stop one job",
    }
    for name, text in actions.items():
        a = sub.add_parser(name, help=text, description=text)
        if name != "list":
            a.add_argument("id", help="the job id printed by `satseg submit`")
        if name == "logs":
            a.add_argument(
                "--follow", action="store_true", help="stream the logs until the job ends; exit 0 only if it succeeded"
            )
        if name == "list":
            a.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
        a.add_argument(
            "--address", help="the cluster's dashboard (Jobs API) address, e.g. http://HOST:8265 (default RAY_ADDRESS)"
        )


def _when(ms: int | None) -> str:
    return "" if not ms else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def main(args: argparse.Namespace) -> int:
    from pipeline.submit import follow_logs, job_logs, job_row, jobs_client, list_jobs, resolve_address, stop_job
    from schemas.errors import ClusterError

    logging.getLogger("ray").setLevel(logging.WARNING)
    address = resolve_address(args.address)
    if address is None:
        raise ClusterError(
            "no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS (`satseg cluster start` prints one)"
        )
    client = jobs_client(address)
    if args.action == "list":
        from pipeline.query import format_rows

        rows = [
            (r.id, r.status, _when(r.start_time), _when(r.end_time), r.scenes or "", r.out or "", r.message)
            for r in list_jobs(client)
        ]
        print(format_rows(["id", "status", "started", "ended", "scenes", "out", "message"], rows, args.format))
        return 0
    if args.action == "status":
        row = job_row(client, args.id)
        print(f"{row.id}  {row.status}" + (f"  {row.message}" if row.message else ""))
        if row.out:
            print(f"out: {row.out}  (per-scene state: `satseg status {row.out}`)")
        return 0
    if args.action == "logs":
        if not args.follow:
            sys.stdout.write(job_logs(client, args.id))
            return 0
        row = follow_logs(client, args.id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        print(f"satseg: job {row.id} {row.status}" + (f": {row.message}" if row.message else ""), file=sys.stderr)
        return 0 if row.status == "SUCCEEDED" else 1
    stopped = stop_job(client, args.id)
    print(f"{args.id}: " + ("stop requested" if stopped else "already ended"))
    return 0
