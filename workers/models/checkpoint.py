"""Checkpoints: model weights plus everything needed to apply them, in one safetensors file.

Safetensors rather than pickle, so loading a checkpoint never runs code. The header
metadata key ``"satseg"`` holds one JSON object (``format_version`` 1) naming the model,
its build options, the source bands it reads, class names, normalisation and provenance.
A checkpoint is identified by the SHA-256 of its file, which reports record.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from schemas.errors import CheckpointError, SpecError, first_line
from schemas.store import replacing
from workers.models.registry import create_model, list_models

__all__ = ["FORMAT_VERSION", "Checkpoint", "save_checkpoint", "load_checkpoint", "build_from_checkpoint", "file_sha256"]

FORMAT_VERSION = 1
"""Version of the ``satseg`` metadata object; bumped when its meaning changes."""

_METADATA_KEY = "satseg"
_WRITTEN_BY = "pass the path of a .safetensors file written by `satseg train`"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: how to build the model, what data it expects, and its weights."""

    model: str
    model_kwargs: dict[str, Any]
    bands: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    provenance: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False, compare=False)
    path: str
    sha256: str


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    bands: Sequence[int],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model``'s weights and metadata atomically (temp file, then rename); return the file's SHA-256."""
    path = Path(path)
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "bands": [int(b) if isinstance(b, numbers.Integral) else b for b in bands],
        "class_names": list(class_names),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "provenance": dict(provenance or {}),
    }
    _check_metadata(metadata, f"cannot save checkpoint {path}")
    try:
        header = json.dumps(metadata, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot save checkpoint {path}: metadata is not JSON-serialisable ({first_line(exc)}); "
            "pass plain numbers, strings, lists and dicts"
        ) from exc
    return write_safetensors(path, model.state_dict(), {_METADATA_KEY: header})


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write tensors and string metadata atomically (temp file, then rename); returns the file's sha256."""
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
    with replacing(path, "path") as tmp:
        save_file(tensors, tmp, metadata=metadata)
        sha256 = file_sha256(tmp)
    return sha256


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; raise CheckpointError if it is not one."""
    location = os.fspath(path)
    if not os.path.isfile(location):
        raise CheckpointError(f"checkpoint not found: {location}; {_WRITTEN_BY}")
    try:
        sha256 = file_sha256(location)
        with safe_open(location, framework="pt") as stream:
            header = (stream.metadata() or {}).get(_METADATA_KEY)
        state_dict = load_file(location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {location} is not a readable safetensors file ({first_line(exc)}); {_WRITTEN_BY}"
        ) from exc
    if header is None:
        raise CheckpointError(f"checkpoint {location} has no satseg metadata; {_WRITTEN_BY}")
    try:
        metadata = json.loads(header)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {location} has corrupt satseg metadata ({exc.msg}); {_WRITTEN_BY}") from exc
    _check_metadata(metadata, f"checkpoint {location}")
    return Checkpoint(
        model=metadata["model"],
        model_kwargs=dict(metadata["model_kwargs"]),
        bands=tuple(metadata["bands"]),
        class_names=tuple(metadata["class_names"]),
        mean=tuple(float(v) for v in metadata["mean"]),
        std=tuple(float(v) for v in metadata["std"]),
        provenance=dict(metadata["provenance"]),
        state_dict=state_dict,
        path=location,
        sha256=sha256,
    )


def build_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> nn.Module:
    """Build the checkpoint's model, load its weights strictly, move it to ``device`` in eval mode."""
    try:
        model = create_model(ckpt.model, len(ckpt.bands), len(ckpt.class_names), **ckpt.model_kwargs)
    except SpecError as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} cannot be built: {exc}; re-train with satseg") from exc
    mismatch = _state_dict_mismatch(model.state_dict(), ckpt.state_dict)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit model {ckpt.model} with {ckpt.model_kwargs}: {mismatch}; "
            "re-train, or fix model_kwargs in the checkpoint"
        )
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.to(device).eval()


def _check_metadata(metadata: Any, where: str) -> None:
    """Raise CheckpointError naming ``where`` unless the metadata object is complete and consistent."""
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: satseg metadata is not a JSON object; {_WRITTEN_BY}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format_version is {version!r}, this satseg reads {FORMAT_VERSION}; "
            "use the satseg version that wrote it, or re-train"
        )
    problem = _metadata_problem(metadata)
    if problem:
        raise CheckpointError(f"{where}: {problem}")


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    model, bands, classes = metadata.get("model"), metadata.get("bands"), metadata.get("class_names")
    mean, std = metadata.get("mean"), metadata.get("std")
    if model not in list_models():
        return f"unknown model {model!r}; valid names: {', '.join(list_models())}; upgrade satseg or re-train"
    if not isinstance(metadata.get("model_kwargs"), dict) or not isinstance(metadata.get("provenance"), dict):
        return "model_kwargs and provenance must be JSON objects"
    if not isinstance(bands, list) or not bands or not all(_is_int(b) and b >= 1 for b in bands):
        return f"bands must be a non-empty list of 1-based band indexes, got {bands!r}"
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return f"class_names must be a non-empty list of strings, got {classes!r}"
    for label, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or len(values) != len(bands) or not all(_is_finite(v) for v in values):
            return f"{label} must hold one finite number per band ({len(bands)}), got {values!r}"
    if not all(v > 0 for v in std):
        return f"std must be positive for every band, got {std!r}"
    return None


def _state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """One-line summary of missing, unexpected and wrongly shaped tensors; empty when they fit."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & found.keys() if expected[k].shape != found[k].shape)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (first {unexpected[0]})")
    if shapes:
        first = shapes[0]
        parts.append(
            f"{len(shapes)} tensors of the wrong shape (first {first}: "
            f"{tuple(found[first].shape)} in file, model wants {tuple(expected[first].shape)})"
        )
    return ", ".join(parts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
