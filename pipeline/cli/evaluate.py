"""`satseg evaluate`: metrics of an existing mask (Zarr or GeoTIFF) against labels."""

from __future__ import annotations

import argparse

from pipeline.cli.summary import print_metrics

HELP = "metrics of an existing mask (satseg Zarr or GeoTIFF) against a label GeoTIFF"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred", help="predicted mask: a satseg .zarr store or a single-band GeoTIFF (255 = nodata)")
    p.add_argument("labels", help="label GeoTIFF on the same grid")
    p.add_argument("--classes", help="comma-separated class names (default: those stored with the mask)")
    p.add_argument("--ignore-index", type=int, default=255, help="label value counted nowhere (default 255)")
    p.add_argument("--chunk-size", type=int, default=2048, help="chunk size for GeoTIFF masks (default 2048)")
    p.add_argument("--out", help="also write tiles/classes/scenes reports under OUT/reports")


def main(args: argparse.Namespace) -> int:
    from pipeline.assess import assess_mask

    names = [c.strip() for c in args.classes.split(",")] if args.classes else None
    result = assess_mask(args.pred, args.labels, class_names=names, ignore_index=args.ignore_index, out=args.out, chunk=args.chunk_size)
    print_metrics(f"{result.name}: per-class metrics", result.class_names, result.metrics)
    if result.reports:
        print(f"reports: {result.reports} (job id {result.job_id})")
    return 0
