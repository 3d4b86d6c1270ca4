"""Reading spec files (jobs, schedules): a YAML mapping, paths relative to the file, one-line validation messages.

A spec file comes from a user, or from whoever wrote the folder a schedule watches, so reading one is bounded:
at most `MAX_SPEC_BYTES` of UTF-8 text, nested at most `MAX_DEPTH` deep, and at most `MAX_VALUES` values once
YAML aliases are expanded (an "alias bomb" of nested anchors is refused before anything is built from it).
Anchors and aliases within those bounds keep working, e.g. ``<<: *defaults``. Every refusal, and every
validation message, is one `SpecError` line of bounded length that quotes at most a short excerpt of a value.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError
from yaml.events import AliasEvent

from schemas.errors import SpecError, printable
from schemas.rasters import gdal_path

__all__ = [
    "SAFE_NAME",
    "MAX_NAME_LENGTH",
    "MAX_SPEC_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
    "MAX_PATH_CHARS",
    "check_path_length",
    "check_safe_name",
    "describe",
    "excerpt",
    "quoted",
    "read_mapping",
    "resolve_path",
]

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LENGTH = 128
"""Longest name (scene, schedule) used in file names."""

MAX_SPEC_BYTES = 1 << 20
"""Largest job or schedule file read (1 MiB); long scene lists belong in a schedule's manifest."""

MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in a spec file (a job needs about five levels)."""

MAX_VALUES = 100_000
"""Most values (scalars, mappings, lists) in a spec file, counted with every alias expanded."""

EXCERPT_CHARS = 80
"""Most characters of a user's value quoted in a message."""

_MAX_PARTS = 3  # validation errors listed in one message; the rest are counted
_MAX_LOC = 60  # characters of one validation error's field name
_MAX_MESSAGE = 160  # characters of one validation error's message
_MAX_DESCRIPTION = 240  # a second or third part is added only while the description stays this short

