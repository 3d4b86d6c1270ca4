"""Job specs: what `satseg run` does, from a YAML file or from flags.

Validated by pydantic; every mistake becomes one `SpecError` line naming the
file, the field and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer, model_validator,
)

from schemas.errors import SpecError
from schemas.rasters import RasterPath
from schemas.refine import CRFOptions, SLICOptions, refine_options_model
from schemas.store import MASK_NODATA
from schemas.specfile import (
    MAX_NAME_LENGTH, check_path_length, check_safe_name, describe, excerpt, quoted, read_mapping, resolve_path,
)

__all__ = ["TILE_MULTIPLE", "DEVICES", "MAX_MODEL_OPTIONS", "check_model_options", "check_device", "resolve_device", "SceneSpec", "ClassSpec", "parse_color", "ScoringSpec", "JobSpec", "RUN_SETTINGS", "LATER_FIELDS", "load_job", "load_evaluation_spec", "job_from_dict", "default_chunk_size"]

TILE_MULTIPLE = 32
"""Tile (and training crop) height and width are multiples of this: the models' coarsest feature map is 1/32."""


DEVICES = ("auto", "cpu", "cuda")


def check_device(name: str) -> None:
    """Refuse a device name other than auto, cpu or cuda, in one line."""
    if name not in DEVICES:
        raise SpecError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")


def resolve_device(requested: str, gpus: int) -> str:
    """The device a ``device: auto|cpu|cuda`` setting means where ``gpus`` GPUs are available: the one rule.

    ``cuda`` stays cuda even with no GPU in sight (an autoscaling cluster starts one; a worker without one fails
    loudly); ``auto`` takes a GPU when there is one.
    """
    check_device(requested)
    return "cuda" if requested == "cuda" or (requested == "auto" and gpus >= 1) else "cpu"


MAX_MODEL_OPTIONS = 16
"""Most entries in a job's ``model_options``; a model's keyword options are few (``width_multiplier``, ``output_stride``)."""

_OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_OPTION_STRING = 100  # longest string option value
_OPTION_LIST = 16  # longest list option value
_OPTIONS_JSON = 512  # most characters of all the options as JSON (they are quoted in messages and job ids)


