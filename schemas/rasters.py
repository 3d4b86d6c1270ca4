"""Where an input raster lives: a local file, or a remote or virtual path that GDAL reads.

pathlib folds the ``//`` of a URL (``s3://bucket/k`` becomes ``s3:/bucket/k``) and a job file would resolve it
against its own folder, so a remote or virtual path is kept exactly as written (a :class:`RemotePath`) from the
job spec through the job id to the reports; only GDAL sees the name :func:`gdal_path` maps it to.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Union

from pydantic import PlainSerializer, PlainValidator

from schemas.errors import SpecError

__all__ = ["GDAL_SCHEMES", "RemotePath", "gdal_path", "raster_path", "recorded_path", "RasterPath"]

GDAL_SCHEMES = {
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "az": "/vsiaz/",
    "http": "/vsicurl/http://",
    "https": "/vsicurl/https://",
    "ftp": "/vsicurl/ftp://",
}
"""URL schemes GDAL reads, and the prefix of the GDAL name each maps to."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_VSI = re.compile(r"^/vsi[a-z0-9_]+[/?]")  # /vsicurl/URL, or /vsicurl?url=...&options


def gdal_path(path: str | Path) -> str | None:
    """The GDAL name of a remote or virtual raster path, or None for a local file path: the one rule.

    ``s3://b/k`` -> ``/vsis3/b/k``, ``gs://b/k`` -> ``/vsigs/b/k``, ``az://c/k`` -> ``/vsiaz/c/k``,
    ``http(s)://...`` -> ``/vsicurl/http(s)://...``; a ``/vsi*/`` path (``/vsicurl/``, ``/vsis3/``,
    ``/vsizip/``, ...) is GDAL's own and stays as written. A `Path` is always local.
    """
    if not isinstance(path, str):
        return None
    if _VSI.match(path):
        return path
    m = _SCHEME.match(path)
    if m and m.group(1).lower() in GDAL_SCHEMES:
        return GDAL_SCHEMES[m.group(1).lower()] + path[m.end():]
    return None


class RemotePath(str):
    """A remote or virtual raster path, kept as written; ``name`` is its last segment, as a local path's would be."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return self.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def gdal(self) -> str:
        return gdal_path(str(self))

    def is_absolute(self) -> bool:
        """A URL names the same thing from any folder (and a job file never resolves it against its own)."""
        return True


def raster_path(value: str | Path) -> Path | RemotePath:
    """A raster path as given: a `RemotePath` for a remote or virtual one, else a local `Path`.

    A URL of a scheme GDAL does not read (``file://``, ``xyz://``) is refused (`SpecError`, a ValueError, so a
    spec field reports it) rather than read as a local file.
    """
    if isinstance(value, RemotePath) or isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a path or URL (a string; got a {type(value).__name__} value)")
    if gdal_path(value) is not None:
        return RemotePath(value)
    m = _SCHEME.match(value)
    if m:
        raise SpecError(
            f"{m.group(1)}:// is not a scheme GDAL reads here ({value[:60]!r}); give a local path, "
            f"{', '.join(f'{s}://' for s in GDAL_SCHEMES)} or a /vsi*/ path"
        )
    return Path(value)


def recorded_path(value: str | Path) -> str:
    """A raster as records keep it (report rows, a training run's resume record): a local file by its absolute path,
    so it is found from any folder later, and a remote or virtual one exactly as written."""
    raster = raster_path(str(value) if isinstance(value, Path) else value)
    return str(raster) if isinstance(raster, RemotePath) else str(Path(raster).expanduser().resolve())


RasterPath = Annotated[
    Union[Path, RemotePath], PlainValidator(raster_path), PlainSerializer(str, return_type=str, when_used="json")
]
"""A pydantic field holding a raster path: local paths as `Path` (their JSON, and so job ids, as before),
remote and virtual ones as written."""
