"""The entrypoint of a job submitted by `satseg submit`: ``$PY -m pipeline.cli.entrypoint`` on the cluster.

It decodes the spec shipped in ``SATSEG_JOB_SPEC`` and runs it without a
progress display; a user error is one line and exit status 2, as in the CLI.
"""

from __future__ import annotations

import os
import sys


def run_shipped() -> int:
    """The cluster side: run the job shipped in ``SATSEG_JOB_SPEC``; user errors are one line and exit 2."""
    from schemas.errors import user_error
    from pipeline.cli.summary import print_job_summary
    from pipeline.run import run_job
    from pipeline.submit import SPEC_ENV, decode_spec

    from pipeline.logs import configure_logging

    try:
        configure_logging()  # satseg's warnings in the job's log, Ray's in the cluster node's satseg.log
        spec = decode_spec(os.environ.get(SPEC_ENV))
        print(f"satseg: running {len(spec.scenes)} scene(s) into {spec.out} with {sys.executable}", flush=True)
        result = run_job(spec, show_progress=False)
    except Exception as err:  # noqa: BLE001
        user = user_error(err)
        if user is None:
            raise
        print(f"satseg: error: {user}", file=sys.stderr)
        return 2
    print_job_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(run_shipped())
