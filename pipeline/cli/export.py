"""`satseg export`: a checkpoint's model as a file that runs without satseg (torch.export, TorchScript or ONNX),
or a mask store as a Cloud-Optimised GeoTIFF (`--cog`)."""

from __future__ import annotations

import argparse

HELP = (
    "export a checkpoint's model to torch.export (.pt2), TorchScript (.pt) or ONNX (.onnx), with its metadata; "
    "or, with --cog, a mask store to a Cloud-Optimised GeoTIFF"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", metavar="CKPT|MASK",
        help="checkpoint written by `satseg train` (.safetensors); with --cog, a mask store (OUT/masks/<scene>.zarr)",
    )
    p.add_argument(
        "--format", choices=["exported", "torchscript", "onnx"], default="exported",
        help="exported: torch.export program, dynamic batch and size (default); torchscript: traced module; "
        "onnx: ONNX model for onnxruntime, TensorRT and QGIS plugins, dynamic batch and size, checked in onnxruntime "
        "(needs pip install 'satseg[onnx]')",
    )
    p.add_argument("--out", help="file to write (default: CKPT with .pt2, .pt or .onnx); metadata also goes to OUT.json")
    p.add_argument("--tile", type=int, default=512, help="example tile size to trace with, a multiple of 32 (default 512)")
    p.add_argument(
        "--cog", metavar="OUT.tif",
        help="write the mask store MASK as a Cloud-Optimised GeoTIFF: 512 px tiles, deflate, MODE overviews, "
        "colour table, class names in the tags; beside it OUT.qml (QGIS style with class names) and OUT.tif.aux.xml "
        "(GDAL category names)",
    )
    p.add_argument("--overwrite", action="store_true", help="with --cog: replace OUT.tif if it exists")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from schemas.errors import SpecError

    if args.cog is not None:
        return _export_cog(args)
    if args.overwrite:
        raise SpecError("--overwrite is for --cog exports; model exports always replace --out")

    from schemas.store import is_zarr_node

    if is_zarr_node(Path(args.checkpoint)):
        raise SpecError(f"{args.checkpoint}: is a mask store, not a checkpoint; export it with --cog OUT.tif")
    from workers.models.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.format, args.out, tile=args.tile)
    meta = result.metadata
    print(
        f"export: {result.path} ({result.format}, {meta['model']}, {len(meta['bands'])} bands, "
        f"{len(meta['class_names'])} classes, checkpoint sha256 {meta['checkpoint_sha256'][:12]}); "
        f"metadata: {result.sidecar}"
    )
    return 0


def _export_cog(args: argparse.Namespace) -> int:
    from pipeline.cog import export_cog
    from schemas.errors import SpecError

    if args.out is not None or args.format != "exported" or args.tile != 512:
        raise SpecError("--out, --format and --tile are for model exports; with --cog OUT.tif give only the mask store")

    result = export_cog(args.checkpoint, args.cog, overwrite=args.overwrite)
    levels = ", ".join(f"1/{f}" for f in result.overviews) or "none (fits one tile)"
    print(
        f"export: {result.path} (COG, {result.shape[0]} x {result.shape[1]} px, {len(result.class_names)} classes, "
        f"overviews {levels}); QGIS style {result.style}, category names {result.categories}"
        + (f"; STAC item {result.stac_item}" if result.stac_item else "")
    )
    return 0