MAX_PATH_CHARS = 4096
"""Longest path in a spec file (Linux's PATH_MAX)."""


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` (a string as is, anything else as its repr) on one line, cut to ``limit`` characters with "..."."""
    if isinstance(value, str):
        text = value[: limit * 4 + 16]
    else:
        try:
            text = _bounded_repr(value, limit * 4 + 16)
        except Exception:  # noqa: BLE001  (a repr that fails still gets named)
            text = f"<{type(value).__name__}>"
    text = printable(text)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def _bounded_repr(value: object, limit: int) -> str:
    """repr of ``value``, without building a huge string for a big container or string."""
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        import reprlib

        r = reprlib.Repr()
        r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset, r.maxfrozenset = 3, 8, 8, 8, 8, 8
        r.maxstring, r.maxother, r.maxlong = limit, limit, limit
        return r.repr(value)
    if isinstance(value, (bytes, bytearray)):
        return repr(value[:limit])
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<integer of {value.bit_length()} bits>"
    return repr(value)[:limit]


def check_safe_name(value: str) -> str:
    """A name used in file names (scenes, schedules): letters, digits, '.', '_' and '-', at most 128 characters."""
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"use at most {MAX_NAME_LENGTH} characters (got {len(value)})")
    if not SAFE_NAME.match(value):
        raise ValueError("use letters, digits, '.', '_' and '-' only")
    return value


def describe(err: ValidationError, whole: str) -> str:
    """Pydantic's errors as ``field: message`` parts on one line; ``whole`` names an error of the whole spec.

    Bounded whatever the input (about 260 characters at most): up to three parts (the rest counted), each field
    name and message cut to an excerpt, and never pydantic's ``input_value=...`` echo of the value.
    """
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    parts: list[str] = []
    for e in errors[:_MAX_PARTS]:
        loc = ".".join(excerpt(p, 40) if isinstance(p, str) else excerpt(p, 20) for p in e["loc"]) or whole
        part = f"{excerpt(loc, _MAX_LOC)}: {excerpt(e['msg'].removeprefix('Value error, '), _MAX_MESSAGE)}"
        if parts and len("; ".join([*parts, part])) > _MAX_DESCRIPTION:
            break
        parts.append(part)
    if len(errors) > len(parts):
        parts.append(f"and {len(errors) - len(parts)} more")
    return "; ".join(parts)


def quoted(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as Python would quote it (a string in quotes), cut to ``limit`` characters with "..."."""
    return excerpt(repr(value[: limit + 8]) if isinstance(value, str) else value, limit)


def check_path_length(value: Path | str | None) -> Path | str | None:
    """Refuse a path longer than any file system takes (`MAX_PATH_CHARS`), quoting only its start."""
    if value is not None and len(str(value)) > MAX_PATH_CHARS:
        raise ValueError(f"a path of {len(str(value))} characters ({quoted(str(value), 40)}); use at most {MAX_PATH_CHARS}")
    return value


class SpecTooBig(Exception):
    """A spec file beyond the reading bounds; its message says which and the fix."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing deep nesting while composing and alias expansion beyond `MAX_VALUES`."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def compose_node(self, parent, index):
        if not self.check_event(AliasEvent):
            if self._depth >= MAX_DEPTH:
                raise SpecTooBig(f"is nested deeper than {MAX_DEPTH} levels; flatten it")
            self._values += 1
            if self._values > MAX_VALUES:
                raise SpecTooBig(f"holds more than {MAX_VALUES} values; list many scenes in a manifest file instead")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand past `MAX_VALUES` values or `MAX_DEPTH` levels, or loop.

    Aliases share nodes, so each node is measured once (its expanded size and height), in time linear in the
    file whatever the expansion.
    """
    measured: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise SpecTooBig("has an alias inside the value it refers to; write the value out")
        known = measured.get(key)
        if known is None:
            if depth > MAX_DEPTH:
                raise SpecTooBig(f"is nested deeper than {MAX_DEPTH} levels once aliases are expanded; flatten it")
            size, height = 1, 1
            if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
                open_nodes.add(key)
                children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
                for child in children:
                    s, h = measure(child, depth + 1)
                    size += s
                    height = max(height, h + 1)
                    if size > MAX_VALUES:
                        raise SpecTooBig(
                            f"holds more than {MAX_VALUES} values once its YAML aliases are expanded; "
                            "use fewer anchors and aliases"
                        )
                open_nodes.discard(key)
            known = measured[key] = (size, height)
        if depth + known[1] - 1 > MAX_DEPTH:
            raise SpecTooBig(f"is nested deeper than {MAX_DEPTH} levels once aliases are expanded; flatten it")
        return known

    measure(root, 1)


def _read_text(path: Path, kind: str) -> str:
    """The text of ``path``: at most `MAX_SPEC_BYTES`, UTF-8 (a BOM is allowed); anything else one `SpecError` line."""
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, not a {kind}; give the YAML file's path")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a {kind}; give the YAML file's path") from None
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise SpecError(f"{path}: cannot read the {kind} ({why}); check the path and its permissions") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            f"{path}: a {kind} is at most {MAX_SPEC_BYTES // (1 << 20)} MiB and this one is larger; "
            "list many scenes in a manifest file instead"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{path}: the {kind} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None


def read_mapping(path: Path, kind: str, expected: str) -> dict:
    """The YAML mapping in ``path`` (a ``kind`` such as "job file"); anything else is one `SpecError` line."""
    path = Path(path)
    text = _read_text(path, kind)
    try:
        loader = _BoundedLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except SpecTooBig as err:
        raise SpecError(f"{path}: the {kind} {err}") from None
    except yaml.reader.ReaderError as err:
        code = err.character if isinstance(err.character, int) else ord(str(err.character)[:1] or "\0")
        raise SpecError(
            f"{path}: the {kind} holds a character YAML does not allow (U+{code:04X} at character {err.position}); "
            "remove it"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        why = f" ({excerpt(problem, 60)})" if problem else ""
        raise SpecError(f"{path}: not valid YAML{where}{why}; fix the syntax") from None
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. an integer with more digits than Python allows
        raise SpecError(f"{path}: the {kind} holds a value YAML cannot read ({excerpt(str(err), 60)}); fix it") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a {kind} is a YAML mapping with {expected}")
    return data


def resolve_path(path: str, base: Path) -> str:
    """``path`` with ``~`` expanded, relative to ``base`` unless absolute; a remote or virtual path (``s3://``,
    ``https://``, ``/vsi*/``: `schemas.rasters.gdal_path`) stays exactly as written."""
    if gdal_path(path) is not None:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)
