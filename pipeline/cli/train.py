"""`satseg train`: fit a model on image/label GeoTIFF pairs; keeps the best epoch's checkpoint and a resumable state."""

from __future__ import annotations

import argparse
import json
import sys

from schemas.errors import SpecError
from schemas.job import DEVICES

HELP = "train a model on image/label GeoTIFFs (cross-entropy + soft Dice); keeps the best checkpoint by validation mean IoU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", required=True, help="training GeoTIFF (repeat for several)")
    p.add_argument("--labels", action="append", required=True, help="label GeoTIFF for each --image, same order")
    p.add_argument("--model", required=True, help="registry model name, e.g. hrnet_w18_small_v1")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors): always the best epoch so far; "
                   "the last epoch's state goes beside it as NAME.train-state.safetensors")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="optimiser steps per epoch (default 40)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step (default 8)")
    p.add_argument("--crop", type=int, default=128, help="crop size, a multiple of 32 (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, poly decay (default 2e-3)")
    p.add_argument("--bands", help="comma-separated 1-based band indexes (default all)")
    p.add_argument("--classes", help="comma-separated class names (default: the label raster's `classes` tag)")
    p.add_argument("--model-options", default="{}", help='JSON of model options, e.g. \'{"width_multiplier": 0.5}\'')
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from published weights (.pth/.pt/.safetensors: timm or torchvision ImageNet HRNet/ResNet, "
                   "mmsegmentation FCN-HRNetV2 or DeepLabV3+, a satseg checkpoint); first conv and classifier adapted "
                   "to the bands and classes (README: Pretrained weights)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="bottom fraction of every scene's rows held out for validation, at least one crop tall (default 0.15)")
    p.add_argument("--val-crops", type=int, default=32,
                   help="validation crops, a fixed seeded set from the held-out rows (default 32)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the state beside --out (same settings; a larger --epochs trains further)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA when present (bf16 autocast), else CPU in fp32 (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _say_init(report) -> None:
    """What the weights file gave the model, before training starts."""
    for line in report.lines():
        print(line, file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    from pipeline.train import TrainData, TrainSettings, train_model

    try:
        options = json.loads(args.model_options)
        bands = [int(b) for b in args.bands.split(",")] if args.bands else None
    except ValueError:
        raise SpecError("--model-options must be JSON and --bands comma-separated integers") from None
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    data = TrainData(args.image, args.labels, bands=bands, class_names=classes)
    settings = TrainSettings(
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
        val_fraction=args.val_fraction, val_crops=args.val_crops, seed=args.seed, device=args.device,
    )
    try:
        result = train_model(data, args.model, args.out, settings, model_options=options, resume=args.resume,
                             show_progress=not args.quiet, init=args.init, on_init=_say_init)
    except KeyboardInterrupt:
        print(f"satseg: interrupted; the last finished epoch is saved beside {args.out}; "
              "rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    print(f"checkpoint: {result.checkpoint} (sha256 {result.sha256[:12]}), best epoch {result.best_epoch}/"
          f"{len(result.history)} validation mean IoU {result.validation_miou:.4f}, final loss {result.losses[-1]:.4f}, "
          f"{result.seconds:.0f} s on {result.device}; resumable state: {result.state}")
    return 0
