"""Where outputs live: a job's output folder, a schedule's, and how any file in them is replaced.

Every path under a job's or a schedule's ``out`` is named here, and every file
written there is replaced in one rename (``replacing``), so no reader ever
sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from schemas.errors import OutputConflictError

__all__ = ["MASK_NODATA", "OutputLayout", "ScheduleLayout", "REPORT_TABLES", "is_zarr_node", "replacing", "write_json", "create_whole"]

MASK_NODATA = 255
"""The class masks' nodata value (uint8): no class, never counted. So a job has at most 255 classes."""

REPORT_TABLES = (
    "tiles", "classes", "scenes", "curves", "aggregates", "runs",  # runs: one row per schedule tick
    "objects", "object_metrics", "object_misses",  # jobs with `things`
)


def is_zarr_node(path: Path) -> bool:
    """Whether ``path`` is a Zarr v3 group or array (a folder with its ``zarr.json``)."""
    return path.is_dir() and (path / "zarr.json").exists()


@dataclass(frozen=True)
class OutputLayout:
    """``OUT/job.json``, ``OUT/masks/<scene>.zarr``, ``OUT/reports/<table>/job_id=<id>/``, ``OUT/state/``,
    ``OUT/stac/`` (a STAC Collection and an Item per mask), ``OUT/report.html``."""

    root: Path

    def check_folder(self) -> None:
        """Refuse an output folder that is a file (or lies below one), in one line, before anything is written."""
        for path in (self.root, *self.root.parents):
            if path.exists():
                if not path.is_dir():
                    raise OutputConflictError(f"{path}: is a file, not a folder; give --out a folder (new or a job's)")
                return

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def mask_store(self, scene: str) -> Path:
        return self.masks / f"{scene}.zarr"

    def report_file(self, table: str, job_id: str, scene: str) -> Path:
        return self.reports / table / f"job_id={job_id}" / f"{scene}.parquet"

    def aggregates_file(self, job_id: str) -> Path:
        """Micro and macro aggregates over the job's scenes (rewritten after each run)."""
        return self.reports / "aggregates" / f"job_id={job_id}" / "job.parquet"

    def chunk_markers(self, scene: str) -> Path:
        return self.state / scene / "chunks"

    def status_file(self, scene: str) -> Path:
        """The scene's last state (pending, running, done, failed) for `satseg status`; not the record of done."""
        return self.state / scene / "status.json"

    @property
    def html_report(self) -> Path:
        """Where `satseg report OUT` writes the run's HTML report by default."""
        return self.root / "report.html"

    @property
    def stac(self) -> Path:
        return self.root / "stac"

    @property
    def stac_collection(self) -> Path:
        """The job's STAC Collection, linking every scene's item."""
        return self.stac / "collection.json"

    def stac_item(self, scene: str) -> Path:
        """The STAC Item of a scene's mask (written once the scene is complete)."""
        return self.stac / "items" / f"{scene}.json"


@dataclass(frozen=True)
class ScheduleLayout:
    """``OUT/schedule.lock``, ``OUT/jobs/<run_id>/`` (a job folder each, plus tick.json and submission.json),
    ``OUT/reports/runs/schedule=<name>/<run_id>.parquet``."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "schedule.lock"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job(self, run_id: str) -> OutputLayout:
        return OutputLayout(self.jobs / run_id)

    def tick_file(self, run_id: str) -> Path:
        """What a tick runs, written before its job starts."""
        return self.jobs / run_id / "tick.json"

    def submission_file(self, run_id: str) -> Path:
        """The Ray Jobs submission of a tick run on a cluster."""
        return self.jobs / run_id / "submission.json"

    @property
    def runs(self) -> Path:
        return self.root / "reports" / "runs"

    def runs_file(self, schedule: str, run_id: str) -> Path:
        return self.runs / f"schedule={schedule}" / f"{run_id}.parquet"


@contextmanager
def _written_beside(path: Path, mode: str, publish) -> Iterator:
    """A temporary file beside ``path`` (an open file in ``mode``, or its path for ``"path"``); once written whole,
    ``publish(tmp, path)`` gives it its name. The temporary name never outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "path":
            os.close(fd)
            yield Path(tmp)
        else:
            with os.fdopen(fd, mode) as f:
                yield f
        os.chmod(tmp, 0o644)  # as a plain open() would leave it, not mkstemp's 0o600
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after a rename; the second name after a link


@contextmanager
def replacing(path: Path, mode: str = "wb") -> Iterator:
    """Write ``path`` whole or not at all: a temporary file beside it, renamed over it on success, removed on failure.

    Yields an open file (``mode``), or the temporary path itself when ``mode`` is ``"path"`` (for writers that
    take a path). The one rule for atomic writes under an output folder.
    """
    if Path(path).is_dir():  # a rename onto a folder fails only after the whole file is written
        raise OutputConflictError(f"{path}: is a folder, not a file; give the path of the file to write")
    with _written_beside(path, mode, os.replace) as f:
        yield f


def write_json(path: Path, data: dict) -> None:
    """Replace a JSON file atomically: never half-written."""
    with replacing(path, "w") as f:
        json.dump(data, f, indent=2)


def create_whole(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``, whole, unless it exists: False then. Atomic: of two callers, one creates it.

    The text goes to a temporary file first, which is hard-linked to ``path`` (a link fails on an existing name).
    """
    created = []

    def link(tmp: str, target: Path) -> None:
        try:
            os.link(tmp, target)
            created.append(target)
        except FileExistsError:
            pass  # another caller came first

    with _written_beside(path, "w", link) as f:
        f.write(text)
    return bool(created)
