"""Where a job's outputs live under its output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["OutputLayout", "REPORT_TABLES", "is_zarr_node"]

REPORT_TABLES = ("tiles", "classes", "scenes", "curves", "aggregates", "runs")  # runs: one row per schedule tick


def is_zarr_node(path: Path) -> bool:
    """Whether ``path`` is a Zarr v3 group or array (a folder with its ``zarr.json``)."""
    return path.is_dir() and (path / "zarr.json").exists()


@dataclass(frozen=True)
class OutputLayout:
    """``OUT/job.json``, ``OUT/masks/<scene>.zarr``, ``OUT/reports/<table>/job_id=<id>/``, ``OUT/state/``."""

    root: Path

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

    def scene_done(self, scene: str) -> Path:
        return self.state / scene / "COMPLETE"
