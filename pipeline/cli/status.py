"""`satseg status`: per-scene state of a job (or of every job of a schedule), read from its output folder."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "show each scene's state (pending, running, done, failed) from a job's output folder; needs no cluster"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="a job's output folder (holding job.json), or a schedule's (holding jobs/)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")


def main(args: argparse.Namespace) -> int:
    from pipeline.query import format_rows
    from pipeline.job_folder import RUNNING, job_states, read_job_record
    from schemas.errors import SpecError
    from schemas.store import OutputLayout, ScheduleLayout

    root = Path(args.out)
    schedule = ScheduleLayout(root)
    if OutputLayout(root).job_file.is_file():
        if read_job_record(root) is None:
            raise SpecError(f"{OutputLayout(root).job_file}: not a job record satseg can read (not a JSON object); "
                            "pass the `out` folder of a job satseg ran")
        jobs = [root]
    elif schedule.jobs.is_dir():
        jobs = sorted(p for p in schedule.jobs.iterdir() if OutputLayout(p).job_file.is_file())
    else:
        raise SpecError(f"{root}: no job.json or jobs/ here; pass the `out` folder of a job or a schedule")
    rows = []
    for job in jobs:
        for s in job_states(job):
            status = f"{s.status} (process {s.pid} gone)" if s.status == RUNNING and s.process_gone else s.status
            name = job.name if job != root else (read_job_record(job) or {}).get("job_id") or ""
            rows.append((name, s.scene, status, s.chunks_done, s.chunks_total, s.updated_at, s.reason or ""))
    print(format_rows(["job", "scene", "status", "chunks_done", "chunks_total", "updated", "reason"], rows, args.format))
    if args.format == "table":
        counts = {}
        for r in rows:
            key = r[2].split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no scene state recorded yet")
    return 0
