"""Export a checkpoint's model to a file that runs without satseg's model code.

Three formats. ``exported``: :func:`torch.export.export` with a dynamic batch and dynamic
height and width, each a multiple of :data:`TILE_MULTIPLE` (at least two of them), saved
as a ``.pt2`` program; the recommended format. ``torchscript``: :func:`torch.jit.trace`
saved as a ``.pt`` module; sizes stay dynamic, but the tile-size check is traced away.
``onnx``: an ONNX model (opset :data:`ONNX_OPSET`) with a dynamic batch, height and width,
for onnxruntime, TensorRT and QGIS plugins; it needs ``pip install 'satseg[onnx]'``.

The ``.pt2`` and ``.pt`` files carry the checkpoint's metadata (model, bands, class names,
mean, std, source checkpoint SHA-256, satseg version) as the extra file ``satseg.json``;
the ONNX model carries it as ``metadata_props``. All three also get it beside them as
``PATH.json``. The model maps normalised input, ``(x - mean) / std`` per band, to logits.

ONNX goes through torch's TorchScript-based exporter: it traces the model as ``torchscript``
does and keeps the sizes that upsampling reads from the input as shape operators, so height
and width stay dynamic for every model, DeepLabV3+'s image pooling and HRNet's fusions
included. The torch.export-based exporter gave the same logits but took 10 to 15 s a model
on two CPU cores against under one. Every ONNX export is run once in onnxruntime, at a batch
and size other than the traced example, and refused unless its logits agree with PyTorch's
within :data:`ONNX_TOLERANCE`.
"""

from __future__ import annotations

import inspect
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

from pipeline import __version__
from schemas.errors import CheckpointError, SpecError, first_line
from schemas.store import replacing
from workers.models.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint
from workers.models.registry import TILE_MULTIPLE

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_NAME",
    "ONNX_AXES",
    "ONNX_METADATA_KEY",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "ExportResult",
    "export_checkpoint",
    "export_metadata",
    "export_model",
    "read_export_metadata",
]

EXPORT_FORMATS: dict[str, str] = {"exported": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}
"""Export format -> file suffix."""

METADATA_NAME = "satseg.json"
"""Name of the metadata extra file inside an export."""

METADATA_VERSION = 1
"""Version of the export metadata object; bumped when its meaning changes."""

_MIN_BLOCKS = 2
"""Exported programs take tiles of at least 2 x TILE_MULTIPLE: a 1-pixel coarsest map would be specialised."""

ONNX_OPSET = 17
"""The ONNX opset written: onnxruntime 1.12 and later, TensorRT 8.6 and later read it."""

ONNX_TOLERANCE = 1e-4
"""ONNX logits agree with PyTorch's when max |difference| <= ONNX_TOLERANCE * max(1, max |PyTorch logit|)."""

ONNX_AXES = {0: "batch", 2: "height", 3: "width"}
"""The dynamic axes of the ONNX input ``x`` and output ``logits``, by name."""

ONNX_METADATA_KEY = "satseg"
"""The ONNX metadata_props key whose value is the whole metadata object as JSON."""

_ONNX_INSTALL = "pip install 'satseg[onnx]'"

_TORCHSCRIPT_EXPORTER = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
"""torch 2.5 added the torch.export-based exporter behind ``dynamo=``; from 2.9 it is the default."""


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
        "satseg_version": __version__,
        **({"onnx_opset": ONNX_OPSET, "onnx_tolerance": ONNX_TOLERANCE} if fmt == "onnx" else {}),
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
    elif fmt == "torchscript":
        torch.jit.save(_trace(model, example), buffer, _extra_files=extra)
    else:
        buffer.write(_onnx_model(model, example, metadata))
    path = Path(path)
    _write_atomically(path, buffer.getvalue())
    return path


def read_export_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata inside an export, read without deserialising the model.

    ``.pt2`` and ``.pt`` files are zip archives that keep extra files at ``<archive>/extra/<name>``;
    torch's own readers are ``torch.export.load(path, extra_files=...)`` and
    ``torch.jit.load(path, _extra_files=...)``. An ``.onnx`` model keeps it in ``metadata_props["satseg"]``.
    """
    location = os.fspath(path)
    if location.endswith(EXPORT_FORMATS["onnx"]):
        return _read_onnx_metadata(location)
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


def _onnx_model(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """The serialised ONNX model with ``metadata`` as its properties, once its logits are checked in onnxruntime."""
    onnx, _ = _onnx_modules()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's, from torch 2.9 on
        torch.onnx.export(
            model, (example,), buffer, input_names=["x"], output_names=["logits"], opset_version=ONNX_OPSET,
            dynamic_axes={"x": ONNX_AXES, "logits": ONNX_AXES}, **_TORCHSCRIPT_EXPORTER,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = len(metadata["class_names"])  # left unnamed
    proto.doc_string = f"satseg {metadata['model']}: logits from normalised bands; metadata_props['satseg'] says how"
    for key, value in _onnx_properties(metadata).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    _check_onnx_logits(model, data, example.shape[1], metadata["model"])
    return data


def _onnx_properties(metadata: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props: the whole object as JSON under ``satseg``, and each field on its own
    (strings as they are, anything else as JSON) for readers that look up one key."""
    flat = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    return {ONNX_METADATA_KEY: json.dumps(metadata, sort_keys=True), **flat}


def _check_onnx_logits(model: nn.Module, data: bytes, in_channels: int, name: str) -> None:
    """Run the ONNX model in onnxruntime on a batch and size other than the traced example; refuse it unless its
    logits are PyTorch's within ONNX_TOLERANCE, so a size the trace froze cannot pass unnoticed."""
    _, ort = _onnx_modules()
    probe = torch.randn(1, in_channels, 2 * TILE_MULTIPLE, 3 * TILE_MULTIPLE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(probe).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": probe.numpy()})[0]
    scale = max(1.0, float(abs(expected).max()))
    worst = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not worst <= ONNX_TOLERANCE * scale:
        raise CheckpointError(
            f"ONNX export of {name} disagrees with PyTorch in onnxruntime {ort.__version__} "
            f"(max |difference| {worst:.3g} for logits up to {scale:.3g}, shape {tuple(got.shape)}); "
            "use --format exported or torchscript"
        )


def _read_onnx_metadata(location: str) -> dict[str, Any]:
    onnx, _ = _onnx_modules()
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(location, load_external_data=False)
    except (OSError, DecodeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read ONNX model {location} ({first_line(exc)}); pass a file written by `satseg export`"
        ) from exc
    text = {p.key: p.value for p in proto.metadata_props}.get(ONNX_METADATA_KEY)
    if text is None:
        raise CheckpointError(f"ONNX model {location} holds no satseg metadata; pass a file written by `satseg export`")
    return json.loads(text)


def _onnx_modules() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules; a one-line error naming the extra when either is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise SpecError(f"ONNX export needs the onnx and onnxruntime packages ({first_line(exc)}); {_ONNX_INSTALL}") from exc
    return onnx, onnxruntime


def _check_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise SpecError(f"unknown export format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        _onnx_modules()


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
