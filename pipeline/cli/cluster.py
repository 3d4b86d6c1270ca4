"""`satseg cluster`: start and stop a local standalone Ray head on 127.0.0.1, to try `satseg submit` on one machine."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "start, stop or show a local Ray head bound to 127.0.0.1 (dashboard and Jobs API on loopback)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start a head and record its PID", description="start a head and record its PID")
    start.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    start.add_argument("--num-gpus", type=int, help="GPUs the head offers (default: those Ray detects)")
    start.add_argument(
        "--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port (default 8265; 0 picks a free one)"
    )
    stop = sub.add_parser(
        "stop", help="stop the head started by `satseg cluster start`, by its PID", description="stop the recorded head by PID"
    )
    status = sub.add_parser("status", help="show the recorded head", description="show the recorded head and whether it runs")
    for a in (start, stop, status):
        a.add_argument("--state", type=Path, help="the head's record (default $SATSEG_HOME/head.json, else ~/.satseg/head.json)")


def main(args: argparse.Namespace) -> int:
    from pipeline.head import head_alive, read_head, start_head, stop_head

    if args.action == "start":
        rec = start_head(args.state, num_cpus=args.num_cpus, num_gpus=args.num_gpus, dashboard_port=args.dashboard_port)
        print(f"head started: pid {rec.pid}, Jobs API {rec.address}, GCS {rec.gcs_address}, Python {rec.python}")
        print(f"export RAY_ADDRESS={rec.address}")
        return 0
    if args.action == "stop":
        rec = stop_head(args.state)
        print(f"head stopped: pid {rec.pid} ({rec.address})")
        return 0
    rec = read_head(args.state)
    if rec is None:
        print("no head recorded")
        return 1
    state = "running" if head_alive(rec) else "not running (stale record; `satseg cluster stop` clears it)"
    print(f"head pid {rec.pid}: {state}; Jobs API {rec.address}, GCS {rec.gcs_address}, Python {rec.python}, logs {rec.temp_dir}")
    return 0 if head_alive(rec) else 1
