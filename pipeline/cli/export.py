"""`satseg export`: write a checkpoint's model as a file that runs without satseg (torch.export or TorchScript)."""

from __future__ import annotations

import argparse

HELP = "export a checkpoint's model to torch.export (.pt2) or TorchScript (.pt), with its metadata"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by `satseg train` (.safetensors)")
    p.add_argument(
        "--format", choices=["exported", "torchscript", "onnx"], default="exported",
        help="exported: torch.export program, dynamic batch and size (default); torchscript: traced module; "
        "onnx: not available in this build",
    )
    p.add_argument("--out", help="file to write (default: CKPT with .pt2 or .pt); metadata also goes to OUT.json")
    p.add_argument("--tile", type=int, default=512, help="example tile size to trace with, a multiple of 32 (default 512)")


def main(args: argparse.Namespace) -> int:
    from workers.models.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.format, args.out, tile=args.tile)
    meta = result.metadata
    print(
        f"export: {result.path} ({result.format}, {meta['model']}, {len(meta['bands'])} bands, "
        f"{len(meta['class_names'])} classes, checkpoint sha256 {meta['checkpoint_sha256'][:12]}); "
        f"metadata: {result.sidecar}"
    )
    return 0
