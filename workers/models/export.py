"""Export a checkpoint's model to a file that runs without satseg's model code.

Two formats. ``exported``: :func:`torch.export.export` with a dynamic batch and dynamic
height and width, each a multiple of :data:`TILE_MULTIPLE` (at least two of them), saved
as a ``.pt2`` program; the recommended format. ``torchscript``: :func:`torch.jit.trace`
saved as a ``.pt`` module; sizes stay dynamic, but the tile-size check is traced away.
ONNX is not offered: ``torch.onnx.export`` needs the ``onnx`` and ``onnxscript`` packages.

Both files carry the checkpoint's metadata (model, bands, class names, mean, std, source
checkpoint SHA-256) as the extra file ``satseg.json``, also written beside them as
``PATH.json``. The model maps normalised input, ``(x - mean) / std`` per band, to logits.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from schemas.errors import CheckpointError, SpecError
from schemas.store import replacing
from workers.models.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint
from workers.models.registry import TILE_MULTIPLE

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_NAME",
    "ExportResult",
    "export_checkpoint",
    "export_metadata",
    "export_model",
    "read_export_metadata",
]

EXPORT_FORMATS: dict[str, str] = {"exported": ".pt2", "torchscript": ".pt"}
"""Export format -> file suffix."""

METADATA_NAME = "satseg.json"
"""Name of the metadata extra file inside an export."""

METADATA_VERSION = 1
"""Version of the export metadata object; bumped when its meaning changes."""

_MIN_BLOCKS = 2
"""Exported programs take tiles of at least 2 x TILE_MULTIPLE: a 1-pixel coarsest map would be specialised."""


@dataclass(frozen=True)
class ExportResult:
    """Where an export was written, in which format, and the metadata it carries."""

    path: Path
    sidecar: Path
    format: str
    metadata: dict[str, Any]


def export_metadata(ckpt: Checkpoint, fmt: str) -> dict[str, Any]:
    """What a user of the exported file needs: model, bands, classes, normalisation, source checkpoint."""
    return {
        "format_version": METADATA_VERSION,
        "format": fmt,
        "model": ckpt.model,
        "model_kwargs": dict(ckpt.model_kwargs),
        "bands": list(ckpt.bands),
        "class_names": list(ckpt.class_names),
        "mean": list(ckpt.mean),
        "std": list(ckpt.std),
        "checkpoint": os.path.basename(ckpt.path),
        "checkpoint_sha256": ckpt.sha256,
        "tile_multiple": TILE_MULTIPLE,
        "min_tile": _MIN_BLOCKS * TILE_MULTIPLE if fmt == "exported" else TILE_MULTIPLE,
        "input": "float32 (N, bands, H, W), normalised as (x - mean) / std per band, nodata pixels 0; "
        "H, W multiples of tile_multiple, at least min_tile",
        "output": "float32 logits (N, classes, H, W)",
        "torch_version": torch.__version__,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike[str], fmt: str = "exported", out: str | os.PathLike[str] | None = None, tile: int = 512
) -> ExportResult:
    """Load a checkpoint, export its model in ``fmt`` to ``out`` (default: beside it, format's suffix)."""
    _check_format(fmt)
    _check_tile_size(tile)
    ckpt = load_checkpoint(checkpoint)
    path = Path(out) if out is not None else Path(ckpt.path).with_suffix(EXPORT_FORMATS[fmt])
    if path.resolve() == Path(ckpt.path).resolve():
        raise SpecError(f"export path {path} is the checkpoint itself; pass another --out")
    metadata = export_metadata(ckpt, fmt)
    export_model(build_from_checkpoint(ckpt, "cpu"), len(ckpt.bands), path, fmt, metadata, tile=tile)
    sidecar = path.with_name(path.name + ".json")
    _write_atomically(sidecar, (json.dumps(metadata, indent=2) + "\n").encode())
    return ExportResult(path=path, sidecar=sidecar, format=fmt, metadata=metadata)


def export_model(
    model: nn.Module, in_channels: int, path: str | os.PathLike[str], fmt: str, metadata: dict[str, Any], tile: int = 512
) -> Path:
    """Export ``model`` (eval mode, CPU), traced on a 2 x ``in_channels`` x ``tile`` x ``tile`` example; write atomically."""
    _check_format(fmt)
    _check_tile_size(tile)
    model = model.eval()
    example = torch.zeros(2, in_channels, tile, tile)
    extra = {METADATA_NAME: json.dumps(metadata, sort_keys=True)}
    buffer = io.BytesIO()
    if fmt == "exported":
        torch.export.save(_export_program(model, example), buffer, extra_files=extra)
    else:
        torch.jit.save(_trace(model, example), buffer, _extra_files=extra)
    path = Path(path)
    _write_atomically(path, buffer.getvalue())
    return path


def read_export_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata inside an export, read from its zip archive without deserialising the model.

    Both formats are zip archives that keep extra files at ``<archive>/extra/<name>``;
    torch's own readers are ``torch.export.load(path, extra_files=...)`` and
    ``torch.jit.load(path, _extra_files=...)``.
    """
    location = os.fspath(path)
    try:
        with zipfile.ZipFile(location) as archive:
            member = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_NAME}")), None)
            text = archive.read(member).decode() if member else None
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read export {location} ({exc}); pass a file written by `satseg export`") from exc
    if text is None:
        raise CheckpointError(f"export {location} holds no {METADATA_NAME}; pass a file written by `satseg export`")
    return json.loads(text)


def _export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch and H, W dynamic in steps of TILE_MULTIPLE."""
    batch = torch.export.Dim("batch", min=1)
    height = TILE_MULTIPLE * torch.export.Dim("height_blocks", min=_MIN_BLOCKS)
    width = TILE_MULTIPLE * torch.export.Dim("width_blocks", min=_MIN_BLOCKS)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch, 2: height, 3: width},))


def _trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """torch.jit.trace; its warnings about the tile check being traced away are expected, so silenced."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
        return torch.jit.trace(model, example, check_trace=False)


def _check_format(fmt: str) -> None:
    if fmt == "onnx":
        raise SpecError(
            "ONNX export is not available in this build (torch.onnx needs the onnx and onnxscript packages); "
            "use --format exported or torchscript"
        )
    if fmt not in EXPORT_FORMATS:
        raise SpecError(f"unknown export format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")


def _check_tile_size(tile: int) -> None:
    smallest = _MIN_BLOCKS * TILE_MULTIPLE
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < smallest or tile % TILE_MULTIPLE:
        raise SpecError(f"--tile must be a multiple of {TILE_MULTIPLE} of at least {smallest}, got {tile!r}")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temp file in the same folder, then rename, so no half-written file ever has ``path``'s name."""
    try:
        with replacing(path) as stream:
            stream.write(data)
    except OSError as exc:
        raise SpecError(f"cannot write export {path} ({exc.strerror or exc}); pass a writable --out") from exc
