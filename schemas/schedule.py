"""Schedule specs: what `satseg schedule` runs, and when, from a YAML file.

A schedule names a cron expression, where new scenes come from (a glob or a
manifest file of paths), the job to run on them (any job key except
``scenes``, ``out`` and ``address``) and the output folder that holds one job
folder per tick and the ``runs`` table. Every mistake is one `SpecError` line
naming the file, the field and the fix.
"""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from schemas.errors import SpecError
from schemas.job import JobSpec, job_from_dict
from schemas.specfile import check_path_length, check_safe_name, describe, excerpt, read_mapping, resolve_path

__all__ = ["SceneSource", "ScheduleSpec", "load_schedule", "schedule_from_dict"]

_SCHEDULE_KEYS = ("scenes", "out", "address")


class SceneSource(BaseModel):
    """Where a tick looks for scenes: a glob, or a manifest file with one image path per line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    glob: str | None = None
    manifest: Path | None = None
    labels: str | None = None  # e.g. "/data/labels/{stem}.tif"; used when that file exists

    @field_validator("glob", "manifest", "labels")
    @classmethod
    def _path_length(cls, v: str | Path | None) -> str | Path | None:
        return check_path_length(v)

    @model_validator(mode="after")
    def _one_source(self) -> "SceneSource":
        if (self.glob is None) == (self.manifest is None):
            raise ValueError("give exactly one of `glob` or `manifest`")
        if self.labels is not None:
            try:
                self.labels.format(stem="s", name="s.tif", parent="/p")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"labels template {excerpt(self.labels, 60)!r}: {excerpt(str(err), 40)}; "
                    "use only {stem}, {name} and {parent}"
                ) from None
        return self


class ScheduleSpec(BaseModel):
    """A batch schedule: cron, scene discovery, the job template and the output folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    cron: str
    timezone: str = "UTC"
    scenes: SceneSource
    job: dict
    out: Path
    address: str | None = None  # a Jobs API address (http://HOST:8265); None: RAY_ADDRESS, else run here
    python: str | None = None  # the cluster's Python for submitted jobs (see pipeline.submit)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_safe_name(v)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        if len(v) > 200 or not croniter.is_valid(v):
            raise ValueError(
                f"{excerpt(v, 40)!r} is not a valid cron expression "
                "(minute hour day-of-month month day-of-week, e.g. '0 2 * * *')"
            )
        return v

    @field_validator("out")
    @classmethod
    def _out_length(cls, v: Path) -> Path:
        return check_path_length(v)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            if len(v) > 100:
                raise ValueError(v)
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown time zone {excerpt(v, 40)!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return v

    @field_validator("job")
    @classmethod
    def _no_schedule_keys(cls, v: dict) -> dict:
        clash = [k for k in _SCHEDULE_KEYS if k in v]
        if clash:
            raise ValueError(f"{', '.join(clash)} belong to the schedule, not its job; move them to the top level or drop them")
        return v

    def job_spec(self, scenes: list[dict], out: Path) -> JobSpec:
        """The tick's job: the template with these scenes and this output folder."""
        return job_from_dict({**self.job, "scenes": scenes, "out": str(out)}, f"schedule {self.name}: job")


def schedule_from_dict(data: dict, source: str = "schedule") -> ScheduleSpec:
    """Validate a schedule, its job template included; a mistake raises one `SpecError` line naming ``source``."""
    try:
        spec = ScheduleSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {describe(err, 'schedule')}; fix the schedule and rerun") from None
    try:
        JobSpec.model_validate({**spec.job, "scenes": [{"image": "template.tif"}], "out": str(spec.out)})
    except ValidationError as err:
        raise SpecError(f"{source}: job.{describe(err, 'schedule')}; fix the schedule's job and rerun") from None
    return spec


def load_schedule(path: str | Path) -> ScheduleSpec:
    """Read and validate a schedule YAML; relative paths (glob, manifest, labels, checkpoint, init, out) are relative to it."""
    path = Path(path)
    data = read_mapping(path, "schedule file", "name, cron, scenes, job and out")
    base = path.absolute().parent
    scenes = data.get("scenes")
    if isinstance(scenes, dict):
        scenes = dict(scenes)
        for key in ("glob", "manifest", "labels"):
            if isinstance(scenes.get(key), str) and not scenes[key].startswith("{"):
                scenes[key] = resolve_path(scenes[key], base)
        data["scenes"] = scenes
    if isinstance(data.get("out"), str):
        data["out"] = resolve_path(data["out"], base)
    job = data.get("job")
    if isinstance(job, dict):
        for key in ("checkpoint", "init"):
            if isinstance(job.get(key), str):
                job = data["job"] = {**job, key: resolve_path(job[key], base)}
    return schedule_from_dict(data, str(path))
