"""Reading spec files (jobs, schedules): a YAML mapping, paths relative to the file, one-line validation messages."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas.errors import SpecError

__all__ = ["SAFE_NAME", "check_safe_name", "describe", "read_mapping", "resolve_path"]

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_safe_name(value: str) -> str:
    """A name used in file names (scenes, schedules): letters, digits, '.', '_' and '-'."""
    if not SAFE_NAME.match(value):
        raise ValueError("use letters, digits, '.', '_' and '-' only")
    return value


def describe(err: ValidationError, whole: str) -> str:
    """Pydantic's errors as ``field: message`` parts on one line; ``whole`` names an error of the whole spec."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or whole
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def read_mapping(path: Path, kind: str, expected: str) -> dict:
    """The YAML mapping in ``path`` (a ``kind`` such as "job file"); anything else is one `SpecError` line."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SpecError(f"{path}: cannot read the {kind} ({err.strerror}); check the path") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a {kind} is a YAML mapping with {expected}")
    return data


def resolve_path(path: str, base: Path) -> str:
    """``path`` with ``~`` expanded, relative to ``base`` unless absolute."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)
