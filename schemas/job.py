"""Job specs: what `satseg run` does, from a YAML file or from flags.

Validated by pydantic; every mistake becomes one `SpecError` line naming the
file, the field and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import SpecError

__all__ = ["SceneSpec", "JobSpec", "EvaluationSpec", "load_job", "load_evaluation_spec", "job_from_dict", "default_chunk_size"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SceneSpec(BaseModel):
    """One scene: an image, optionally its label raster, and a name for its outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: Path
    labels: Path | None = None
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return v

    @property
    def scene_name(self) -> str:
        if self.name:
            return self.name
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", self.image.name.split(".")[0]) or "scene"
        return stem


def default_chunk_size(tile_size: int, overlap: int) -> int:
    """About 2048 px, a whole number of strides so `crop` computes each tile once."""
    stride = tile_size - overlap
    return stride * max(1, round(2048 / stride))


def _class_names(classes) -> list[str] | None:
    if isinstance(classes, dict):
        return list(classes.values())
    return list(classes) if classes is not None else None


def _check_class_mapping(classes, ignore_index: int | None) -> None:
    if isinstance(classes, dict):
        if len(set(classes.values())) != len(classes):
            raise ValueError("class names in the `classes` mapping must be unique")
        if ignore_index is not None and ignore_index in classes:
            raise ValueError(f"label value {ignore_index} is both a class and ignore_index; change one of them")


class EvaluationSpec(BaseModel):
    """What `satseg evaluate --job` takes from a job file: classes and how to score; other keys are not needed."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    classes: list[str] | dict[int, str] | None = None
    ignore_index: int = 255
    boundary_width: int = Field(default=3, ge=1, le=256)
    boundary_ratio: float | None = Field(default=None, gt=0, lt=1)
    trimap_max_width: int = Field(default=10, ge=1, le=256)

    @model_validator(mode="after")
    def _mapping(self) -> "EvaluationSpec":
        _check_class_mapping(self.classes, self.ignore_index)
        return self

    @property
    def class_names(self) -> list[str] | None:
        return _class_names(self.classes)

    @property
    def label_values(self) -> list[int] | None:
        return list(self.classes) if isinstance(self.classes, dict) else None


class JobSpec(BaseModel):
    """A tiling job: scenes, model, tiling, stitching and where outputs go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenes: list[SceneSpec] = Field(min_length=1)
    model: str | None = None
    checkpoint: Path | None = None
    model_options: dict = Field(default_factory=dict)
    classes: list[str] | dict[int, str] | None = None  # names, or label value -> name
    bands: list[int] | None = None
    tile_size: int = 512
    overlap: int = 64
    chunk_size: int | None = None
    stitch: Literal["auto", "blend", "crop"] = "auto"
    window: Literal["hann", "triangular", "gaussian", "uniform"] = "hann"
    batch_size: int | None = Field(default=None, ge=1)  # None: from free GPU memory, 1 on CPU
    tta: Literal["none", "flip", "d4"] = "none"
    compile: bool = False
    ignore_index: int = 255
    out: Path = Path("satseg-output")
    address: str | None = None
    num_actors: int | None = Field(default=None, ge=1)
    max_windows_in_flight: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    save_probabilities: bool = False  # per-class probabilities (uint8) beside the mask: PR curves and AP
    boundary_width: int = Field(default=3, ge=1, le=256)  # boundary IoU band, in pixels
    boundary_ratio: float | None = Field(default=None, gt=0, lt=1)  # the paper's rule: ratio of the diagonal
    trimap_max_width: int = Field(default=10, ge=1, le=256)  # trimap IoU for band widths 1..N

    @field_validator("tile_size")
    @classmethod
    def _tile(cls, v: int) -> int:
        if v < 32 or v % 32:
            raise ValueError(f"must be a positive multiple of 32 (got {v})")
        return v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError("band indexes start at 1, as in GDAL")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be >= 0 and smaller than tile_size {self.tile_size} (got {self.overlap})")
        if self.chunk_size is not None and self.chunk_size < 32:
            raise ValueError(f"chunk_size must be at least 32 (got {self.chunk_size})")
        if self.model is None and self.checkpoint is None:
            raise ValueError("give a model name or a checkpoint")
        _check_class_mapping(self.classes, self.ignore_index)
        if self.classes is not None and len(self.classes) > 255:
            raise ValueError(f"at most 255 classes fit a uint8 mask with nodata 255 (got {len(self.classes)})")
        if self.checkpoint is None and not self.classes:
            raise ValueError("a model without a checkpoint needs `classes` (the class names)")
        names = [s.scene_name for s in self.scenes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"scene names must be unique; give `name` to scenes {', '.join(dup)}")
        return self

    @property
    def class_names(self) -> list[str] | None:
        """Class names in class-index order."""
        return _class_names(self.classes)

    @property
    def label_values(self) -> list[int] | None:
        """The label value of each class when `classes` maps values to names (else the value is the index)."""
        return list(self.classes) if isinstance(self.classes, dict) else None

    @property
    def effective_chunk_size(self) -> int:
        return self.chunk_size or default_chunk_size(self.tile_size, self.overlap)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "job"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def job_from_dict(data: dict, source: str = "command line") -> JobSpec:
    """Validate a job; a mistake raises one `SpecError` line naming ``source``."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_describe(err)}; fix the job and rerun") from None


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the job file ({err.strerror}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job file is a YAML mapping with `scenes:` and `model:` or `checkpoint:`")
    return data


def load_evaluation_spec(path: str | Path) -> EvaluationSpec:
    """The classes and scoring settings of a job file (the rest of the job is not needed, nor checked)."""
    path = Path(path)
    try:
        return EvaluationSpec.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise SpecError(f"{path}: {_describe(err)}; fix the job file") from None


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job YAML; relative paths are relative to the file."""
    path = Path(path)
    data = _read_yaml(path)
    base = path.parent
    if isinstance(data.get("scenes"), list):
        for scene in data["scenes"]:
            if isinstance(scene, dict):
                for key in ("image", "labels"):
                    if isinstance(scene.get(key), str):
                        scene[key] = _resolve(scene[key], base)
    for key in ("checkpoint", "out"):
        if isinstance(data.get(key), str):
            data[key] = _resolve(data[key], base)
    return job_from_dict(data, str(path))
