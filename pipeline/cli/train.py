"""`satseg train`: fit a model on image/label GeoTIFF pairs; writes a safetensors checkpoint."""

from __future__ import annotations

import argparse
import json

from schemas.errors import SpecError

HELP = "train a model on image/label GeoTIFFs (cross-entropy + soft Dice); writes a checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", required=True, help="training GeoTIFF (repeat for several)")
    p.add_argument("--labels", action="append", required=True, help="label GeoTIFF for each --image, same order")
    p.add_argument("--model", required=True, help="registry model name, e.g. hrnet_w18_small_v1")
    p.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="optimiser steps per epoch (default 40)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step (default 8)")
    p.add_argument("--crop", type=int, default=128, help="crop size, a multiple of 32 (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, poly decay (default 2e-3)")
    p.add_argument("--bands", help="comma-separated 1-based band indexes (default all)")
    p.add_argument("--classes", help="comma-separated class names (default: the label raster's `classes` tag)")
    p.add_argument("--model-options", default="{}", help='JSON of model options, e.g. \'{"width_multiplier": 0.5}\'')
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def main(args: argparse.Namespace) -> int:
    from pipeline.train import train_model

    try:
        options = json.loads(args.model_options)
        bands = [int(b) for b in args.bands.split(",")] if args.bands else None
    except ValueError:
        raise SpecError("--model-options must be JSON and --bands comma-separated integers") from None
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    result = train_model(
        args.image, args.labels, args.model, args.out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, bands=bands, class_names=classes,
        model_options=options, seed=args.seed, show_progress=not args.quiet,
    )
    print(f"checkpoint: {result.checkpoint} (sha256 {result.sha256[:12]}), final loss {result.losses[-1]:.4f}, "
          f"validation mean IoU {result.validation_miou:.4f}, {result.seconds:.0f} s")
    return 0