def _option_scalar(name: str, value: object) -> object:
    if value is None or isinstance(value, (bool, str, int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"option {name} must be a finite number (got {value})")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 53:
            raise ValueError(f"option {name} is too large a number (got {excerpt(value, 24)})")
        if isinstance(value, str) and len(value) > _OPTION_STRING:
            raise ValueError(
                f"option {name} is a string of {len(value)} characters, at most {_OPTION_STRING} allowed "
                f"({quoted(value, 40)})"
            )
        return value
    raise ValueError(
        f"option {name} must be a number, a string, true/false or a short list of those (got a {type(value).__name__}: "
        f"{excerpt(value, 40)})"
    )


def check_model_options(options: object) -> dict:
    """A model's keyword options: at most 16 names, each a number, string, bool, null or a list of up to 16 of those.

    ``create_model`` takes them as keyword arguments, so names are identifiers; values are JSON scalars, so they fit
    the job id; the whole stays short (512 characters as JSON), so a message may quote it.
    """
    if not isinstance(options, dict):
        raise ValueError(f"must be a mapping of option names to values (got a {type(options).__name__})")
    if len(options) > MAX_MODEL_OPTIONS:
        raise ValueError(f"at most {MAX_MODEL_OPTIONS} options (got {len(options)}); see `satseg models` for what a model takes")
    for name, value in options.items():
        if not isinstance(name, str) or not _OPTION_NAME.match(name):
            raise ValueError(f"option name {quoted(name, 40)} is not a keyword name (letters, digits and '_', at most 64)")
        if isinstance(value, (list, tuple)):
            if len(value) > _OPTION_LIST:
                raise ValueError(f"option {name} is a list of {len(value)} values, at most {_OPTION_LIST} allowed")
            for item in value:
                _option_scalar(name, item)
        else:
            _option_scalar(name, value)
    size = len(json.dumps(options))
    if size > _OPTIONS_JSON:
        raise ValueError(f"the options take {size} characters as JSON, at most {_OPTIONS_JSON}; drop some")
    return options


MAX_STAC_BANDS = 64
"""Most assets a STAC scene stacks (Sentinel-2 has 13 bands, Landsat 11)."""


class SceneSpec(BaseModel):
    """One scene: an image, optionally its label raster, and a name for its outputs.

    ``image`` and ``labels`` are local paths or remote and virtual ones GDAL reads (`schemas.rasters`: ``s3://``,
    ``gs://``, ``http(s)://``, ``/vsi*/``), kept as written. With ``stac_bands`` the image is a STAC Item (a local
    JSON file or an http(s) URL) whose assets of those bands, by common name or asset key, are stacked in that order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: RasterPath
    labels: RasterPath | None = None
    name: str | None = None
    stac_bands: list[str] | None = None
    instances: RasterPath | None = None  # true object ids (0: none) beside `labels`, for object metrics (`things`)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        return v if v is None else check_safe_name(v)

    @field_validator("image", "labels", "instances")
    @classmethod
    def _path_length(cls, v: Path | None) -> Path | None:
        return check_path_length(v)

    @model_validator(mode="after")
    def _instances_need_labels(self) -> "SceneSpec":
        if self.instances is not None and self.labels is None:
            raise ValueError("`instances` (true object ids) go with `labels` (their classes); give both")
        return self

    @field_validator("stac_bands")
    @classmethod
    def _stac_bands(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not 1 <= len(v) <= MAX_STAC_BANDS:
            raise ValueError(f"give 1 to {MAX_STAC_BANDS} band names, e.g. [blue, green, red, nir] (got {len(v)})")
        for band in v:
            if not band.strip() or len(band) > 64:
                raise ValueError(f"a band name is a common name or asset key of 1 to 64 characters (got {quoted(band, 40)})")
        twice = sorted({b for b in v if v.count(b) > 1})
        if twice:
            raise ValueError(f"band {quoted(twice[0], 40)} is listed twice; list each band once")
        return v

    @model_serializer(mode="wrap")
    def _without_unset_stac_bands(self, handler):
        """A scene without ``stac_bands`` dumps as it did before the field existed, so job ids stay the same."""
        data = handler(self)
        for key in ("stac_bands", "instances"):  # `instances` likewise
            if getattr(self, key) is None and isinstance(data, dict):
                data.pop(key, None)
        return data

    @property
    def scene_name(self) -> str:
        if self.name:
            return self.name
        # the file name's stem, made safe and cut to the longest name, so every file named after it fits the file system
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", self.image.name.split(".")[0])[:MAX_NAME_LENGTH] or "scene"
        return stem


def default_chunk_size(tile_size: int, overlap: int) -> int:
    """About 2048 px, a whole number of strides so `crop` computes each tile once."""
    stride = tile_size - overlap
    return stride * max(1, round(2048 / stride))


_HEX_COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")


def parse_color(value: object) -> str:
    """A class colour as ``#rrggbb`` (lower case), from ``"#rrggbb"`` or ``[r, g, b]`` (0 to 255): the one syntax rule."""
    if isinstance(value, str) and _HEX_COLOR.match(value):
        return value.lower()
    if (
        isinstance(value, (list, tuple)) and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        return "#{:02x}{:02x}{:02x}".format(*value)
    raise ValueError(f'color {quoted(value, 40)} is neither "#rrggbb" nor [r, g, b] with values 0 to 255')


class ClassSpec(BaseModel):
    """A class given with its colour, ``{name: water, color: "#1f78b4"}``; a class without one is its plain name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    color: str

    @field_validator("color", mode="before")
    @classmethod
    def _color(cls, v: object) -> str:
        return parse_color(v)


def _class_entry(entry: object, where: object) -> object:
    """One entry of ``classes`` as a plain name, or a `ClassSpec` when it carries a colour.

    An entry whose colour is left out is its plain name, so a job without colours keeps its job id.
    """
    if isinstance(entry, (str, ClassSpec)):
        return entry
    if not isinstance(entry, dict):
        raise ValueError(f"class {where}: give a name or {{name: ..., color: \"#rrggbb\"}} (got {excerpt(entry, 40)})")
    unknown = sorted(str(k) for k in entry if k not in ("name", "color"))
    if unknown:
        raise ValueError(f"class {where}: unknown key {quoted(unknown[0], 40)}; a class takes `name` and `color`")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"class {where}: give its `name` (a string)")
    if "color" not in entry:
        return name
    if entry["color"] is None:  # YAML reads an unquoted #rrggbb as a comment
        raise ValueError(f'class {where} ({excerpt(name, 40)}): color is empty; quote it, color: "#1f78b4", or give [r, g, b]')
    try:
        return ClassSpec(name=name, color=parse_color(entry["color"]))
    except ValueError as err:
        raise ValueError(f"class {where} ({excerpt(name, 40)}): {err}") from None


def _entry_name(entry: str | ClassSpec) -> str:
    return entry.name if isinstance(entry, ClassSpec) else entry


class ScoringSpec(BaseModel):
    """How a job's masks are scored: the classes (names, or label value -> name) and the metric settings.

    `satseg run` takes it as part of a job; `satseg evaluate --job` reads only this part of a job file.
    A class may carry its colour (`ClassSpec`); the colours go to every output and, only when given, into the job id.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    # names, or label value -> name; each name may instead be {name, color}
    classes: list[str | ClassSpec] | dict[int, str | ClassSpec] | None = None
    ignore_index: int = 255
    boundary_width: int = Field(default=3, ge=1, le=256)  # boundary IoU band, in pixels
    boundary_ratio: float | None = Field(default=None, gt=0, lt=1)  # the paper's rule: ratio of the diagonal
    trimap_max_width: int = Field(default=10, ge=1, le=256)  # trimap IoU for band widths 1..N
    # how pixels that are no class shape boundary bands: neutral (satseg's), or the reference implementation's rule
    boundary_convention: Literal["neutral", "reference"] = "neutral"

    @field_validator("classes", mode="before")
    @classmethod
    def _class_entries(cls, v: object) -> object:
        if isinstance(v, (list, tuple)):
            return [_class_entry(e, i) for i, e in enumerate(v)]
        if isinstance(v, dict):
            return {k: _class_entry(e, k) for k, e in v.items()}
        return v

    @model_validator(mode="after")
    def _mapping(self):
        if isinstance(self.classes, dict):
            if len(set(self.class_names)) != len(self.classes):
                raise ValueError("class names in the `classes` mapping must be unique")
            if self.ignore_index is not None and self.ignore_index in self.classes:
                raise ValueError(f"label value {self.ignore_index} is both a class and ignore_index; change one of them")
        return self

    def _entries(self) -> list[str | ClassSpec] | None:
        if isinstance(self.classes, dict):
            return list(self.classes.values())
        return list(self.classes) if self.classes is not None else None

    @property
    def class_names(self) -> list[str] | None:
        """Class names in class-index order."""
        entries = self._entries()
        return [_entry_name(e) for e in entries] if entries is not None else None

    @property
    def class_colors(self) -> list[str | None] | None:
        """Each class's colour as ``#rrggbb`` in class-index order (None: not given); None when no class has one."""
        entries = self._entries() or []
        colors = [e.color if isinstance(e, ClassSpec) else None for e in entries]
        return colors if any(colors) else None

    @property
    def label_values(self) -> list[int] | None:
        """The label value of each class when `classes` maps values to names (else the value is the index)."""
        return list(self.classes) if isinstance(self.classes, dict) else None


LATER_FIELDS = {"boundary_convention": "neutral", "things": None, "connectivity": 4, "simplify": None, "refine": "none",
                "refine_options": {}}
"""Identity fields added after jobs had run, with the value those jobs had; see `JobSpec.identity`."""

RUN_SETTINGS = frozenset({"out", "address", "num_actors", "max_windows_in_flight", "batch_size", "compile", "device"})
"""Job fields that change only speed or placement, never the outputs, so they are no part of a job's identity.

(``device`` matters only through the numeric precision it implies; the job id adds that precision itself.)
"""


class JobSpec(ScoringSpec):
    """A tiling job: scenes, model, tiling, stitching and where outputs go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenes: list[SceneSpec] = Field(min_length=1)
    model: str | None = None
    checkpoint: Path | None = None
    init: Path | None = None  # published weights `model` starts from (workers.models.pretrained); not with checkpoint
    model_options: dict = Field(default_factory=dict)
    bands: list[int] | None = None
    tile_size: int = 512
    overlap: int = 64
    chunk_size: int | None = None
    stitch: Literal["auto", "blend", "crop"] = "auto"
    window: Literal["hann", "triangular", "gaussian", "uniform"] = "hann"
    batch_size: int | None = Field(default=None, ge=1)  # None: from the GPU's memory, 1 on CPU
    tta: Literal["none", "flip", "d4"] = "none"
    compile: bool = False
    out: Path = Path("satseg-output")
    address: str | None = None
    num_actors: int | None = Field(default=None, ge=1)
    max_windows_in_flight: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    save_probabilities: bool = False  # per-class probabilities (uint8) beside the mask: PR curves and AP
    things: list[str] | None = None  # classes whose connected components are objects (pipeline/objects.py)
    connectivity: Literal[4, 8] = 4  # objects' pixels join across edges (4) or also corners (8)
    simplify: float | None = Field(default=None, ge=0)  # polygon simplification tolerance, map units
    refine: Literal["none", "slic", "crf"] = "none"  # after stitching, before argmax (pipeline/core/refine.py)
    refine_options: dict = Field(default_factory=dict, validate_default=True)  # the method's (schemas/refine.py), complete

    @field_validator("checkpoint", "init", "out")
    @classmethod
    def _path_length(cls, v: Path | None) -> Path | None:
        return check_path_length(v)

    @field_validator("model_options", mode="before")
    @classmethod
    def _options(cls, v: object) -> dict:
        return check_model_options(v)

    @field_validator("tile_size")
    @classmethod
    def _tile(cls, v: int) -> int:
        if v < TILE_MULTIPLE or v % TILE_MULTIPLE:
            raise ValueError(f"must be a positive multiple of {TILE_MULTIPLE} (got {v})")
        return v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError("band indexes start at 1, as in GDAL")
        return v

    @field_validator("refine_options")
    @classmethod
    def _refine_options(cls, v: dict, info: ValidationInfo) -> dict:
        method = info.data.get("refine", "none")
        model = refine_options_model(method)
        if model is None:
            if v:
                raise ValueError("refine_options given without refine; set refine: slic or crf, or drop refine_options")
            return v
        try:
            return model.model_validate(v).model_dump()
        except ValidationError as err:
            unknown = [e["loc"][0] for e in err.errors() if e["type"] == "extra_forbidden"]
            if unknown:
                raise ValueError(
                    f"refine: {method} takes no option {quoted(str(unknown[0]), 40)}; it takes {', '.join(model.model_fields)}"
                ) from None
            raise ValueError(f"refine: {method}: {describe(err, method).removeprefix(f'{method}: ')}") from None

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be >= 0 and smaller than tile_size {self.tile_size} (got {self.overlap})")
        if self.chunk_size is not None and self.chunk_size < TILE_MULTIPLE:
            raise ValueError(f"chunk_size must be at least {TILE_MULTIPLE} (got {self.chunk_size})")
        if self.model is None and self.checkpoint is None:
            raise ValueError("give a model name or a checkpoint")
        if self.init is not None and self.checkpoint is not None:
            raise ValueError("give `init` (published weights for `model`) or `checkpoint` (a satseg model), not both")
        if self.classes is not None and len(self.classes) > MASK_NODATA:
            raise ValueError(f"at most {MASK_NODATA} classes fit a uint8 mask with nodata {MASK_NODATA} (got {len(self.classes)})")
        if self.checkpoint is None and not self.classes:
            raise ValueError("a model without a checkpoint needs `classes` (the class names)")
        counts = Counter(s.scene_name for s in self.scenes)
        dup = sorted(n for n, c in counts.items() if c > 1)
        if dup:
            more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
            raise ValueError(f"scene names must be unique; give `name` to scenes {', '.join(dup[:5])}{more}")
        if self.things is not None:
            unknown = [t for t in self.things if self.class_names is not None and t not in self.class_names]
            if not self.things or unknown:
                raise ValueError(
                    f"things must name classes of the job ({', '.join(self.class_names or [])}; got {quoted(unknown[0], 40)})"
                    if unknown else "things lists at least one class; leave it out for no objects"
                )
        if any(s.instances is not None for s in self.scenes) and not self.things:
            raise ValueError("scenes give `instances` (true object ids): give `things` too, the classes they are of")
        return self

    @property
    def refine_settings(self) -> CRFOptions | SLICOptions | None:
        """The refinement's options (None for ``refine: none``)."""
        model = refine_options_model(self.refine)
        return None if model is None else model.model_validate(self.refine_options)

    @property
    def effective_chunk_size(self) -> int:
        return self.chunk_size or default_chunk_size(self.tile_size, self.overlap)

    def identity(self) -> dict:
        """Every field that determines the outputs (all but `RUN_SETTINGS`), as JSON values; scenes in a fixed order.

        A field added after jobs were already run (`LATER_FIELDS`) counts only when it differs from the value those
        jobs had implicitly, so their folders keep their job ids and still resume. ``init`` counts by its content,
        not its path: `pipeline.run.job_id_of` adds the file's SHA-256.
        """
        keep = self.model_dump(mode="json", exclude=set(RUN_SETTINGS) | {"init"})
        keep["scenes"] = sorted(keep["scenes"], key=lambda s: s["image"])
        for name, implicit in LATER_FIELDS.items():
            if keep.get(name) == implicit:
                del keep[name]
        return keep


def job_from_dict(data: dict, source: str = "command line") -> JobSpec:
    """Validate a job; a mistake raises one `SpecError` line naming ``source``."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {describe(err, 'job')}; fix the job and rerun") from None


_JOB_KEYS = "`scenes:` and `model:` or `checkpoint:`"


def load_evaluation_spec(path: str | Path) -> ScoringSpec:
    """The classes and scoring settings of a job file (the rest of the job is not needed, nor checked)."""
    path = Path(path)
    try:
        return ScoringSpec.model_validate(read_mapping(path, "job file", _JOB_KEYS))
    except ValidationError as err:
        raise SpecError(f"{path}: {describe(err, 'job')}; fix the job file") from None


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job YAML; relative paths are relative to the file."""
    path = Path(path)
    data = read_mapping(path, "job file", _JOB_KEYS)
    base = path.parent
    if isinstance(data.get("scenes"), list):
        for scene in data["scenes"]:
            if isinstance(scene, dict):
                for key in ("image", "labels", "instances"):
                    if isinstance(scene.get(key), str):
                        scene[key] = resolve_path(scene[key], base)
    for key in ("checkpoint", "init", "out"):
        if isinstance(data.get(key), str):
            data[key] = resolve_path(data[key], base)
    return job_from_dict(data, str(path))
