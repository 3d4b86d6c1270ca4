"""The `satseg` command line: one module per command; the library never imports this package."""

from __future__ import annotations

import argparse
import sys

from pipeline import __version__
from pipeline.cli import cluster, demo, evaluate, export, jobs, models, query, report, run, schedule, status, submit, train
from pipeline.cli import objects
from pipeline.logs import LEVELS, configure_logging
from schemas.errors import user_error

__all__ = ["main"]

_LOG_HELP = (
    "what satseg prints besides its results: debug, info, warning (default; or $SATSEG_LOG_LEVEL) or error; Ray's own "
    "messages go to the log file ($SATSEG_LOG_FILE, default ~/.local/state/satseg/satseg.log), and to the terminal at debug"
)

COMMANDS = {
    "run": run,
    "evaluate": evaluate,
    "objects": objects,
    "query": query,
    "train": train,
    "models": models,
    "export": export,
    "report": report,
    "demo": demo,
    "submit": submit,
    "jobs": jobs,
    "status": status,
    "schedule": schedule,
    "cluster": cluster,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="satseg",
        description="Segment large satellite scenes on Ray, evaluate with Dask, report to Parquet.",
    )
    parser.add_argument("--version", action="version", version=f"satseg {__version__}")
    parser.add_argument("--log-level", choices=list(LEVELS), default=None, help=_LOG_HELP)
    common = argparse.ArgumentParser(add_help=False)  # the same flag after the command, too
    common.add_argument("--log-level", choices=list(LEVELS), default=argparse.SUPPRESS, help=_LOG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(p)
        p.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("satseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (user errors become one line; others keep their traceback)
        user = user_error(err)
        if user is None:
            raise
        print(f"satseg: error: {user}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
