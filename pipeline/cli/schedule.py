"""`satseg schedule`: run batch jobs on a cron schedule; --once runs one tick (for cron, systemd, Kubernetes)."""

from __future__ import annotations

import argparse

HELP = "run a batch schedule (SCHEDULE.yaml): each cron tick runs one job for new scenes; --once runs one tick and exits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("schedule", help="schedule YAML file (name, cron, scenes: glob or manifest, job, out)")
    p.add_argument(
        "--once", action="store_true",
        help="run the latest tick at or before now, then exit (exit 1 if its scenes failed); "
        "without it, sleep until each next tick until SIGINT/SIGTERM",
    )
    p.add_argument(
        "--address",
        help="submit ticks to this Jobs API address instead of the schedule's `address` (default RAY_ADDRESS, else run here)",
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.schedule import run_schedule
    from schemas.schedule import load_schedule

    spec = load_schedule(args.schedule)
    if args.address:
        spec = spec.model_copy(update={"address": args.address})
    return run_schedule(spec, once=args.once)
